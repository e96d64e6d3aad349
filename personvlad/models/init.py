"""k-means initialisation of the VLAD centers from backbone features."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["collect_descriptors", "init_centers_from"]


def _first_param_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def collect_descriptors(
    model: nn.Module,
    clips_iterable: Iterable,
    num_descriptors: int = 50_000,
    per_batch: Optional[int] = None,
    seed: int = 0,
) -> torch.Tensor:
    """Raw local feature vectors (M, D) of the backbone map, M <= num_descriptors.

    Runs ``model.features`` (eval mode, no grad) on the batches of
    ``clips_iterable`` — float clips in [0, 1] or uint8 clips (divided by 255),
    either a tensor or a tuple/list whose first item is the clip tensor (so a
    ``(clips, pids, camids)`` loader works) — and takes every T'xH'xW' cell's
    D-vector as a descriptor (no part reweighting).  Each batch contributes at
    most ``per_batch`` randomly chosen vectors (default: all of them);
    iteration stops once ``num_descriptors`` are gathered, and the result is a
    random subset of exactly that many (fewer if the iterable ran out).  Pass a
    shuffled loader for a representative sample.  Returns float32 on the
    model's device.
    """
    if not isinstance(num_descriptors, int) or num_descriptors < 1:
        raise ValueError(f"num_descriptors: expected an int >= 1, got {num_descriptors!r}")
    if per_batch is not None and (not isinstance(per_batch, int) or per_batch < 1):
        raise ValueError(f"per_batch: expected None or an int >= 1, got {per_batch!r}")
    device = _first_param_device(model)
    gen = torch.Generator().manual_seed(seed)
    chunks, total = [], 0
    was_training = model.training
    model.eval()
    try:
        for batch in clips_iterable:
            clips = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(clips, torch.Tensor):
                raise ValueError(f"clips_iterable: expected batches of clip tensors, got {type(clips).__name__}")
            clips = clips.to(device, non_blocking=True)
            f = model.features(clips).float()  # (N, D, T', H', W')
            d = f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1])  # (N*P, D)
            if per_batch is not None and d.shape[0] > per_batch:
                d = d[torch.randperm(d.shape[0], generator=gen)[:per_batch].to(d.device)]
            chunks.append(d)
            total += d.shape[0]
            if total >= num_descriptors:
                break
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("clips_iterable: expected at least one batch of clips, got none")
    desc = torch.cat(chunks)
    if desc.shape[0] > num_descriptors:
        desc = desc[torch.randperm(desc.shape[0], generator=gen)[:num_descriptors].to(desc.device)]
    return desc


def init_centers_from(
    model: nn.Module,
    clips_iterable: Iterable,
    num_descriptors: int = 50_000,
    per_batch: Optional[int] = None,
    iters: int = 50,
    seed: int = 0,
) -> nn.Module:
    """k-means-initialise the VLAD layer of ``model`` (a PersonVLADNet with
    ``head="vlad"``) from raw backbone descriptors of ``clips_iterable``.

    Collects descriptors with :func:`collect_descriptors` (see it for the
    batch formats and sampling), then calls ``PersonVLAD.init_centers``
    (k-means++ seeded k-means, ``iters`` iterations, ``seed``), which sets the
    centers ``c`` and ``W = 2 alpha c``, ``z = -alpha |c|^2``.  Returns ``model``.
    """
    head = getattr(model, "head", None)
    vlad = getattr(head, "vlad", None)
    if vlad is None or not hasattr(vlad, "init_centers"):
        cfg = getattr(model, "config", None)
        raise ValueError(f"model: expected a PersonVLADNet with head='vlad', got head={getattr(cfg, 'head', None)!r}")
    desc = collect_descriptors(model, clips_iterable, num_descriptors=num_descriptors, per_batch=per_batch, seed=seed)
    if desc.shape[0] < vlad.num_clusters:
        raise ValueError(f"clips_iterable: expected at least num_clusters={vlad.num_clusters} descriptors, "
                         f"got {desc.shape[0]}")
    vlad.init_centers(desc, iters=iters, seed=seed)
    return model
