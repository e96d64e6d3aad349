"""``ModelConfig``: every choice that defines a PersonVLAD network.

The config is a flat dataclass of plain values (ints, floats, strings and
tuples of them) so it round-trips through ``dict``/JSON/YAML and can be stored
inside a checkpoint that is read back with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

__all__ = [
    "ModelConfig", "PRESETS", "HEADS", "PART_MODES", "IMAGENET_MEAN", "IMAGENET_STD",
    "C3D_MEAN", "C3D_STD", "preset_config",
]

HEADS = ("vlad", "avg", "max")
PART_MODES = ("learned", "stripe", "grid", "none")
_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# Input normalisation for clips in [0, 1], RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The C3D Sports-1M weights were trained on raw 0..255 pixels minus the
# Sports-1M mean clip (about R 101.4, G 97.7, B 90.3) without scaling; this pair
# reproduces that input range for clips in [0, 1]: (x - mean) / std = 255x - 255mean.
C3D_MEAN = (101.4 / 255.0, 97.7 / 255.0, 90.3 / 255.0)
C3D_STD = (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0)


@dataclass
class ModelConfig:
    """Configuration of :class:`~personvlad.models.PersonVLADNet`.

    Fields
    ------
    preset: name of the preset the config started from (informational).
    widths: output channels of the five conv stages (conv1a, conv2a,
        conv3a/b, conv4a/b, conv5a/b); the descriptor dimension ``D`` is
        ``widths[4]``.
    batch_norm: add a BatchNorm3d after every conv (not in C3D; helps training
        from scratch).  Default off.
    head: ``"vlad"`` (PersonVLAD aggregation, output ``K*D``), ``"avg"`` or
        ``"max"`` (3D global pooling per part + a per-part linear layer of
        ``embed_dim`` outputs, concatenated: output ``parts * embed_dim``).
    parts: ``"learned"`` (``num_parts`` sigmoid maps from a 1x1x1 conv),
        ``"stripe"`` (``stripes`` fixed horizontal stripes), ``"grid"`` (fixed
        ``grid[0] x grid[1]`` cells, height x width) or ``"none"`` (no part
        reweighting: plain NetVLAD / global pooling).
    num_parts: ``B`` for ``parts="learned"`` (ignored otherwise).
    stripes, grid: the fixed layouts for ``parts="stripe"`` / ``"grid"``.
    num_clusters: ``K`` of the VLAD head.
    alpha: assignment sharpness of the VLAD head (W = 2 alpha c, z = -alpha |c|^2).
    embed_dim: per-part output size of the avg/max heads.
    clip_len, height, width: the nominal input clip size ``T x H x W`` (used by
        the data pipeline and ``example_input``; forward accepts any size that
        survives the pools: T >= 8, H >= 16, W >= 16).
    mean, std: per-channel (RGB) input normalisation for clips in [0, 1].
    backend: backend passed to :func:`personvlad.ops.person_vlad`.
    """

    preset: str = "paper"
    widths: Tuple[int, int, int, int, int] = (64, 128, 256, 256, 256)
    batch_norm: bool = False
    head: str = "vlad"
    parts: str = "learned"
    num_parts: int = 6
    stripes: int = 5
    grid: Tuple[int, int] = (5, 5)
    num_clusters: int = 64
    alpha: float = 1000.0
    embed_dim: int = 256
    clip_len: int = 16
    height: int = 180
    width: int = 90
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    backend: str = "auto"

    def __post_init__(self) -> None:
        # Normalise sequences (lists from JSON/YAML) to tuples, then validate.
        for name in ("widths", "grid", "mean", "std"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                setattr(self, name, tuple(v))
        self.validate()

    # ------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for any invalid value."""

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def need_int(name, lo):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")

        if not isinstance(self.preset, str):
            raise ValueError(f"preset: expected a string, got {self.preset!r}")
        w = self.widths
        if not (isinstance(w, tuple) and len(w) == 5 and all(is_int(x) and x >= 1 for x in w)):
            raise ValueError(f"widths: expected 5 ints >= 1 (conv1..conv5 channels), got {w!r}")
        if not isinstance(self.batch_norm, bool):
            raise ValueError(f"batch_norm: expected a bool, got {self.batch_norm!r}")
        if self.head not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}, got {self.head!r}")
        if self.parts not in PART_MODES:
            raise ValueError(f"parts: expected one of {PART_MODES}, got {self.parts!r}")
        need_int("num_parts", 1 if self.parts == "learned" else 0)
        need_int("stripes", 1)
        g = self.grid
        if not (isinstance(g, tuple) and len(g) == 2 and all(is_int(x) and x >= 1 for x in g)):
            raise ValueError(f"grid: expected 2 ints >= 1 (rows, cols), got {g!r}")
        need_int("num_clusters", 1)
        a = self.alpha
        if not (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a > 0):
            raise ValueError(f"alpha: expected a finite number > 0, got {a!r}")
        self.alpha = float(a)
        need_int("embed_dim", 1)
        need_int("clip_len", 8)
        need_int("height", 16)
        need_int("width", 16)
        for name in ("mean", "std"):
            v = getattr(self, name)
            if not (isinstance(v, tuple) and len(v) == 3
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
                raise ValueError(f"{name}: expected 3 finite numbers (R, G, B), got {v!r}")
            setattr(self, name, tuple(float(x) for x in v))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: expected 3 numbers > 0, got {self.std!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend: expected one of {_BACKENDS}, got {self.backend!r}")

    # ------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        """``D``: channels of the backbone feature map."""
        return self.widths[4]

    @property
    def part_count(self) -> int:
        """Number of part maps the network uses (0 for ``parts="none"``)."""
        return {
            "learned": self.num_parts,
            "stripe": self.stripes,
            "grid": self.grid[0] * self.grid[1],
            "none": 0,
        }[self.parts]

    @property
    def output_dim(self) -> int:
        """Length of the descriptor ``model(clips)`` returns."""
        if self.head == "vlad":
            return self.num_clusters * self.feature_dim
        return max(self.part_count, 1) * self.embed_dim

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with some fields changed (validated)."""
        _check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    # ------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (lists instead of tuples): JSON/YAML/weights_only safe."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a dict, got {type(d).__name__}")
        _check_keys(d)
        return cls(**d)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "ModelConfig":
        import yaml

        return cls.from_dict(yaml.safe_load(text))


def _check_keys(d: Dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"config: unknown field(s) {unknown}; expected a subset of {sorted(known)}")


PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper: C3D-style backbone with 256 channels in conv3-5, 16x180x90
    # clips -> (256, 2, 11, 5) feature map, K=64 clusters, B=6 learned parts.
    "paper": dict(
        widths=(64, 128, 256, 256, 256), head="vlad", parts="learned", num_parts=6,
        num_clusters=64, alpha=1000.0, embed_dim=256, clip_len=16, height=180, width=90,
    ),
    # Small enough to train on a CPU in minutes: 8x64x32 clips -> (64, 1, 4, 2).
    "tiny": dict(
        widths=(16, 32, 64, 64, 64), head="vlad", parts="learned", num_parts=2,
        num_clusters=8, alpha=1000.0, embed_dim=64, clip_len=8, height=64, width=32,
    ),
}


def preset_config(preset: str = "paper", **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of ``preset`` with ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
    _check_keys(overrides)
    if "preset" in overrides and overrides["preset"] != preset:
        raise ValueError(f"preset: given twice ({preset!r} and {overrides['preset']!r})")
    kw = dict(PRESETS[preset])
    kw.update(overrides)
    kw["preset"] = preset
    return ModelConfig(**kw)
