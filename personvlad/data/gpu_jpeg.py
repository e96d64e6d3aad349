"""Optional GPU JPEG path: ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG).

torchvision may not be installed: everything here imports it lazily and
:func:`gpu_jpeg_available` says whether the path can run.  File bytes are read
by a thread pool on the CPU, decoded in one batched nvJPEG call per batch and
resized on the GPU (bilinear, antialiased).  The output is close to, but not
byte-identical with, the PIL path (different resampling).  A clip whose
frames fail to decode falls back to the CPU path (:func:`read_frames`), which
skips and counts bad frames.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import numpy as np
import torch

from .frames import FrameStats, parse_size, read_frames
from .sampling import IdentityBalancedSampler


def gpu_jpeg_available() -> bool:
    """torchvision importable, CUDA present, and decode_jpeg takes ``device``."""
    if not torch.cuda.is_available():
        return False
    try:
        import inspect

        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        return False
    try:
        return "device" in inspect.signature(decode_jpeg).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return True


def _read_bytes(path: str) -> Optional[torch.Tensor]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_clips_cuda(clips: Sequence[Sequence[str]], size, device="cuda", pool: Optional[ThreadPoolExecutor] = None,
                      stats: Optional[FrameStats] = None) -> torch.Tensor:
    """Decode clips (lists of JPEG paths, all of the same length T) on the GPU:
    uint8 ``(N, 3, T, H, W)`` on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    h, w = parse_size(size)
    n = len(clips)
    T = len(clips[0]) if n else 0
    flat = [p for c in clips for p in c]
    datas = list(pool.map(_read_bytes, flat)) if pool is not None else [_read_bytes(p) for p in flat]
    out = torch.empty((n, T, 3, h, w), dtype=torch.uint8, device=device)
    bad_clips = {i // T for i, d in enumerate(datas) if d is None}
    good = [i for i in range(len(flat)) if i // T not in bad_clips]
    if good:
        try:
            imgs = decode_jpeg([datas[i] for i in good], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            imgs = None
        if imgs is None:  # some frame is corrupt: decode one by one to find it
            imgs = []
            for i in good:
                try:
                    imgs.append(decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    imgs.append(None)
                    bad_clips.add(i // T)
        groups = {}
        for i, im in zip(good, imgs):
            if im is not None and i // T not in bad_clips:
                groups.setdefault(tuple(im.shape), []).append((i, im))
        for shape, items in groups.items():
            x = torch.stack([im for _, im in items]).float()
            if shape[1:] != (h, w):
                x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True,
                                                    align_corners=False)
            x = x.round_().clamp_(0, 255).to(torch.uint8)
            idx = torch.tensor([i for i, _ in items], device=device)
            out.view(n * T, 3, h, w).index_copy_(0, idx, x)
        if stats is not None:
            stats.add(read=len(flat) - T * len(bad_clips))
    for c in sorted(bad_clips):  # CPU fallback: skip-and-count bad frames
        arr = read_frames(clips[c], list(range(T)), (h, w), stats)
        out[c] = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))).to(device)
    return out.permute(0, 2, 1, 3, 4).contiguous()


class GpuJpegTrainLoader:
    """Identity-balanced training batches decoded by nvJPEG: yields
    ``(clips uint8 (P*K, 3, T, H, W), pids, camids)`` on ``device``.  Same
    sampling as :func:`personvlad.data.build_train_loader` (random run of
    ``clip_len`` frames, looping short tracklets; flip with ``flip_p``)."""

    def __init__(self, tracklets, clip_len: int, size=(64, 32), num_ids: int = 8, num_per_id: int = 4,
                 seed: int = 0, rank: int = 0, world_size: int = 1, flip_p: float = 0.5, device="cuda",
                 threads: int = 16, infinite: bool = False):
        if not gpu_jpeg_available():
            raise RuntimeError("GpuJpegTrainLoader needs CUDA and torchvision with decode_jpeg(device=...)")
        self.tracklets = [(tuple(t[0]), int(t[1]), int(t[2])) for t in tracklets if len(t[0])]
        self.sampler = IdentityBalancedSampler(self.tracklets, num_ids, num_per_id, seed=seed, rank=rank,
                                               world_size=world_size, infinite=infinite)
        self.clip_len, self.size, self.flip_p = clip_len, parse_size(size), float(flip_p)
        self.seed, self.rank, self.device = int(seed), rank, torch.device(device)
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.stats = FrameStats()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 29])
        try:
            for batch in self.sampler:
                clips: List[List[str]] = []
                for i in batch:
                    paths = self.tracklets[i][0]
                    n = len(paths)
                    s = int(rng.integers(0, max(n - self.clip_len + 1, 1)))
                    clips.append([paths[(s + j) % n] for j in range(self.clip_len)])
                x = decode_clips_cuda(clips, self.size, self.device, self.pool, self.stats)
                flips = torch.from_numpy(rng.random(len(batch)) < self.flip_p).to(self.device)
                x = torch.where(flips.view(-1, 1, 1, 1, 1), x.flip(-1), x)
                pids = torch.tensor([self.tracklets[i][1] for i in batch], device=self.device)
                cams = torch.tensor([self.tracklets[i][2] for i in batch], device=self.device)
                yield x, pids, cams
        finally:
            self.stats.log_summary(epoch=self.epoch)
            self.set_epoch(self.epoch + 1)
