"""The fast path: pre-packed uint8 frame shards read by memory map.

``pack_dataset`` (CLI ``personvlad pack``) decodes every frame of a dataset
once, resizes it to ``(H, W)`` and writes::

    out/frames.u8    raw uint8, shape (num_frames, H, W, 3), C order (one frame contiguous)
    out/index.npz    {split}_offsets, {split}_lengths, {split}_pids, {split}_camids,
                     {split}_first_frame for split in train/query/gallery; meta (JSON string)

Tracklets are stored frame-contiguous, so a clip of T consecutive frames is a
single ``T*H*W*3``-byte block: random clip gathering is index arithmetic plus
big contiguous copies (numpy releases the GIL, so a thread pool gathers
batches in parallel) into pinned buffers, then one non-blocking host-to-device
copy per batch; the ``(N, T, H, W, 3) -> (N, 3, T, H, W)`` permute and the
horizontal flips run on the device.
"""
from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .frames import FrameStats, parse_size, read_frames
from .sampling import IdentityBalancedSampler, random_test_clip, test_clip_indices

log = logging.getLogger("personvlad.data")

SPLITS = ("train", "query", "gallery")
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- packing

_PACK_STATE: dict = {}


def _pack_job(args):
    path, size, off, frames = args
    st = _PACK_STATE
    if st.get("path") != path:
        st["path"] = path
        st["mm"] = None
    if st["mm"] is None:
        st["mm"] = np.memmap(path, dtype=np.uint8, mode="r+", shape=st["shape"])
    stats = FrameStats(shared=False)
    arr = read_frames(frames, list(range(len(frames))), size, stats)
    st["mm"][off:off + len(frames)] = arr
    return stats.bad_frames


def pack_dataset(dataset, out_dir, size=(64, 32), workers: int = 1, progress: bool = False) -> str:
    """Decode and resize every frame of ``dataset`` (an object with ``train``,
    ``query``, ``gallery``, e.g. ``MARS(root)``) into ``out_dir``; returns
    ``out_dir``.  Unreadable frames are replaced by the nearest good frame
    and counted in ``meta["bad_frames"]``."""
    h, w = parse_size(size)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive integer; got {workers!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    index: Dict[str, np.ndarray] = {}
    jobs = []
    total = 0
    for split in SPLITS:
        tracks = [t for t in getattr(dataset, split) if len(t[0]) > 0]
        lens = np.asarray([len(t[0]) for t in tracks], dtype=np.int64)
        offs = total + np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(lens) else lens
        index[f"{split}_offsets"] = offs
        index[f"{split}_lengths"] = lens
        index[f"{split}_pids"] = np.asarray([t[1] for t in tracks], dtype=np.int64)
        index[f"{split}_camids"] = np.asarray([t[2] for t in tracks], dtype=np.int64)
        index[f"{split}_first_frame"] = np.asarray([t[0][0] for t in tracks], dtype=str)
        for t, o in zip(tracks, offs.tolist()):
            jobs.append((t[0], o))
        total += int(lens.sum())
    if total == 0:
        raise ValueError("dataset: no frames to pack")
    path = os.path.join(out_dir, "frames.u8")
    shape = (total, h, w, 3)
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)
    del mm
    _PACK_STATE.clear()
    _PACK_STATE.update(shape=shape)
    args = [(path, (h, w), o, fr) for fr, o in jobs]
    bad = 0
    if workers == 1:
        for k, a in enumerate(args):
            bad += _pack_job(a)
            if progress and k % max(1, len(args) // 20) == 0:
                print(f"pack: {k}/{len(args)} tracklets", flush=True)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        with ctx.Pool(workers, initializer=_PACK_STATE.update, initargs=(dict(shape=shape),)) as pool:
            for k, b in enumerate(pool.imap_unordered(_pack_job, args, chunksize=max(1, len(args) // (workers * 32)))):
                bad += b
                if progress and k % max(1, len(args) // 20) == 0:
                    print(f"pack: {k}/{len(args)} tracklets", flush=True)
    _PACK_STATE.clear()
    if bad:
        log.warning("pack: %d unreadable frame(s) replaced by the nearest good frame", bad)
    meta = dict(version=FORMAT_VERSION, size=[h, w], num_frames=total, bad_frames=int(bad),
                dataset=getattr(dataset, "name", type(dataset).__name__), root=getattr(dataset, "root", None),
                num_train_pids=int(getattr(dataset, "num_train_pids", len(set(index["train_pids"].tolist())))),
                seconds=round(time.time() - t0, 2))
    np.savez(os.path.join(out_dir, "index.npz"), meta=np.asarray(json.dumps(meta)), **index)
    if progress:
        print(f"pack: {total} frames ({h}x{w}) in {time.time() - t0:.1f}s -> {out_dir}", flush=True)
    return out_dir


# ----------------------------------------------------------------------------- reading


class ShardStore:
    """A packed dataset opened by memory map.  ``frames`` is the
    ``(num_frames, H, W, 3)`` uint8 memmap; per split, ``offsets``, ``lengths``,
    ``pids``, ``camids`` arrays (``store.split("train")``)."""

    def __init__(self, shard_dir):
        self.dir = shard_dir = os.fspath(shard_dir)
        ip, fp = os.path.join(shard_dir, "index.npz"), os.path.join(shard_dir, "frames.u8")
        for p, what in ((ip, "shard index written by `personvlad pack`"), (fp, "frame memmap written by `personvlad pack`")):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: expected the {what}")
        try:
            with np.load(ip, allow_pickle=False) as z:
                self.meta = json.loads(str(z["meta"]))
                self._index = {k: z[k] for k in z.files if k != "meta"}
            h, w = self.meta["size"]
            self.size = (int(h), int(w))
            n = int(self.meta["num_frames"])
        except (KeyError, ValueError, OSError, TypeError, AttributeError, zipfile.BadZipFile) as e:
            # a truncated file, a .npy under the name, meta without size/num_frames
            raise ValueError(f"{ip}: expected a shard index (.npz with meta and per-split arrays): "
                             f"{type(e).__name__}: {e}") from None
        self._check_index(ip, n)
        expect = n * h * w * 3
        got = os.path.getsize(fp)
        if got != expect:
            raise ValueError(f"{fp}: expected {expect} bytes ({n} frames of {h}x{w}x3); got {got}")
        self.frames = np.memmap(fp, dtype=np.uint8, mode="r", shape=(n, h, w, 3))
        self.num_train_pids = int(self.meta.get("num_train_pids", 0))

    def _check_index(self, ip: str, n: int) -> None:
        """Every split's five arrays present, of one length, and its
        tracklets inside the frame store: a damaged index must not make clips
        silently read another split's frames (or fail later without a path)."""
        for sp in SPLITS:
            arrs = {}
            for k in ("offsets", "lengths", "pids", "camids", "first_frame"):
                key = f"{sp}_{k}"
                if key not in self._index:
                    raise ValueError(f"{ip}: expected the array {key!r} (pack it again with `personvlad pack`)")
                arrs[k] = self._index[key]
            if len({a.shape for a in arrs.values()}) != 1 or arrs["offsets"].ndim != 1:
                raise ValueError(f"{ip}: {sp}: expected 1-D arrays of one length, got shapes "
                                 f"{ {k: a.shape for k, a in arrs.items()} }")
            o, ln = arrs["offsets"].astype(np.int64), arrs["lengths"].astype(np.int64)
            if o.size and (ln.min() < 1 or o.min() < 0 or (o + ln).max() > n):
                raise ValueError(f"{ip}: {sp}: expected tracklets of >= 1 frame inside the store's {n} frames "
                                 f"(offsets + lengths <= {n})")
        # the splits' tracklets do not overlap (pack_dataset writes them back to back)
        spans = sorted((int(a), int(a) + int(b)) for sp in SPLITS
                       for a, b in zip(self._index[f"{sp}_offsets"], self._index[f"{sp}_lengths"]))
        if any(e0 > s1 for (_, e0), (s1, _) in zip(spans, spans[1:])):
            raise ValueError(f"{ip}: expected non-overlapping tracklets (offsets/lengths are inconsistent)")

    def split(self, name: str) -> Dict[str, np.ndarray]:
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}; got {name!r}")
        return {k: self._index[f"{name}_{k}"] for k in ("offsets", "lengths", "pids", "camids", "first_frame")}

    def tracklets(self, name: str) -> List[tuple]:
        """``(range of frame rows, pid, camid)`` per tracklet (for samplers)."""
        s = self.split(name)
        return [(range(o, o + n), int(p), int(c)) for o, n, p, c in
                zip(s["offsets"].tolist(), s["lengths"].tolist(), s["pids"].tolist(), s["camids"].tolist())]

    def gather(self, offsets: Sequence[int], lengths: Sequence[int], starts: Sequence[int], clip_len: int,
               out: Optional[np.ndarray] = None, flips: Optional[Sequence[bool]] = None,
               layout: str = "NCTHW") -> np.ndarray:
        """Clips of frame rows ``offset + (start + j) % length``, ``j < clip_len``.

        ``layout="NCTHW"``: ``(N, 3, T, H, W)`` with ``flips`` applied (the CPU
        path; numpy's strided copy is far faster than torch's for uint8).
        ``layout="NTHWC"``: ``(N, T, H, W, 3)`` raw rows, one contiguous copy
        per clip (the GPU path permutes and flips on the device).
        """
        h, w = self.size
        n = len(offsets)
        if layout not in ("NCTHW", "NTHWC"):
            raise ValueError(f"layout: expected 'NCTHW' or 'NTHWC'; got {layout!r}")
        shape = (n, 3, clip_len, h, w) if layout == "NCTHW" else (n, clip_len, h, w, 3)
        if out is None:
            out = np.empty(shape, np.uint8)
        mm = self.frames
        for i in range(n):
            o, L, s = int(offsets[i]), int(lengths[i]), int(starts[i])
            if s + clip_len <= L:
                src = mm[o + s:o + s + clip_len]
            else:
                src = mm[o + (s + np.arange(clip_len)) % L]
            if layout == "NTHWC":
                out[i] = src
            else:
                if flips is not None and flips[i]:
                    src = src[:, :, ::-1]
                np.copyto(out[i], src.transpose(3, 0, 1, 2))
        return out

    def read_clip(self, split: str, tracklet: int, indices: Sequence[int], flip: bool = False) -> torch.Tensor:
        """uint8 ``(3, T, H, W)`` like :func:`personvlad.data.read_clip` (for checks)."""
        s = self.split(split)
        o, L = int(s["offsets"][tracklet]), int(s["lengths"][tracklet])
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= L):
            raise ValueError(f"indices: expected values in [0, {L}); got [{idx.min()}, {idx.max()}]")
        arr = self.frames[o + idx]
        if flip:
            arr = arr[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(3, 0, 1, 2)))


def _to_clips(x: torch.Tensor, flips: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, T, H, W, 3) -> (N, 3, T, H, W) contiguous, flipping samples where
    ``flips`` (on the device of ``x``; the GPU path; None when the host knows
    that none is flipped, so no device value is read back)."""
    y = x.permute(0, 4, 1, 2, 3)
    if flips is not None:
        y = torch.where(flips.view(-1, 1, 1, 1, 1), y.flip(-1), y)
    return y.contiguous()


class _Prefetcher:
    """Fills buffer slots (pinned when ``device`` is CUDA) with ``fill(spec, buf)``
    in a thread pool, hands them over in order, copies to ``device``.  The
    slots are shared with later epochs through ``cache``: one iteration at a
    time per loader."""

    def __init__(self, specs_iter, fill, shape, device, threads: int, depth: int, cache: Optional[dict] = None):
        self.device = torch.device(device) if device is not None else None
        self.cuda = self.device is not None and self.device.type == "cuda"
        self.depth = max(depth, threads + 1)
        key = (tuple(shape), self.cuda, self.depth)
        ring = cache.get(key) if cache is not None else None
        if ring is None:  # pinned buffers are costly to allocate: kept across epochs in ``cache``
            ring = ([torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(self.depth)],
                    [None] * self.depth)
            if cache is not None:
                cache.clear()
                cache[key] = ring
        self.bufs, self.events = ring  # events[i]: the last H2D copy out of bufs[i]
        self.specs_iter, self.fill = specs_iter, fill
        self.pool = ThreadPoolExecutor(max_workers=threads)

    def _job(self, slot, spec):
        ev = self.events[slot]
        if ev is not None:
            ev.synchronize()  # the previous H2D copy out of this buffer is done
        n = self.fill(spec, self.bufs[slot].numpy())
        return slot, spec, n

    def __iter__(self):
        pending = []
        it = iter(self.specs_iter)
        free = list(range(self.depth))
        try:
            while True:
                while free:
                    spec = next(it, None)
                    if spec is None:
                        break
                    pending.append(self.pool.submit(self._job, free.pop(0), spec))
                if not pending:
                    return
                slot, spec, n = pending.pop(0).result()
                host = self.bufs[slot][:n]
                if self.device is not None and self.device.type != "cpu":
                    dev = host.to(self.device, non_blocking=self.cuda)
                    if self.cuda:
                        ev = torch.cuda.Event()
                        # behind the copy, on its device's stream (not the current device's)
                        ev.record(torch.cuda.current_stream(self.device))
                        self.events[slot] = ev
                    free.append(slot)
                    yield dev, spec
                else:
                    yield torch.from_numpy(host.numpy().copy()), spec  # the slot is refilled while the consumer works
                    free.append(slot)
        finally:
            for f in pending:
                f.cancel()
            self.pool.shutdown(wait=True)


class ShardTrainLoader:
    """Identity-balanced random clips from a shard store.  Iterating yields
    ``(clips uint8 (P*K, 3, T, H, W), pids (P*K,), camids (P*K,))`` on ``device``
    (CPU when None); same sampling as :func:`build_train_loader`: a random run of
    ``clip_len`` frames (short tracklets loop), horizontal flip with
    probability ``flip_p``, P ids x K tracklets per batch, DDP-aware.
    ``start_batch`` skips that many batches of the first iteration (their
    random draws included, no frame is read), so a resumed run sees exactly
    the batches an uninterrupted one would.  ``labels_on_host`` yields pids
    and camids on the CPU (the trainer's OIM loss takes them there)."""

    def __init__(self, shard_dir, clip_len: int, num_ids: int = 8, num_per_id: int = 4, seed: int = 0,
                 rank: int = 0, world_size: int = 1, flip_p: float = 0.5, device=None, threads: int = 4,
                 prefetch: int = 4, infinite: bool = False, start_batch: int = 0, labels_on_host: bool = False):
        self.store = shard_dir if isinstance(shard_dir, ShardStore) else ShardStore(shard_dir)
        if not isinstance(clip_len, int) or clip_len < 1:
            raise ValueError(f"clip_len: expected a positive integer; got {clip_len!r}")
        if not 0.0 <= float(flip_p) <= 1.0:
            raise ValueError(f"flip_p: expected a probability in [0, 1]; got {flip_p}")
        self.split = self.store.split("train")
        self.sampler = IdentityBalancedSampler(self.store.tracklets("train"), num_ids, num_per_id, seed=seed,
                                               rank=rank, world_size=world_size, infinite=infinite)
        self.clip_len, self.flip_p, self.seed, self.rank = clip_len, float(flip_p), int(seed), rank
        self.device, self.threads, self.prefetch = device, threads, prefetch
        self.stats = FrameStats(shared=False)  # frames were validated when packing; kept for API symmetry
        if not isinstance(start_batch, int) or isinstance(start_batch, bool) or start_batch < 0:
            raise ValueError(f"start_batch: expected an int >= 0; got {start_batch!r}")
        self.skip = start_batch
        self.labels_on_host = bool(labels_on_host)
        self.epoch = 0
        self._ring: dict = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def _specs(self):
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 17])
        L = self.split["lengths"]
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.sampler):
            b = np.asarray(batch, dtype=np.int64)
            lens = L[b]
            hi = np.maximum(lens - self.clip_len + 1, 1)
            starts = (rng.random(len(b)) * hi).astype(np.int64)
            flips = rng.random(len(b)) < self.flip_p
            if i >= skip:
                yield b, starts, flips

    def _on_device(self) -> bool:
        return self.device is not None and torch.device(self.device).type != "cpu"

    def _fill(self, spec, buf):
        b, starts, flips = spec
        self.store.gather(self.split["offsets"][b], self.split["lengths"][b], starts, self.clip_len, out=buf,
                          flips=flips, layout="NTHWC" if self._on_device() else "NCTHW")
        return len(b)

    def __iter__(self):
        h, w = self.store.size
        B, T = self.sampler.batch_size, self.clip_len
        on_dev = self._on_device()
        shape = (B, T, h, w, 3) if on_dev else (B, 3, T, h, w)
        pf = _Prefetcher(self._specs(), self._fill, shape, self.device, self.threads, self.prefetch, self._ring)
        dev = pf.device if pf.device is not None else torch.device("cpu")
        pids_all = torch.from_numpy(self.split["pids"])
        cams_all = torch.from_numpy(self.split["camids"])
        try:
            ldev = torch.device("cpu") if self.labels_on_host else dev
            for x, (b, _, flips) in pf:
                bt = torch.from_numpy(b)
                if on_dev:
                    f = torch.from_numpy(flips).pin_memory().to(dev, non_blocking=True) if flips.any() else None
                    x = _to_clips(x, f)
                yield x, pids_all[bt].to(ldev), cams_all[bt].to(ldev)
        finally:
            self.set_epoch(self.epoch + 1)


class ShardTestLoader:
    """All clips (``mode="all"``, ``clip_len`` frames every ``stride``) or one
    random clip (``mode="random"``) per tracklet of ``split``, in tracklet order.
    Yields ``(clips uint8 (N, 3, T, H, W), tracklet_idx (N,))`` on ``device``;
    identical clips to :func:`build_test_loader` over the packed frames."""

    __test__ = False

    def __init__(self, shard_dir, split: str = "query", clip_len: int = 16, stride: int = 8, mode: str = "all",
                 batch_size: int = 32, seed: int = 0, device=None, threads: int = 4, prefetch: int = 4):
        self.store = shard_dir if isinstance(shard_dir, ShardStore) else ShardStore(shard_dir)
        if mode not in ("all", "random"):
            raise ValueError(f"mode: expected 'all' or 'random'; got {mode!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer; got {batch_size!r}")
        self.s = self.store.split(split)
        self.clip_len, self.batch_size, self.device = clip_len, batch_size, device
        self.threads, self.prefetch = threads, prefetch
        self._ring: dict = {}
        tids, starts = [], []
        for ti, n in enumerate(self.s["lengths"].tolist()):
            if mode == "all":
                clips = test_clip_indices(n, clip_len, stride)
            else:
                clips = [random_test_clip(n, clip_len, np.random.default_rng([int(seed), ti]))]
            for c in clips:
                tids.append(ti)
                starts.append(c[0])
        self.tids = np.asarray(tids, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.clip_counts = np.bincount(self.tids, minlength=len(self.s["lengths"]))

    def __len__(self) -> int:
        return (len(self.tids) + self.batch_size - 1) // self.batch_size

    def _specs(self):
        for i in range(0, len(self.tids), self.batch_size):
            yield np.arange(i, min(i + self.batch_size, len(self.tids)))

    def _on_device(self) -> bool:
        return self.device is not None and torch.device(self.device).type != "cpu"

    def _fill(self, sel, buf):
        t = self.tids[sel]
        self.store.gather(self.s["offsets"][t], self.s["lengths"][t], self.starts[sel], self.clip_len, out=buf,
                          layout="NTHWC" if self._on_device() else "NCTHW")
        return len(sel)

    def __iter__(self):
        h, w = self.store.size
        B, T = self.batch_size, self.clip_len
        on_dev = self._on_device()
        pf = _Prefetcher(self._specs(), self._fill, (B, T, h, w, 3) if on_dev else (B, 3, T, h, w), self.device,
                         self.threads, self.prefetch, self._ring)
        dev = pf.device if pf.device is not None else torch.device("cpu")
        for x, sel in pf:
            yield (_to_clips(x, None) if on_dev else x), torch.from_numpy(self.tids[sel]).to(dev)
