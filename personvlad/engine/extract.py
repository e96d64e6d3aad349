"""Tracklet feature extraction and the feature file (INTERFACES.md).

Every tracklet is cut into clips of ``clip_len`` frames every ``stride``
frames (:func:`personvlad.data.sampling.test_clip_indices`; short tracklets
loop), each clip gets a descriptor, and the tracklet activation is the mean
of its clip descriptors, L2-normalised.  Batched, bf16 autocast on CUDA.

The ``.npz`` written by :func:`extract_features` holds, for split in
{query, gallery} (and train with ``include_train``):
``{split}_feats (n, D) float32``, ``{split}_pids (n,) int64``,
``{split}_camids (n,) int64``, ``{split}_clip_feats (total_clips, D) float32``,
``{split}_clip_counts (n,) int64``, ``{split}_first_frame (n,) str``, plus
``meta``: a JSON string (dataset, checkpoint, model config, clip_len, stride).
"""
from __future__ import annotations

import copy
import json
import logging
import numbers
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..perf import cudnn_benchmark_scope

log = logging.getLogger("personvlad.engine")

__all__ = ["extract_split", "extract_features", "describe_frames", "load_model_from_checkpoint",
           "autocast_dtype", "evaluate_model"]


def autocast_dtype(device: torch.device, amp: str = "auto") -> Optional[torch.dtype]:
    """bf16 on CUDA (amp="auto"), none (fp32) on CPU; ``amp`` in auto|bf16|fp32."""
    if amp not in ("auto", "bf16", "fp32"):
        raise ValueError(f"amp: expected auto|bf16|fp32, got {amp!r}")
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def load_model_from_checkpoint(path: str, device: Union[str, torch.device] = "cpu"):
    """The PersonVLADNet stored in a training (or model) checkpoint, in eval mode."""
    from ..models import model_from_state
    from .checkpoint import load_checkpoint

    state = load_checkpoint(path, map_location="cpu")
    if "model_config" not in state:
        raise ValueError(f"{path}: expected a checkpoint with 'model_config' (written by personvlad train), "
                         f"got keys {sorted(state)}")
    model = model_from_state({"model_config": state["model_config"], "model": state["model"]})
    return model.to(device).eval()


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def _descriptors(model, clips: torch.Tensor, device, dtype, channels_last: bool) -> torch.Tensor:
    x = clips.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    # cuDNN's benchmark mode, as in training: the batches have one shape but
    # the last, so each split costs two algorithm searches
    with cudnn_benchmark_scope(), \
            torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        d = model(x)
    return d.float()


@torch.no_grad()
def extract_split(model, tracklets: Sequence, clip_len: Optional[int] = None, size=None, stride: int = 8,
                  batch_size: int = 32, workers: int = 2, amp: str = "auto", progress: bool = True,
                  desc: str = "extract", channels_last: bool = True,
                  frame_stats: Optional[Dict[str, int]] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tracklet feats (n, D), clip feats (total, D), clip counts (n,)) for
    ``tracklets`` (list of (frame_paths, pid, camid)); row ``i`` is
    ``tracklets[i]``.  An empty tracklet (no frames) is a ValueError.
    ``frame_stats``: a dict to receive the frame counts (``frames``,
    ``bad_frames``, ``unreadable_clips``: clips with no decodable frame,
    zero-filled)."""
    from ..data.loader import build_test_loader

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride: expected an int >= 1, got {stride!r}")
    # The test loader drops empty tracklets and renumbers the rest, which would
    # put features on the wrong rows here: refuse them (the readers never
    # produce one -- MARS/iLIDS-VID/PRID drop theirs with a warning).
    for i, t in enumerate(tracklets):
        if isinstance(t, (list, tuple)) and len(t) == 3 and len(t[0]) == 0:
            raise ValueError(f"tracklets[{i}]: empty tracklet (pid {t[1]}, cam {t[2]}): expected >= 1 frame")
    cfg = model.config
    if clip_len is None:
        clip_len = cfg.clip_len
    if isinstance(clip_len, bool) or not isinstance(clip_len, numbers.Integral) or clip_len < 1:
        raise ValueError(f"clip_len: expected None (the model's) or an int >= 1, got {clip_len!r}")
    clip_len = int(clip_len)
    size = size or (cfg.height, cfg.width)
    device = _device_of(model)
    dtype = autocast_dtype(device, amp)
    D = model.output_dim
    n = len(tracklets)
    if n == 0:
        return (np.zeros((0, D), np.float32), np.zeros((0, D), np.float32), np.zeros((0,), np.int64))
    loader = build_test_loader(list(tracklets), clip_len=clip_len, size=size, stride=stride, mode="all",
                               batch_size=batch_size, workers=workers)
    if len(loader.dataset.tracklets) != n:  # pragma: no cover - guarded above
        raise RuntimeError(f"extract: expected {n} tracklets in the test loader, got {len(loader.dataset.tracklets)}")
    counts = np.asarray(loader.dataset.clip_counts, dtype=np.int64)
    total = int(counts.sum())
    clip_feats = torch.empty(total, D, dtype=torch.float32)
    sums = torch.zeros(n, D, dtype=torch.float64)
    was_training = model.training
    model.eval()
    pos = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="clip", leave=False, dynamic_ncols=True)
    try:
        for clips, tidx in loader:
            d = _descriptors(model, clips, device, dtype, channels_last).cpu()
            k = d.shape[0]
            clip_feats[pos:pos + k] = d
            sums.index_add_(0, tidx.long(), d.double())
            pos += k
            if bar is not None:
                bar.update(k)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if pos != total:
        raise RuntimeError(f"extract: expected {total} clips from the test loader, got {pos}")
    if frame_stats is not None:  # frames / bad_frames / unreadable_clips, for the caller
        frame_stats.update(loader.stats.totals())
    mean = sums / torch.from_numpy(counts).clamp_min(1).double()[:, None]
    feats = torch.nn.functional.normalize(mean, dim=1).float()
    return feats.numpy(), clip_feats.numpy(), counts


def _split_arrays(prefix: str, tracklets, feats, clip_feats, counts) -> Dict[str, np.ndarray]:
    return {
        f"{prefix}_feats": np.ascontiguousarray(feats, dtype=np.float32),
        f"{prefix}_pids": np.asarray([int(t[1]) for t in tracklets], dtype=np.int64),
        f"{prefix}_camids": np.asarray([int(t[2]) for t in tracklets], dtype=np.int64),
        f"{prefix}_clip_feats": np.ascontiguousarray(clip_feats, dtype=np.float32),
        f"{prefix}_clip_counts": np.asarray(counts, dtype=np.int64),
        f"{prefix}_first_frame": np.asarray([str(t[0][0]) for t in tracklets], dtype=np.str_),
    }


def extract_features(model, dataset, out_path: str, *, include_train: bool = False, batch_size: int = 32,
                     clip_len: Optional[int] = None, stride: int = 8, workers: int = 2, amp: str = "auto",
                     progress: bool = True, meta: Optional[Dict[str, Any]] = None) -> Dict[str, np.ndarray]:
    """Extract query/gallery (and train) tracklet features of ``dataset`` (an
    object with ``.query``, ``.gallery``, ``.train`` lists) with ``model`` and
    write them to ``out_path`` (.npz, INTERFACES.md layout, written atomically).
    Returns the arrays written."""
    from .checkpoint import _atomic

    if not str(out_path).endswith(".npz"):  # before hours of extraction, not after
        raise ValueError(f"out_path: expected a file name ending in .npz, got {out_path!r}")
    if os.path.isdir(out_path):
        raise ValueError(f"out_path: {out_path} is a directory; expected a .npz file name")
    splits = [("query", dataset.query), ("gallery", dataset.gallery)]
    if include_train:
        splits.append(("train", dataset.train))
    arrays: Dict[str, np.ndarray] = {}
    for name, tracklets in splits:
        f, cf, cnt = extract_split(model, tracklets, clip_len=clip_len, stride=stride, batch_size=batch_size,
                                   workers=workers, amp=amp, progress=progress, desc=f"extract {name}")
        arrays.update(_split_arrays(name, tracklets, f, cf, cnt))
    info = dict(meta or {})
    info.setdefault("model_config", model.config.to_dict())
    info.setdefault("clip_len", int(clip_len or model.config.clip_len))
    info.setdefault("stride", int(stride))
    arrays["meta"] = np.asarray(json.dumps(info))

    def write(f):
        np.savez(f, **arrays)

    _atomic(str(out_path), write)
    return arrays


@torch.no_grad()
def describe_frames(checkpoint_or_model, frame_paths: Sequence[str], *, clip_len: Optional[int] = None,
                    stride: int = 8, batch_size: int = 32, device: Optional[Union[str, torch.device]] = None,
                    amp: str = "auto") -> np.ndarray:
    """The (D,) float32 L2-normalised activation of one tracklet given as
    frame paths (in order): clips every ``stride`` frames, mean, L2 — the same
    computation as :func:`extract_features`.  ``checkpoint_or_model`` is a
    checkpoint path or a PersonVLADNet."""
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model_from_checkpoint(os.fspath(checkpoint_or_model), dev)
    else:
        model = checkpoint_or_model
        if device is not None and torch.device(device) != _device_of(model):
            model = copy.deepcopy(model).to(device)  # the caller's model stays where it is
    paths = [str(p) for p in frame_paths]
    if not paths:
        raise ValueError("frame_paths: expected at least one frame path, got none")
    stats: Dict[str, int] = {}
    feats, _, counts = extract_split(model, [(tuple(paths), 0, 0)], clip_len=clip_len, stride=stride,
                                     batch_size=batch_size, workers=0, amp=amp, progress=False, frame_stats=stats)
    if stats.get("unreadable_clips", 0) >= int(counts.sum()):
        # every clip zero-filled: the descriptor would describe nothing
        raise ValueError(f"frame_paths: none of the {len(paths)} frames could be decoded as an image "
                         f"(e.g. {paths[0]})")
    return feats[0]


def evaluate_model(model, dataset, *, clip_len: Optional[int] = None, stride: int = 8, batch_size: int = 32,
                   workers: int = 2, amp: str = "auto", progress: bool = False,
                   ranks: Sequence[int] = (1, 5, 10, 20)) -> Dict[str, Dict[str, float]]:
    """Extract query/gallery features and evaluate both protocols (SPEC §3):
    ``{"standard": {"mAP", "rank1", ...}, "mars": {...}}``."""
    from ..eval import compute_distmat, evaluate

    qf, _, _ = extract_split(model, dataset.query, clip_len=clip_len, stride=stride, batch_size=batch_size,
                             workers=workers, amp=amp, progress=progress, desc="eval query")
    gf, _, _ = extract_split(model, dataset.gallery, clip_len=clip_len, stride=stride, batch_size=batch_size,
                             workers=workers, amp=amp, progress=progress, desc="eval gallery")
    qp = np.asarray([t[1] for t in dataset.query], np.int64)
    gp = np.asarray([t[1] for t in dataset.gallery], np.int64)
    qc = np.asarray([t[2] for t in dataset.query], np.int64)
    gc = np.asarray([t[2] for t in dataset.gallery], np.int64)
    dist = compute_distmat(qf, gf, device=str(_device_of(model)))
    out: Dict[str, Dict[str, float]] = {}
    for protocol in ("standard", "mars"):
        cmc, mAP = evaluate(dist, qp, gp, qc, gc, max_rank=max(ranks), protocol=protocol)
        row = {"mAP": float(mAP)}
        for r in ranks:
            row[f"rank{r}"] = float(cmc[min(r, len(cmc)) - 1])
        out[protocol] = row
    return out
