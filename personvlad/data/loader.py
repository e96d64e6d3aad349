"""DataLoader-based clip pipelines (the JPEG path).

Training: :class:`TrainClipDataset` + :class:`IdentityBalancedSampler` ->
batches ``(clips uint8 (P*K, 3, T, H, W), pids (P*K,), camids (P*K,))``.
Testing: :class:`TestClipDataset` -> ``(clips uint8 (N, 3, T, H, W), tracklet_idx (N,))``.
The fast GPU path over pre-packed shards is in :mod:`personvlad.data.shards`.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .frames import FrameStats, parse_size, read_clip
from .sampling import IdentityBalancedSampler, random_test_clip, test_clip_indices, train_clip_indices

log = logging.getLogger("personvlad.data")


def _check_tracklets(tracklets, name="tracklets"):
    if not isinstance(tracklets, (list, tuple)):
        raise ValueError(f"{name}: expected a list of (frame_paths, pid, camid); got {type(tracklets).__name__}")
    out = []
    dropped = 0
    for t in tracklets:
        if not (isinstance(t, (list, tuple)) and len(t) == 3):
            raise ValueError(f"{name}: expected (frame_paths, pid, camid) items; got {t!r:.80}")
        if isinstance(t[0], (str, bytes, os.PathLike)):  # would be split into one-character "frames"
            raise ValueError(f"{name}: expected frame_paths to be a sequence of paths, got one path {t[0]!r:.80}")
        if len(t[0]) == 0:
            dropped += 1
            continue
        out.append((tuple(t[0]), int(t[1]), int(t[2])))
    if dropped:
        log.warning("%s: dropped %d empty tracklet(s)", name, dropped)
    return out


class TrainClipDataset(Dataset):
    """Item ``i`` -> (random ``clip_len``-frame clip of tracklet ``i`` as uint8
    ``(3, T, H, W)``, pid, camid); horizontal flip with probability ``flip_p``.
    Randomness comes from torch's RNG in DataLoader workers (which the loader
    seeds) and from ``generator`` in the main process (``workers=0``; None:
    torch's global RNG)."""

    def __init__(self, tracklets, clip_len: int, size=(64, 32), flip_p: float = 0.5,
                 stats: Optional[FrameStats] = None, generator: Optional[torch.Generator] = None):
        if not 0.0 <= float(flip_p) <= 1.0:
            raise ValueError(f"flip_p: expected a probability in [0, 1]; got {flip_p}")
        if not isinstance(clip_len, int) or clip_len < 1:
            raise ValueError(f"clip_len: expected a positive integer; got {clip_len!r}")
        self.tracklets = _check_tracklets(tracklets)
        self.clip_len, self.size, self.flip_p = clip_len, parse_size(size), float(flip_p)
        self.stats = stats if stats is not None else FrameStats()
        self.generator = generator

    def __len__(self) -> int:
        return len(self.tracklets)

    def __getitem__(self, idx):
        paths, pid, camid = self.tracklets[int(idx)]
        g = self.generator if torch.utils.data.get_worker_info() is None else None
        ind = train_clip_indices(len(paths), self.clip_len, generator=g)
        flip = bool(self.flip_p > 0 and float(torch.rand((), generator=g)) < self.flip_p)
        return read_clip(paths, ind, self.size, flip=flip, stats=self.stats), pid, camid


class TestClipDataset(Dataset):
    """All clips of every tracklet (``mode="all"``: ``clip_len`` frames every
    ``stride``) or one random clip per tracklet (``mode="random"``, fixed by
    ``seed``).  Item -> (clip uint8 ``(3, T, H, W)``, tracklet_idx)."""

    __test__ = False  # not a pytest class

    def __init__(self, tracklets, clip_len: int = 16, size=(64, 32), stride: int = 8, mode: str = "all",
                 seed: int = 0, stats: Optional[FrameStats] = None):
        if mode not in ("all", "random"):
            raise ValueError(f"mode: expected 'all' or 'random'; got {mode!r}")
        self.tracklets = _check_tracklets(tracklets)
        self.clip_len, self.size, self.stride, self.mode = clip_len, parse_size(size), stride, mode
        self.stats = stats if stats is not None else FrameStats()
        items = []
        for ti, (paths, _, _) in enumerate(self.tracklets):
            if mode == "all":
                clips = test_clip_indices(len(paths), clip_len, stride)
            else:
                clips = [random_test_clip(len(paths), clip_len, np.random.default_rng([int(seed), ti]))]
            items.extend((ti, c) for c in clips)
        self.items = items
        self.clip_counts = np.bincount(np.asarray([i[0] for i in items], dtype=np.int64),
                                       minlength=len(self.tracklets))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx):
        ti, ind = self.items[int(idx)]
        return read_clip(self.tracklets[ti][0], ind, self.size, stats=self.stats), ti


def collate_clips(batch):
    """Stack ``(clip, int, ...)`` items: clips via numpy (torch.stack on uint8
    can be very slow when its thread pool is oversubscribed), ints as int64."""
    cols = list(zip(*batch))
    clips = torch.from_numpy(np.stack([c.numpy() for c in cols[0]]))
    return (clips,) + tuple(torch.as_tensor(np.asarray(c, dtype=np.int64)) for c in cols[1:])


class _EpochLoader:
    """A DataLoader wrapper that logs the bad-frame summary (one warning line,
    only if frames were bad) when an epoch's iteration finishes, or every
    ``len(sampler)`` batches with an infinite sampler."""

    def __init__(self, loader: DataLoader, stats: FrameStats, sampler=None):
        self.loader, self.stats, self.sampler = loader, stats, sampler
        self.dataset = loader.dataset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        infinite = bool(getattr(self.sampler, "infinite", False))
        per_epoch = len(self.sampler) if infinite else 0
        k = 0
        try:
            for batch in self.loader:
                k += 1
                if per_epoch and k % per_epoch == 0:  # an infinite sampler: summarise every epoch's worth
                    self.stats.log_summary(epoch=self.epoch + k // per_epoch - 1)
                yield batch
        finally:
            self.stats.log_summary(epoch=self.epoch if not per_epoch else self.epoch + k // per_epoch)
            if self.sampler is not None and hasattr(self.sampler, "set_epoch") and not infinite:
                self.set_epoch(self.epoch + 1)


def _loader_kwargs(workers: int, pin_memory: Optional[bool], seed: int, prefetch_factor: int):
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers: expected an integer >= 0; got {workers!r}")
    kw = dict(num_workers=workers,
              pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
              generator=torch.Generator().manual_seed(int(seed)))
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    return kw


def build_train_loader(tracklets, clip_len: int, size=(64, 32), num_ids: int = 8, num_per_id: int = 4,
                       workers: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1, flip_p: float = 0.5,
                       infinite: bool = False, pin_memory: Optional[bool] = None, prefetch_factor: int = 4):
    """Identity-balanced training loader (JPEG path).  Iterating yields
    ``(clips uint8 (P*K, 3, T, H, W), pids int64 (P*K,), camids int64 (P*K,))``;
    each pass is one epoch (the sampler's epoch advances automatically; or call
    ``set_epoch``) and ends with one warning line if frames were unreadable.
    ``.stats`` is the :class:`FrameStats`, ``.sampler`` the batch sampler.
    ``seed`` fixes the batches and the clips drawn from them: workers are
    seeded from it, and with ``workers=0`` the clips come from a generator
    seeded from it (not torch's global RNG).  The clips depend on the number
    of workers."""
    stats = FrameStats()
    main_gen = torch.Generator().manual_seed(int(seed) * 1000 + int(rank) + 1) if workers == 0 else None
    ds = TrainClipDataset(tracklets, clip_len, size, flip_p=flip_p, stats=stats, generator=main_gen)
    sampler = IdentityBalancedSampler(ds.tracklets, num_ids, num_per_id, seed=seed, rank=rank,
                                      world_size=world_size, infinite=infinite)
    dl = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_clips, **_loader_kwargs(workers, pin_memory, seed * 1000 + rank,
                                                                 prefetch_factor))
    return _EpochLoader(dl, stats, sampler)


def build_test_loader(tracklets, clip_len: int = 16, size=(64, 32), stride: int = 8, mode: str = "all",
                      batch_size: int = 32, workers: int = 4, seed: int = 0, pin_memory: Optional[bool] = None,
                      prefetch_factor: int = 4):
    """Test loader (JPEG path) over every clip (``mode="all"``) or one random
    clip (``mode="random"``) of each tracklet, in tracklet order.  Yields
    ``(clips uint8 (N, 3, T, H, W), tracklet_idx int64 (N,))``;
    ``.dataset.clip_counts`` gives clips per tracklet."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer; got {batch_size!r}")
    stats = FrameStats()
    ds = TestClipDataset(tracklets, clip_len, size, stride=stride, mode=mode, seed=seed, stats=stats)
    kw = _loader_kwargs(workers, pin_memory, seed, prefetch_factor)
    kw.pop("persistent_workers", None)  # one pass per extraction
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_clips, **kw)
    return _EpochLoader(dl, stats)
