"""The training loop: two-step schedule, OIM, checkpoints/resume, DDP, logs.

``train(config, out_dir, resume=False) -> summary dict``.

* Step 1 (``schedule.step1_iters``): VLAD centers frozen
  (``model.center_parameters()``), Adam (eps 1e-4) at ``step1_lr`` multiplied
  by ``step1_gamma`` every ``step1_decay_every`` iterations; before it, on a
  fresh run, the centers are k-means-initialised from training descriptors.
* Step 2 (``schedule.step2_iters``): everything trained jointly at ``step2_lr``
  (a fresh Adam).
* Iterations are counted over both steps; a checkpoint (``latest.pt``,
  atomic) is written every ``log.ckpt_every`` iterations and at the end of each
  step, and holds everything needed to continue bit-for-bit (model,
  optimizer, schedule, loss buffers, RNG states of every rank, iteration,
  step, config).
* Data randomness is keyed, not streamed: batch ``b`` of rank ``r`` is the
  sampler's ``b``-th batch, and each of its clips is drawn (clip start,
  flip) from its own seed ``f(seed, r, b, position)``, so a resumed run (with
  any number of loader workers) sees exactly the batches an uninterrupted one
  would.  With ``deterministic: true`` (seeded, deterministic algorithms) a
  run killed and resumed ends with the same weights as an uninterrupted one
  (bitwise on CPU).
* Evaluation (both protocols) at the end of each step and every
  ``log.eval_every`` iterations; ``best.pt`` keeps the best standard mAP.
* Only rank 0 writes checkpoints and logs; OIM buffers are kept identical
  across ranks by the loss itself.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import time
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn

from .. import __version__
from . import checkpoint as ckpt_mod
from . import distributed as dist_mod
from .config import TrainConfig
from ..losses import OIMLoss
from .extract import autocast_dtype, evaluate_model

log = logging.getLogger("personvlad.engine")

__all__ = ["train", "build_optimizer", "StepSchedule", "load_dataset"]


# --------------------------------------------------------------------------- schedule
class StepSchedule:
    """lr = base_lr * gamma ** (step_iter // every) (constant when every == 0).
    ``state_dict`` is plain Python (weights_only safe)."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, gamma: float = 1.0, every: int = 0,
                 step_iter: int = 0) -> None:
        self.optimizer, self.base_lr, self.gamma, self.every = optimizer, float(base_lr), float(gamma), int(every)
        self.step_iter = int(step_iter)
        self._apply()

    def lr(self) -> float:
        if self.every <= 0:
            return self.base_lr
        return self.base_lr * self.gamma ** (self.step_iter // self.every)

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr()

    def step(self) -> None:
        self.step_iter += 1
        self._apply()

    def state_dict(self) -> Dict[str, Any]:
        return {"base_lr": self.base_lr, "gamma": self.gamma, "every": self.every, "step_iter": self.step_iter}

    def load_state_dict(self, s: Dict[str, Any]) -> None:
        self.base_lr, self.gamma, self.every = float(s["base_lr"]), float(s["gamma"]), int(s["every"])
        self.step_iter = int(s["step_iter"])
        self._apply()


def build_optimizer(params: List[nn.Parameter], cfg: TrainConfig, lr: float, device: torch.device):
    fused = {"on": True, "off": False, "auto": device.type == "cuda"}[cfg.optim.fused]
    kw = dict(lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    if fused:
        kw["fused"] = True
    return torch.optim.Adam(params, **kw)


# --------------------------------------------------------------------------- data
def load_dataset(cfg: TrainConfig, is_main: bool = True):
    """The dataset object (``.train/.query/.gallery/.num_train_pids``) of ``cfg.data``."""
    from ..data.readers import MARS, build_dataset

    d = cfg.data
    if d.dataset == "synthetic":
        if not d.root:
            raise ValueError("data.root: expected a folder for the synthetic data set, got ''")
        if is_main:
            from ..data.synth import ensure_generated

            try:
                if ensure_generated(d.root, preset=d.synth_preset, seed=d.synth_seed):
                    log.info("generated the synthetic data set (preset %s) in %s", d.synth_preset, d.root)
            except ValueError as e:
                raise ValueError(f"data.root: {e}") from None
        dist_mod.barrier()
        return MARS(d.root)
    if not d.root:
        raise ValueError(f"data.root: expected the {d.dataset} folder, got ''")
    return build_dataset(d.dataset, d.root, split_id=d.split_id)


class _KeyedSampler:
    """Wraps the identity-balanced batch sampler: yields batches of
    ``(tracklet_index, item_seed)`` from global batch ``start`` on, forever."""

    def __init__(self, sampler, seed: int, rank: int, start: int = 0, namespace: int = 0) -> None:
        self.sampler, self.seed, self.rank, self.start, self.ns = sampler, int(seed), int(rank), int(start), namespace

    def __iter__(self) -> Iterator[List[tuple]]:
        it = iter(self.sampler)
        for _ in range(self.start):
            next(it)
        b = self.start
        for batch in it:
            ss = np.random.SeedSequence([self.seed, self.ns, self.rank, b])
            seeds = ss.generate_state(len(batch), dtype=np.uint64)
            yield [(int(i), int(s) & 0x7FFF_FFFF_FFFF_FFFF) for i, s in zip(batch, seeds)]
            b += 1


class _KeyedDataset(torch.utils.data.Dataset):
    """``ds[(index, seed)]``: ``ds[index]`` drawn with the CPU generator seeded
    with ``seed`` (its state is restored afterwards; the CUDA generators are
    not touched: ``torch.manual_seed`` would reseed them too)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        idx, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.ds[idx]


def _train_loader(train_set, cfg: TrainConfig, model_cfg, rank: int, world: int, start_batch: int, *,
                  flip_p: Optional[float] = None, namespace: int = 0, pin: bool = False):
    from ..data.loader import TrainClipDataset
    from ..data.sampling import IdentityBalancedSampler

    d = cfg.data
    ds = TrainClipDataset(train_set, model_cfg.clip_len, (model_cfg.height, model_cfg.width),
                          flip_p=d.flip_p if flip_p is None else flip_p)
    sampler = IdentityBalancedSampler(ds.tracklets, d.num_ids, d.num_per_id, seed=cfg.seed + 7919 * namespace,
                                      rank=rank, world_size=world, infinite=True)
    keyed = _KeyedSampler(sampler, cfg.seed, rank, start_batch, namespace)
    kw: Dict[str, Any] = dict(num_workers=d.workers, pin_memory=pin, generator=torch.Generator().manual_seed(cfg.seed))
    if d.workers > 0:
        kw.update(persistent_workers=False, prefetch_factor=4)
    loader = torch.utils.data.DataLoader(_KeyedDataset(ds), batch_sampler=keyed, **kw)
    return loader, ds.stats


def _open_shards(dataset, cfg: TrainConfig, model_cfg):
    """The pre-packed uint8 store ``cfg.data.shards`` (:mod:`personvlad.data.shards`),
    checked: this data set's training split at the model's input size."""
    from ..data.shards import ShardStore

    d = cfg.data
    try:
        store = ShardStore(d.shards)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"data.shards: {e}") from None
    want = (model_cfg.height, model_cfg.width)
    if tuple(store.size) != want:
        raise ValueError(f"data.shards: {d.shards} holds {store.size[0]}x{store.size[1]} frames, the model takes "
                         f"{want[0]}x{want[1]}; pack it with `personvlad pack --size {want[0]}x{want[1]}`")
    packed = store.split("train")
    train = [t for t in dataset.train if len(t[0]) > 0]  # pack_dataset leaves empty tracklets out
    n_store, n_ds = len(packed["lengths"]), len(train)
    if store.num_train_pids != dataset.num_train_pids or n_store != n_ds:
        raise ValueError(f"data.shards: {d.shards} was packed from another data set ({n_store} training tracklets "
                         f"of {store.num_train_pids} ids; data.root has {n_ds} of {dataset.num_train_pids})")
    # Same counts are not enough: every iLIDS-VID / PRID split has the same
    # ones.  The tracklets themselves must match (id, length, first frame by
    # its last two path parts, so a moved data root still matches); another
    # split's store would put that split's test persons into training.
    def tail(path):
        return "/".join(os.path.normpath(str(path)).replace(os.sep, "/").split("/")[-2:])

    for i, (t, pid, n, first) in enumerate(zip(train, packed["pids"].tolist(), packed["lengths"].tolist(),
                                                packed["first_frame"].tolist())):
        if (int(t[1]), len(t[0]), tail(t[0][0])) != (pid, n, tail(first)):
            raise ValueError(f"data.shards: {d.shards} was packed from another data set or split: its training "
                             f"tracklet {i} is id {pid}, {n} frames from {tail(first)}; data.root's (split "
                             f"{d.split_id}) is id {t[1]}, {len(t[0])} frames from {tail(t[0][0])}; pack it again "
                             f"with `personvlad pack`")
    return store


def _shard_loader(store, cfg: TrainConfig, model_cfg, rank: int, world: int, start_batch: int,
                  device: torch.device):
    """Training clips from a shard store: no JPEG decoding, one host-to-device
    copy per batch, permute and flips on the device; batch ``i`` is the same
    whether the run was resumed or not."""
    from ..data.shards import ShardTrainLoader

    d = cfg.data
    loader = ShardTrainLoader(store, model_cfg.clip_len, d.num_ids, d.num_per_id, seed=cfg.seed, rank=rank,
                              world_size=world, flip_p=d.flip_p, device=device, threads=max(1, d.workers),
                              infinite=True, start_batch=start_batch, labels_on_host=True)
    return loader, loader.stats


# --------------------------------------------------------------------------- helpers
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _checkpoint_files(out_dir: str) -> List[str]:
    """The checkpoint files (``latest.pt``, ``ckpt_*.pt``) in ``out_dir``,
    loadable or not (``best.pt`` alone is a finished run's export)."""
    latest = os.path.join(out_dir, ckpt_mod.LATEST)
    return ([latest] if os.path.isfile(latest) else []) + list(ckpt_mod.list_snapshots(out_dir))


def _warn_config_changes(saved: Optional[Dict[str, Any]], cfg: TrainConfig) -> None:
    """Log the config keys a resumed run changes against its checkpoint's."""
    if not isinstance(saved, dict):
        return

    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "model":
                out.update(flat(v, f"{pre}{k}."))
            else:
                out[pre + k] = v
        return out

    from .config import _with_saved_before_defaults

    a, b = flat(_with_saved_before_defaults(saved)), flat(cfg.to_dict())
    if isinstance(saved.get("loss"), dict) and "skip_unwritten" not in saved["loss"] \
            and cfg.loss.name == "oim" and not cfg.loss.skip_unwritten:
        log.warning("the checkpoint was trained before loss.skip_unwritten existed, with OIM's unwritten queue "
                    "slots left out; this run counts them (SPEC §4). Pass --override loss.skip_unwritten=true "
                    "(or resume without --config) to go on as it was trained")
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if changed:
        log.warning("resuming with a config that differs from the checkpoint's in %s: %s",
                    len(changed), ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed))


def _check_device_config(cfg: TrainConfig, device: torch.device) -> None:
    """Settings that cannot work on this device, refused before anything runs."""
    if cfg.deterministic and device.type == "cuda" and not cfg.fuse_epilogues:
        raise ValueError(
            "deterministic: true on CUDA needs fuse_epilogues: true. PyTorch has no deterministic CUDA "
            "MaxPool3d backward (torch.use_deterministic_algorithms stops the first backward); the fused "
            "conv epilogue's pool backward is deterministic.")


def _set_deterministic(on: bool, device: torch.device) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True


class _Logs:
    """CSV logs (+ TensorBoard when importable) on rank 0."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.out_dir = out_dir
        self.tb = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception:  # ImportError, or a broken install
                log.info("tensorboard is not installed: TensorBoard logs skipped (CSV logs in %s)", out_dir)

    def drop_rows_after(self, iteration: int) -> None:
        """Remove the CSV rows of iterations after ``iteration`` (rewritten
        atomically; files without such rows are left untouched)."""
        if not self.enabled:
            return
        for name in ("train_log.csv", "eval_log.csv"):
            path = os.path.join(self.out_dir, name)
            if not os.path.isfile(path):
                continue
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if not rows or "iteration" not in rows[0]:
                continue
            col = rows[0].index("iteration")

            def keep(r):
                if len(r) != len(rows[0]):  # a row torn by a crash
                    return False
                try:
                    return int(r[col]) <= iteration
                except ValueError:
                    return False

            kept = [rows[0]] + [r for r in rows[1:] if keep(r)]
            if len(kept) == len(rows):
                continue
            buf = io.StringIO()
            csv.writer(buf).writerows(kept)
            ckpt_mod.atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
            log.info("%s: dropped %d row(s) after iteration %d", name, len(rows) - len(kept), iteration)

    def _row(self, name: str, row: Dict[str, Any]) -> None:
        path = os.path.join(self.out_dir, name)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def train_row(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._row("train_log.csv", row)
        if self.tb is not None:
            it = row["iteration"]
            for k in ("loss", "lr", "clips_per_s"):
                self.tb.add_scalar(f"train/{k}", row[k], it)

    def eval_row(self, it: int, step: int, metrics: Dict[str, Dict[str, float]]) -> None:
        if not self.enabled:
            return
        row: Dict[str, Any] = {"iteration": it, "step": step}
        for proto, vals in metrics.items():
            for k, v in vals.items():
                row[f"{proto}_{k}"] = round(v, 6)
        self._row("eval_log.csv", row)
        if self.tb is not None:
            for proto, vals in metrics.items():
                for k, v in vals.items():
                    self.tb.add_scalar(f"eval_{proto}/{k}", v, it)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------- train
class _TrainModule(nn.Module):
    """model + criterion: what DDP wraps (so classifier losses are synced too)."""

    def __init__(self, model: nn.Module, criterion: nn.Module, triplet: Optional[nn.Module], triplet_weight: float,
                 amp_dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        self.model, self.criterion, self.triplet = model, criterion, triplet
        self.triplet_weight, self.amp_dtype = triplet_weight, amp_dtype

    def forward(self, clips: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        dev = clips.device.type
        with torch.autocast(device_type=dev, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            feats = self.model(clips)
        feats = feats.float()
        # OIM takes host labels (no device sync); the other losses want them on the device
        oim = isinstance(self.criterion, OIMLoss)
        tri = self.triplet is not None and self.triplet_weight > 0
        dev_pids = pids.to(feats.device, non_blocking=True) if (tri or not oim) else None
        loss = self.criterion(feats, pids if oim else dev_pids)
        if tri:
            loss = loss + self.triplet_weight * self.triplet(feats, dev_pids)
        return loss


def _criterion(cfg: TrainConfig, dim: int, num_ids: int):
    from ..losses import BatchHardTripletLoss, build_loss

    lc = cfg.loss
    crit = build_loss(lc.name, dim, num_ids, queue_size=lc.queue_size, temperature=lc.temperature,
                      momentum=lc.momentum, num_sampled=lc.num_sampled, margin=lc.margin,
                      skip_unwritten=lc.skip_unwritten)
    tri = BatchHardTripletLoss(lc.margin) if (lc.triplet_weight > 0 and lc.name != "triplet") else None
    return crit, tri


def _step_params(model: nn.Module, criterion: nn.Module, step: int, cfg: TrainConfig) -> List[nn.Parameter]:
    frozen = {id(p) for p in model.center_parameters()} if (step == 1 and cfg.schedule.step1_freeze_centers) else set()
    params = []
    for p in list(model.parameters()) + list(criterion.parameters()):
        p.requires_grad_(id(p) not in frozen)
        if id(p) not in frozen:
            params.append(p)
    return params


def _init_centers(model, train_set, cfg: TrainConfig, model_cfg, device: torch.device) -> None:
    from ..models import init_centers_from

    loader, _ = _train_loader(train_set, cfg, model_cfg, rank=0, world=1, start_batch=0, flip_p=0.0, namespace=1)

    def batches():
        for i, (clips, _, _) in enumerate(loader):
            if i >= cfg.schedule.kmeans_batches:
                return
            yield clips.to(device).float().div_(255.0)

    # fp32 throughout: the k-means distances must not run under bf16 autocast
    init_centers_from(model, batches(), num_descriptors=cfg.schedule.kmeans_descriptors, seed=cfg.seed)


class _Timings:
    """Wall times of a run's parts, for :func:`personvlad.engine.estimate.project_schedule`.

    Iterations are timed on the host from asking the loader for a batch to
    the end of the optimizer step.  The host waits for the GPU only at log,
    checkpoint and evaluation points and at the end of each step's warm-up,
    so between those points the times add up to what the GPU took (the host
    runs ahead by at most its launch queue); a data path that cannot keep up
    shows in them too.  The first ``warmup`` iterations of each
    step's segment (cuDNN algorithm search, Triton autotuning, lazy
    initialisation, the loader's first batches) are kept apart from the
    steady state.  Checkpoints and evaluations are timed on their own."""

    def __init__(self, warmup: int = 10):
        self.warmup = warmup
        self.t0 = time.perf_counter()
        self.kmeans_s: Optional[float] = None
        self.setup_s: Optional[float] = None
        self.segment: Dict[int, int] = {}      # step -> iterations seen in this run's segment of it
        self.warm = {1: [0, 0.0], 2: [0, 0.0]}  # step -> [iterations, seconds]
        self.steady = {1: [0, 0.0], 2: [0, 0.0]}
        self.ckpt_s: List[float] = []
        self.eval_s: List[float] = []

    def iteration(self, step: int, seconds: float) -> None:
        n = self.segment.get(step, 0)
        self.segment[step] = n + 1
        slot = self.warm if n < self.warmup else self.steady
        slot[step][0] += 1
        slot[step][1] += seconds

    def as_dict(self) -> Dict[str, Any]:
        st = lambda d: {str(k): {"iterations": v[0], "seconds": v[1]} for k, v in d.items()}  # noqa: E731
        return dict(warmup_iterations=self.warmup, kmeans_s=self.kmeans_s, setup_s=self.setup_s,
                    warmup=st(self.warm), steady=st(self.steady), checkpoint_s=list(self.ckpt_s),
                    eval_s=list(self.eval_s), total_s=time.perf_counter() - self.t0)


def train(config: TrainConfig, out_dir: str, resume: bool = False, *, progress: Optional[bool] = None,
          stop_after: Optional[int] = None, evaluate: bool = True) -> Dict[str, Any]:
    """Train per ``config`` into ``out_dir``; returns a summary dict
    (iterations, first/last logged loss, last and best metrics, paths).

    ``resume=True`` continues from the newest checkpoint in ``out_dir``
    (starting fresh when there is none); without it an ``out_dir`` that
    already holds a checkpoint is refused.  ``stop_after`` ends the run after
    that many iterations in total (the schedule is unchanged; a checkpoint is
    written), e.g. to split a run in pieces.  ``evaluate=False`` skips the
    evaluations (no ``best.pt``; for timing probes, see
    :mod:`personvlad.engine.estimate`).  The summary's ``timings`` holds the
    wall times of k-means, iterations (warm-up and steady, per step),
    checkpoints and evaluations.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
    config.validate()  # again: fields may have been set after construction
    cfg = config
    dinfo = dist_mod.setup(cfg.device)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    finished = False
    try:
        summary = _train(cfg, out_dir, resume, dinfo, progress, stop_after, evaluate)
        finished = True  # past _train's closing barrier: every rank got there
        return summary
    finally:
        # leave the process-wide switches as they were
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]
        dist_mod.cleanup(dinfo, drain=finished)


def _train(cfg: TrainConfig, out_dir: str, resume: bool, dinfo, progress, stop_after,
           evaluate: bool = True) -> Dict[str, Any]:
    from ..models import PersonVLADNet

    timings = _Timings()
    device, rank, world, main = dinfo.device, dinfo.rank, dinfo.world_size, dinfo.is_main
    _check_device_config(cfg, device)
    _set_deterministic(cfg.deterministic, device)
    _seed_all(cfg.seed)
    os.makedirs(out_dir, exist_ok=True)

    state = None
    present = _checkpoint_files(out_dir)
    if resume:
        path = ckpt_mod.find_latest(out_dir)
        if path is None and present:
            # starting fresh would overwrite them at the first save
            raise ValueError(f"out_dir: --resume found no loadable checkpoint among {present} (see the warnings "
                             f"above); move them away to start afresh, or restore a good copy")
        if path is None:
            log.info("--resume: no checkpoint in %s, starting fresh", out_dir)
        else:
            state = ckpt_mod.load_checkpoint(path, map_location="cpu")
            log.info("resuming from %s (iteration %d, step %d)", path, state["iteration"], state["step"])
            _warn_config_changes(state.get("config"), cfg)
    elif present:
        raise ValueError(f"out_dir: {out_dir} already holds checkpoint files {present}; pass resume=True "
                         f"(--resume) or choose another output folder")
    dist_mod.barrier()

    dataset = load_dataset(cfg, main)
    model_cfg = cfg.model_config()
    shards = _open_shards(dataset, cfg, model_cfg) if cfg.data.shards else None
    model = PersonVLADNet(model_cfg)
    crit, tri = _criterion(cfg, model.output_dim, dataset.num_train_pids)
    if cfg.init_from and state is None:
        src = ckpt_mod.load_checkpoint(cfg.init_from, map_location="cpu")
        try:
            model.load_state_dict(src["model"])
        except RuntimeError as e:
            raise ValueError(f"init_from: {cfg.init_from} does not match the model config: {e}") from None
        log.info("initialised the model from %s", cfg.init_from)
    model.to(device)
    crit.to(device)
    if tri is not None:
        tri.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    if cfg.fuse_epilogues:
        from ..perf import count_fused, fuse_conv_relu_pool

        # in place, same parameters and state_dict keys: checkpoints load either way
        fuse_conv_relu_pool(model)
        log.info("fused the bias + ReLU (+ max pool) epilogues of %d convolutions", count_fused(model))
    amp_dtype = autocast_dtype(device, cfg.amp)
    if amp_dtype is not None and device.type == "cuda":
        from ..perf import guard_cudnn_3d

        guard_cudnn_3d(device, cfg.channels_last)  # warns once where half 3D convs skip cuDNN

    s1, s2 = cfg.schedule.step1_iters, cfg.schedule.step2_iters
    total = s1 + s2
    start_it = 0
    best = {"metric": "standard.mAP", "value": -1.0, "iteration": -1}
    metrics: Dict[str, Any] = {}
    if state is not None:
        model.load_state_dict(state["model"])
        crit.load_state_dict(state["loss"])
        start_it = int(state["iteration"])
        best = dict(state.get("best", best))
        metrics = dict(state.get("metrics", {}))
    elif cfg.schedule.kmeans_init and s1 > 0 and model_cfg.head == "vlad":
        if main:
            t0 = time.perf_counter()
            _init_centers(model, dataset.train, cfg, model_cfg, device)
            timings.kmeans_s = time.perf_counter() - t0
            log.info("k-means initialised the VLAD centers (%.1fs)", timings.kmeans_s)
        if world > 1:
            for p in model.center_parameters():
                torch.distributed.broadcast(p.data, 0)

    if cfg.compile != "off":
        # in place (nn.Module.compile): parameters and state_dict keys are the
        # model's own, so checkpoints load with or without compilation
        model.compile(mode=cfg.compile)
        log.info("model compiled (torch.compile mode %s); the first iterations include compilation", cfg.compile)

    logs = _Logs(out_dir, main, cfg.log.tensorboard)
    if main:
        # a crash mid-write must not leave a truncated config.yaml (whose
        # missing keys would read as defaults)
        ckpt_mod.atomic_write_bytes(os.path.join(out_dir, "config.yaml"), cfg.to_yaml().encode("utf-8"))
        # rows past the checkpoint resumed from (logged before a crash) are
        # logged again by this run: drop them, and all rows of a fresh start
        logs.drop_rows_after(start_it)

    def step_of(it: int) -> int:
        return 1 if it < s1 else 2

    def setup_step(step: int, step_iter: int):
        params = _step_params(model, crit, step, cfg)
        lr = cfg.schedule.step1_lr if step == 1 else cfg.schedule.step2_lr
        opt = build_optimizer(params, cfg, lr, device)
        sc = cfg.schedule
        sched = StepSchedule(opt, lr, sc.step1_gamma if step == 1 else sc.step2_gamma,
                             sc.step1_decay_every if step == 1 else sc.step2_decay_every, step_iter)
        module = _TrainModule(model, crit, tri, cfg.loss.triplet_weight, amp_dtype)
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        return opt, sched, module

    step = step_of(start_it) if start_it < total else 2
    opt, sched, net = setup_step(step, start_it - (s1 if step == 2 else 0))
    if state is not None and start_it < total:
        if int(state["step"]) == step:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        rngs = state.get("rng_ranks") or []
        if len(rngs) == world:
            ckpt_mod.restore_rng(rngs[rank])
        else:
            if world > 1 or len(rngs) > 1:
                log.warning("checkpoint RNG states are for %d rank(s), this run has %d: using rank 0's",
                            len(rngs), world)
            ckpt_mod.restore_rng(state["rng"])

    def gather_rng():
        mine = ckpt_mod.capture_rng()
        if world > 1:
            allr: List[Any] = [None] * world
            torch.distributed.all_gather_object(allr, mine)
            return allr
        return [mine]

    def save(it: int, step: int, path_name: str = ckpt_mod.LATEST) -> None:
        rngs = gather_rng()  # every rank takes part
        if not main:
            return
        st = {
            "format": ckpt_mod.FORMAT, "version": __version__, "iteration": it, "step": step,
            "model": model.state_dict(), "model_config": model_cfg.to_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "loss": crit.state_dict(),
            "rng": rngs[0], "rng_ranks": rngs, "config": cfg.to_dict(), "best": dict(best),
            "metrics": metrics, "world_size": world,
        }
        target = os.path.join(out_dir, path_name)
        t0 = time.perf_counter()
        ckpt_mod.save_checkpoint(st, target)
        if path_name == ckpt_mod.LATEST:  # best.pt saves count with their evaluation
            timings.ckpt_s.append(time.perf_counter() - t0)
        if path_name == ckpt_mod.LATEST and cfg.log.keep_checkpoints > 0:
            ckpt_mod.keep_snapshot(target, it, cfg.log.keep_checkpoints)

    def run_eval(it: int, step: int) -> None:
        nonlocal metrics
        improved = False
        if main:
            t0 = time.perf_counter()
            metrics = evaluate_model(model, dataset, stride=cfg.data.test_stride, batch_size=cfg.data.test_batch_size,
                                     workers=min(cfg.data.workers, 4), amp=cfg.amp)
            model.train()
            logs.eval_row(it, step, metrics)
            m = metrics["standard"]
            log.info("eval @%d: standard mAP %.4f rank-1 %.4f | mars mAP %.4f rank-1 %.4f (%.1fs)", it, m["mAP"],
                     m["rank1"], metrics["mars"]["mAP"], metrics["mars"]["rank1"], time.perf_counter() - t0)
            if m["mAP"] > best["value"]:
                best.update(value=m["mAP"], iteration=it, metrics=metrics)
                improved = True
        metrics, best_now, improved = dist_mod.broadcast_object((metrics, dict(best), improved))
        best.update(best_now)
        if improved:
            save(it, step, ckpt_mod.BEST)  # collective (RNG gather); rank 0 writes

    end = total if stop_after is None else min(total, int(stop_after))
    show = main and (cfg.log.progress if progress is None else progress)
    bar = None
    if show and start_it < end:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=start_it, desc="train", unit="it", dynamic_ncols=True)

    model.train()
    batch_clips = cfg.data.num_ids * cfg.data.num_per_id
    if shards is not None:
        loader, stats = _shard_loader(shards, cfg, model_cfg, rank, world, start_it, device)
    else:
        loader, stats = _train_loader(dataset.train, cfg, model_cfg, rank, world, start_it,
                                      pin=device.type == "cuda")
    data_iter = iter(loader) if start_it < end else None
    timings.setup_s = time.perf_counter() - timings.t0 - (timings.kmeans_s or 0.0)
    lsum: Optional[torch.Tensor] = None  # the loss summed on the device since the last log row
    nsum = 0
    lv = 0.0
    history: List[Dict[str, float]] = []
    t_last = time.time()
    it_last = start_it
    it = start_it
    while it < end:
        s = step_of(it)
        if s != step:  # step 1 -> step 2: unfreeze the centers, fresh optimizer
            step = s
            opt, sched, net = setup_step(step, 0)
            log.info("step 2: joint fine-tuning of all parameters at lr %g", cfg.schedule.step2_lr)
        t_it = time.perf_counter()
        clips, pids, _ = next(data_iter)
        clips = clips.to(device, non_blocking=True).float().div_(255.0)
        if device.type == "cuda" and cfg.channels_last:
            clips = clips.contiguous(memory_format=torch.channels_last_3d)
        loss = net(clips, pids)  # pids stay on the host: the OIM loss decides on them without a sync
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.optim.grad_clip)
        lr_now = sched.lr()
        opt.step()
        sched.step()
        it += 1
        # The loss is summed on the device and read back only where the host
        # has to wait anyway (log, checkpoint, evaluation, the end, the end of
        # a step's warm-up for the timings): no sync per iteration, so the
        # host queues the next iteration while the GPU runs this one.
        lsum = loss.detach().double() if lsum is None else lsum + loss.detach().double()
        nsum += 1
        log_now = it % cfg.log.log_every == 0 or it == end
        step_end = it == s1 or it == total
        if (log_now or step_end or (cfg.log.ckpt_every and it % cfg.log.ckpt_every == 0)
                or (evaluate and cfg.log.eval_every and it % cfg.log.eval_every == 0)
                or timings.segment.get(step, 0) + 1 == timings.warmup):
            lv = float(lsum)  # waits for the GPU
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss became {lv / nsum} in iterations {it - nsum + 1}..{it}; "
                                         f"lower the lr or enable optim.grad_clip")
        timings.iteration(step, time.perf_counter() - t_it)
        if bar is not None:
            bar.update(1)
        if log_now:
            now = time.time()
            cps = (it - it_last) * batch_clips * world / max(now - t_last, 1e-9)
            mean_loss = dist_mod.all_reduce_mean(lv / nsum, device)
            row = {"iteration": it, "step": step, "loss": round(mean_loss, 6), "lr": lr_now,
                   "clips_per_s": round(cps, 2), "time": round(now, 3)}
            history.append({"iteration": it, "loss": mean_loss})
            logs.train_row(row)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}", clips_s=f"{cps:.1f}", step=step)
            lsum, nsum, t_last, it_last = None, 0, now, it
        if evaluate and (step_end or (cfg.log.eval_every and it % cfg.log.eval_every == 0)):
            t0 = time.perf_counter()
            run_eval(it, step)  # with the best.pt save it may make
            timings.eval_s.append(time.perf_counter() - t0)
        if step_end or it == end or (cfg.log.ckpt_every and it % cfg.log.ckpt_every == 0):
            save(it, step)
    if bar is not None:
        bar.close()
    stats.log_summary()
    logs.close()
    dist_mod.barrier()
    return {
        "out_dir": out_dir, "iterations": it, "total_iterations": total, "resumed_from": start_it if state else None,
        "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
        "history": history, "metrics": metrics, "best": best,
        "checkpoint": os.path.join(out_dir, ckpt_mod.LATEST), "best_checkpoint": os.path.join(out_dir, ckpt_mod.BEST),
        "world_size": world,
        "loss_checksum": [float(t.double().sum()) for t in crit.state_dict().values()],
        "model_checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
        "timings": timings.as_dict(),
    }
