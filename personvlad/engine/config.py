"""``TrainConfig``: every knob of a training run, as nested dataclasses.

Defaults are the paper's schedule: step 1 trains everything but the VLAD
centers (``model.center_parameters()`` frozen) with Adam (eps 1e-4) at
lr 0.003 halved every 1,000 iterations for 50,000 iterations; step 2
fine-tunes everything jointly at 1e-4.  Batches are 15 identity-balanced
clips (5 ids x 3 tracklets) of 16 frames, horizontally flipped at random;
the VLAD centers are initialised by k-means on training descriptors before
step 1.

YAML round trip: ``TrainConfig.from_yaml(path)`` / ``.save_yaml(path)``;
``cfg.apply_overrides(["optim.grad_clip=5", "model.num_parts=4"])`` with
dotted keys, values parsed as YAML scalars and type-checked against the
field (``model.*`` keys are checked by :class:`personvlad.models.ModelConfig`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

__all__ = [
    "TrainConfig", "DataConfig", "LossConfig", "OptimConfig", "ScheduleConfig", "LogConfig",
    "parse_override",
]

DATASETS = ("mars", "ilidsvid", "prid", "synthetic")
LOSSES = ("oim", "softmax", "triplet")
AMP_MODES = ("auto", "bf16", "fp32")
# no CUDA-graph modes: the OIM buffers and the optimizer change between steps outside the graph
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")
# seeds are non-negative signed 64-bit ints: torch.manual_seed overflows past 2**64 and
# np.random.SeedSequence refuses negatives; int64 keeps them representable everywhere
SEED_LIMIT = 2 ** 63
_CUDA_DEVICE = re.compile(r"cuda:[0-9]+")


@dataclass
class DataConfig:
    """dataset: mars | ilidsvid | prid | synthetic (MARS layout generated into
    ``root`` by ``personvlad.data.synth.generate(root, synth_preset, synth_seed)``
    when ``root`` has no ``info/`` folder yet)."""
    dataset: str = "mars"
    root: str = ""
    split_id: int = 0
    synth_preset: str = "tiny"
    synth_seed: int = 0
    num_ids: int = 5          # P identities per batch
    num_per_id: int = 3       # K tracklets per identity -> batch P*K = 15 clips
    flip_p: float = 0.5       # horizontal flip probability
    workers: int = 4          # loader processes (JPEG) or gather threads (shards)
    shards: str = ""          # a `personvlad pack` store at the model's HxW: training clips read from it
    test_stride: int = 8      # stride between test clips of a tracklet
    test_batch_size: int = 32


@dataclass
class LossConfig:
    name: str = "oim"
    queue_size: int = 5000
    temperature: float = 0.1
    momentum: float = 0.5
    num_sampled: Optional[int] = None
    skip_unwritten: bool = False  # oim: leave never-written queue slots out (SPEC §4 counts them as zeros)
    margin: float = 0.3       # triplet
    triplet_weight: float = 0.0   # >0 adds a batch-hard triplet term to oim/softmax


@dataclass
class OptimConfig:
    name: str = "adam"
    eps: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None     # max global L2 norm; None = off
    fused: str = "auto"                   # auto (fused Adam on CUDA) | on | off


@dataclass
class ScheduleConfig:
    kmeans_init: bool = True
    kmeans_descriptors: int = 100_000     # descriptors sampled for k-means
    kmeans_batches: int = 20              # clip batches drawn to collect them
    step1_iters: int = 50_000
    step1_lr: float = 0.003
    step1_gamma: float = 0.5
    step1_decay_every: int = 1000
    step1_freeze_centers: bool = True
    step2_iters: int = 10_000
    step2_lr: float = 1e-4
    step2_gamma: float = 1.0
    step2_decay_every: int = 0            # 0 = constant lr


@dataclass
class LogConfig:
    log_every: int = 20
    ckpt_every: int = 1000
    keep_checkpoints: int = 0  # >0: also keep that many ckpt_XXXXXXXX.pt snapshots (hard links of latest.pt)
    eval_every: int = 0       # 0 = evaluate only at the end of each step
    progress: bool = True
    tensorboard: bool = True


# Keys added after runs were first saved, with the value that reproduces how
# such a run trained (TrainConfig.from_dict(..., saved=True)): OIM left the
# unwritten queue slots out before loss.skip_unwritten existed (2026-12-07).
SAVED_BEFORE_DEFAULTS: Dict[str, Any] = {"loss.skip_unwritten": True}


def _with_saved_before_defaults(d: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(d)
    for dotted, value in SAVED_BEFORE_DEFAULTS.items():
        section, key = dotted.split(".")
        sec = out.get(section)
        if isinstance(sec, dict) and key not in sec:
            out[section] = {**sec, key: value}
    return out


@dataclass
class TrainConfig:
    name: str = "personvlad"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"      # auto | cpu | cuda | cuda:N
    amp: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True  # channels_last_3d on CUDA
    compile: str = "off"      # off | default | max-autotune-no-cudagraphs: torch.compile the model (not the loss)
    fuse_epilogues: bool = False  # conv bias + ReLU (+ MaxPool3d) as one kernel with backward (personvlad.perf)
    init_from: Optional[str] = None   # checkpoint to fine-tune from (model weights only)
    model: Dict[str, Any] = field(default_factory=lambda: {"preset": "paper"})
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        _check_fields(self, "")  # types first: the checks below compare and do arithmetic
        d, lo, op, s, lg = self.data, self.loss, self.optim, self.schedule, self.log
        _choice("data.dataset", d.dataset, DATASETS)
        _choice("loss.name", lo.name, LOSSES)
        _choice("amp", self.amp, AMP_MODES)
        _choice("compile", self.compile, COMPILE_MODES)
        _choice("optim.name", op.name, ("adam",))
        _choice("optim.fused", op.fused, ("auto", "on", "off"))
        if not (self.device in ("auto", "cpu", "cuda") or _CUDA_DEVICE.fullmatch(self.device)):
            raise ValueError(f"device: expected auto|cpu|cuda|cuda:N (N an int >= 0), got {self.device!r}")
        for name, v in (("seed", self.seed), ("data.synth_seed", d.synth_seed)):
            if not 0 <= v < SEED_LIMIT:
                raise ValueError(f"{name}: expected an int in [0, 2**63), got {v!r}")
        from ..data.synth import PRESETS  # numpy only; lazy like model_config()

        _choice("data.synth_preset", d.synth_preset, sorted(PRESETS))
        for name, v, lo_ in (
            ("data.num_ids", d.num_ids, 1), ("data.num_per_id", d.num_per_id, 1), ("data.workers", d.workers, 0),
            ("data.test_stride", d.test_stride, 1), ("data.test_batch_size", d.test_batch_size, 1),
            ("data.split_id", d.split_id, 0),
            ("loss.queue_size", lo.queue_size, 0), ("schedule.step1_iters", s.step1_iters, 0),
            ("schedule.step2_iters", s.step2_iters, 0), ("schedule.step1_decay_every", s.step1_decay_every, 0),
            ("schedule.step2_decay_every", s.step2_decay_every, 0), ("schedule.kmeans_descriptors", s.kmeans_descriptors, 1),
            ("schedule.kmeans_batches", s.kmeans_batches, 1), ("log.log_every", lg.log_every, 1),
            ("log.ckpt_every", lg.ckpt_every, 0),
            ("log.keep_checkpoints", lg.keep_checkpoints, 0), ("log.eval_every", lg.eval_every, 0),
        ):
            if v < lo_:
                raise ValueError(f"{name}: expected >= {lo_}, got {v!r}")
        if lo.num_sampled is not None and lo.num_sampled < 1:
            raise ValueError(f"loss.num_sampled: expected None or >= 1, got {lo.num_sampled!r}")
        for name, v in (("loss.temperature", lo.temperature), ("optim.eps", op.eps),
                        ("schedule.step1_lr", s.step1_lr), ("schedule.step2_lr", s.step2_lr),
                        ("schedule.step1_gamma", s.step1_gamma), ("schedule.step2_gamma", s.step2_gamma)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
        # margin 0 is a valid (hinge at zero) triplet loss; weight 0 turns the triplet term off
        for name, v in (("optim.weight_decay", op.weight_decay), ("loss.margin", lo.margin),
                        ("loss.triplet_weight", lo.triplet_weight)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        if not 0.0 <= d.flip_p <= 1.0:
            raise ValueError(f"data.flip_p: expected a probability in [0, 1], got {d.flip_p!r}")
        if not 0.0 <= lo.momentum <= 1.0:
            raise ValueError(f"loss.momentum: expected a number in [0, 1], got {lo.momentum!r}")
        if op.grad_clip is not None and not (math.isfinite(op.grad_clip) and op.grad_clip > 0):
            raise ValueError(f"optim.grad_clip: expected None or a number > 0, got {op.grad_clip!r}")
        if len(op.betas) != 2 or not all(0.0 <= b < 1.0 for b in op.betas):
            raise ValueError(f"optim.betas: expected two numbers in [0, 1), got {op.betas!r}")
        if s.step1_iters + s.step2_iters < 1:
            raise ValueError("schedule.step1_iters + schedule.step2_iters: expected >= 1, got 0")
        if not isinstance(self.model, dict):
            raise ValueError(f"model: expected a mapping of ModelConfig fields, got {type(self.model).__name__}")
        self.model_config()  # validates the model section

    def model_config(self):
        """The :class:`personvlad.models.ModelConfig` this run builds."""
        from ..models.config import preset_config

        m = dict(self.model)
        preset = m.pop("preset", "paper")
        try:
            return preset_config(preset, **m)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None

    # ------------------------------------------------------------- dict/YAML
    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Dict[str, Any], *, saved: bool = False) -> "TrainConfig":
        """``saved=True``: ``d`` is the config a run was trained with (a
        checkpoint's, or its out folder's config.yaml); a key added to the
        config since then takes the value that reproduces how that run
        trained (``SAVED_BEFORE_DEFAULTS``), not today's default."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a mapping, got {type(d).__name__}")
        if saved:
            d = _with_saved_before_defaults(d)
        return _build(cls, d, "")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save_yaml(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_yaml())

    @classmethod
    def from_yaml(cls, path: str, *, saved: bool = False) -> "TrainConfig":
        """The config in the YAML file ``path``; see also :func:`resolve_config`
        for the shipped configs by name, and :meth:`from_dict` for ``saved``."""
        try:
            with open(path, "r", encoding="utf-8") as f:
                d = yaml.safe_load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: expected a YAML training config, not found") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: expected a YAML training config, could not parse it: {e}") from None
        try:
            return cls.from_dict(d or {}, saved=saved)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # ------------------------------------------------------------- overrides
    def apply_overrides(self, overrides: Sequence[str]) -> "TrainConfig":
        """A new config with ``key=value`` overrides (dotted keys) applied."""
        d = self.to_dict()
        for item in overrides or ():
            key, value = parse_override(item)
            parts = key.split(".")
            node = d
            for i, p in enumerate(parts[:-1]):
                if not isinstance(node, dict) or p not in node:
                    raise ValueError(f"override {item!r}: unknown key {'.'.join(parts[:i + 1])!r}")
                node = node[p]
            last = parts[-1]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:-1])!r} is not a section")
            if parts[0] != "model" and last not in node:
                raise ValueError(f"override {item!r}: unknown key {key!r}")
            node[last] = value
        return TrainConfig.from_dict(d)


def parse_override(item: str):
    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"override: expected key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override: expected key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


# ---------------------------------------------------------------- helpers
def _choice(name, v, choices):
    if v not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {v!r}")


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _build(cls, d: Dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{prefix or 'config'}: unknown key(s) {[prefix + k for k in unknown]}; "
                         f"expected a subset of {sorted(names)}")
    kw = {}
    for k, v in d.items():
        kw[k] = _coerce(prefix + k, v, hints[k])
    try:
        return cls(**kw)
    except TypeError as e:  # pragma: no cover - defensive
        raise ValueError(f"{prefix or 'config'}: {e}") from None


def _check_fields(obj, prefix: str) -> None:
    """Type-check the fields of a constructed config (``TrainConfig(...)``
    directly, or after attributes were set): the strict form of
    :func:`_coerce`, so a bad value is a ValueError naming its dotted key."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name, v, tp = prefix + f.name, getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, tp):
                raise ValueError(f"{name}: expected a {tp.__name__} (TrainConfig.from_dict takes mappings), "
                                 f"got {type(v).__name__}")
            _check_fields(v, name + ".")
        else:
            _coerce(name, v, tp, strict=True)


def _coerce(name: str, v: Any, tp, strict: bool = False):
    """``v`` checked against the field type ``tp`` (ValueError naming ``name``);
    ``strict=False`` (YAML/dict input) also reads numeric strings for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise ValueError(f"{name}: expected a mapping, got {v!r}")
        return _build(tp, v, name + ".")
    if origin is typing.Union:  # Optional[X]
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, v, inner[0], strict)
    if origin in (dict, Dict):
        if not isinstance(v, dict):
            raise ValueError(f"{name}: expected a mapping, got {v!r}")
        return dict(v)
    if origin in (list, List):
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {v!r}")
        return [_coerce(f"{name}[{i}]", x, args[0], strict) for i, x in enumerate(v)] if args else list(v)
    if tp is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{name}: expected a bool (true/false), got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: expected an int, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if isinstance(v, str) and not strict:  # YAML 1.1 reads "1e-4" as a string
                try:
                    return float(v)
                except ValueError:
                    pass
            raise ValueError(f"{name}: expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ValueError(f"{name}: expected a string, got {v!r}")
        return v
    return v  # Any


# ----------------------------------------------------------------- shipped configs
def shipped_configs() -> Dict[str, str]:
    """``{name: path}`` of the configs installed with the package
    (``personvlad.configs``: the repository's ``configs/*.yaml``)."""
    from importlib import resources

    try:
        root = resources.files("personvlad.configs")
    except ModuleNotFoundError:  # pragma: no cover - a broken install
        return {}
    return {os.path.splitext(e.name)[0]: str(e) for e in sorted(root.iterdir(), key=lambda e: e.name)
            if e.name.endswith(".yaml")}


def resolve_config(name_or_path: str) -> str:
    """``name_or_path`` where it is a file, else the shipped config of that
    name (``"mars"`` or ``"mars.yaml"``), so an installed package trains
    without a checkout.  FileNotFoundError naming both and the shipped names."""
    if os.path.isfile(name_or_path):
        return name_or_path
    name = os.path.basename(name_or_path)
    name = name[:-5] if name.endswith(".yaml") else name
    shipped = shipped_configs()
    # a bare name, or the README's configs/<name>.yaml run from outside a checkout
    bare = os.path.dirname(os.path.normpath(name_or_path)) in ("", "configs")
    if bare and name in shipped:
        return shipped[name]
    raise FileNotFoundError(f"{name_or_path}: expected a YAML training config file or the name of a shipped "
                            f"config ({', '.join(shipped) or 'none installed'}); not found")

