"""Clip index sampling (the paper's Table II modes) and identity-balanced batches."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch


def _check_pos(name, v):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: expected a positive integer; got {v!r}")


def loop_indices(num_frames: int, start: int, clip_len: int) -> List[int]:
    """``clip_len`` consecutive indices from ``start``, looping over a short tracklet."""
    return [(start + j) % num_frames for j in range(clip_len)]


def train_clip_indices(num_frames: int, clip_len: int, rng: Optional[np.random.Generator] = None,
                       generator: Optional[torch.Generator] = None) -> List[int]:
    """A random run of ``clip_len`` consecutive frames; a tracklet shorter than
    ``clip_len`` is looped from frame 0."""
    _check_pos("num_frames", num_frames)
    _check_pos("clip_len", clip_len)
    if num_frames <= clip_len:
        return loop_indices(num_frames, 0, clip_len)
    hi = num_frames - clip_len + 1
    if rng is not None:
        start = int(rng.integers(0, hi))
    else:
        start = int(torch.randint(0, hi, (1,), generator=generator))
    return list(range(start, start + clip_len))


def test_clip_indices(num_frames: int, clip_len: int = 16, stride: int = 8) -> List[List[int]]:
    """All ``clip_len``-frame clips starting every ``stride`` frames (full clips
    only); a tracklet shorter than ``clip_len`` gives one looped clip."""
    _check_pos("num_frames", num_frames)
    _check_pos("clip_len", clip_len)
    _check_pos("stride", stride)
    if num_frames <= clip_len:
        return [loop_indices(num_frames, 0, clip_len)]
    return [list(range(s, s + clip_len)) for s in range(0, num_frames - clip_len + 1, stride)]


test_clip_indices.__test__ = False  # not a pytest test


def random_test_clip(num_frames: int, clip_len: int, rng: np.random.Generator) -> List[int]:
    """The paper's "one random clip" test mode."""
    return train_clip_indices(num_frames, clip_len, rng=rng)


class IdentityBalancedSampler(torch.utils.data.Sampler):
    """Batch sampler: each batch is ``num_ids`` distinct identities x
    ``num_per_id`` tracklets of each (P x K).

    One epoch: every identity contributes ``max(1, n_i // K)`` groups of K of
    its tracklets (shuffled; an identity with fewer than K tracklets is
    sampled with replacement), groups are drawn into batches of P distinct
    identities -- the P with the most groups left, ties in a random order --
    until fewer than P identities have groups left.  That uses as many
    groups as any schedule can, so the number of batches per epoch does not
    depend on the draws.  The
    permutation depends only on ``(seed, epoch)``; under DDP every rank builds
    the same list and takes batches ``rank::world_size`` (the same number on
    every rank).  ``infinite=True`` chains epochs forever.  Call
    ``set_epoch(e)`` for a fresh permutation.
    """

    def __init__(self, tracklets: Sequence, num_ids: int, num_per_id: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, infinite: bool = False):
        _check_pos("num_ids", num_ids)
        _check_pos("num_per_id", num_per_id)
        _check_pos("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}; got {rank}")
        by_pid = defaultdict(list)
        for i, t in enumerate(tracklets):
            by_pid[int(t[1])].append(i)
        if len(by_pid) < num_ids:
            raise ValueError(f"num_ids: expected <= the {len(by_pid)} identities in the tracklets; got {num_ids}")
        self.pids = sorted(by_pid)
        self.by_pid = {p: np.asarray(v, dtype=np.int64) for p, v in by_pid.items()}
        self.num_ids, self.num_per_id = num_ids, num_per_id
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.infinite = infinite
        self.epoch = 0
        self._len_cache = {}
        if len(self) == 0:
            raise ValueError(f"num_ids x world_size: too few identities ({len(self.pids)}) for one batch of "
                             f"{num_ids} ids on each of {world_size} rank(s)")

    @property
    def batch_size(self) -> int:
        return self.num_ids * self.num_per_id

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        K, P = self.num_per_id, self.num_ids
        groups = {}
        for p in self.pids:
            idx = self.by_pid[p]
            if len(idx) < K:
                sel = rng.choice(idx, size=K, replace=True)
                groups[p] = [sel.tolist()]
            else:
                perm = rng.permutation(idx)
                ng = len(idx) // K
                groups[p] = [perm[g * K:(g + 1) * K].tolist() for g in range(ng)]
        batches = []
        avail = [p for p in self.pids if groups[p]]
        while len(avail) >= P:
            # The P identities with the most groups left, ties in a random
            # order; in the batch they keep that random order.  Largest-first
            # makes the most batches any schedule can: uniform picks could
            # strand one identity's groups, so the number of batches varied
            # from epoch to epoch, down to fewer than the ranks (an epoch of
            # no batches at all).
            perm = rng.permutation(len(avail)).tolist()
            top = set(sorted(perm, key=lambda i: -len(groups[avail[i]]))[:P])  # sorted() is stable
            batch = []
            for c in perm:
                if c in top:
                    batch.extend(groups[avail[c]].pop())
            batches.append(batch)
            avail = [p for p in avail if groups[p]]
        return batches

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (infinite: per epoch)."""
        if self.epoch not in self._len_cache:
            self._len_cache[self.epoch] = len(self._epoch_batches(self.epoch)) // self.world_size
        return self._len_cache[self.epoch]

    def __iter__(self) -> Iterator[List[int]]:
        epoch = self.epoch
        while True:
            batches = self._epoch_batches(epoch)
            n = len(batches) // self.world_size
            yield from batches[self.rank::self.world_size][:n]
            if not self.infinite:
                return
            epoch += 1
