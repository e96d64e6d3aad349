"""Data pipeline throughput: frames/s delivered by the training loaders.

- ``jpeg-w{0,2}``: the DataLoader JPEG path (PIL decode + resize in workers),
  tiny synthetic data (256x128 JPEG frames) -> 8x64x32 clips, 4 ids x 4 clips;
- ``shard-cpu``: pre-packed uint8 memmap shards, gathered by index arithmetic
  into (N, 3, T, H, W) on the CPU;
- ``shard-gpu`` (CUDA only): shards at the paper size (16x180x90 clips,
  8 ids x 4) into GPU memory through pinned buffers (non_blocking copies,
  permute/flip on the device);
- ``gpu-jpeg`` (CUDA + torchvision only): nvJPEG decode on the GPU.

extra_info: label, frames (per round; conftest turns it into frames_per_s),
frames_per_s, device, workers (processes or threads), batch, clip_len, size.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from personvlad.data import MARS, build_train_loader
from personvlad.data.shards import ShardTrainLoader, pack_dataset
from personvlad.data.synth import generate

HAS_CUDA = torch.cuda.is_available()
ROUND_BATCHES = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench_data") / "tiny")
    generate(root, preset="tiny", seed=0, workers=max(1, min(8, os.cpu_count() or 1)))
    return MARS(root)


@pytest.fixture(scope="module")
def shards_small(tiny, tmp_path_factory):
    return pack_dataset(tiny, str(tmp_path_factory.mktemp("shards") / "s64"), size=(64, 32),
                        workers=max(1, min(8, os.cpu_count() or 1)))


def _run(benchmark, it, label, device, workers, batch, clip_len, size, rounds=3, batches=ROUND_BATCHES):
    """Time rounds of ``batches`` consecutive batches (long enough that the
    loaders' prefetch depth does not flatter the rate)."""
    def one_round():
        n = 0
        for _ in range(batches):
            x, _, _ = next(it)
            n += x.shape[0] * x.shape[2]
        if device == "cuda":
            torch.cuda.synchronize()
        return n

    one_round()  # warm-up (workers start, page cache)
    t0 = time.perf_counter()
    frames = one_round()
    dt = time.perf_counter() - t0
    benchmark.extra_info.update(label=label, frames=frames, frames_per_s=round(frames / dt, 1),
                                device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                workers=workers, batch=batch, clip_len=clip_len, size=list(size))
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["frames_per_s"] = round(frames / mean, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_jpeg_loader_cpu(benchmark, tiny, workers):
    dl = build_train_loader(tiny.train, clip_len=8, size=(64, 32), num_ids=4, num_per_id=4, workers=workers,
                            seed=0, infinite=True)
    _run(benchmark, iter(dl), f"jpeg-w{workers}", "cpu", workers, 16, 8, (64, 32))


def test_shard_loader_cpu(benchmark, shards_small):
    threads = max(1, min(4, os.cpu_count() or 1))
    dl = ShardTrainLoader(shards_small, clip_len=8, num_ids=4, num_per_id=4, seed=0, threads=threads, infinite=True)
    _run(benchmark, iter(dl), "shard-cpu", "cpu", threads, 16, 8, (64, 32), rounds=5, batches=128)


@pytest.mark.cuda
def test_shard_loader_gpu(benchmark, tiny, tmp_path_factory):
    out = pack_dataset(tiny, str(tmp_path_factory.mktemp("shards") / "s180"), size=(180, 90),
                       workers=max(1, min(16, os.cpu_count() or 1)))
    threads = max(1, min(8, os.cpu_count() or 1))
    dl = ShardTrainLoader(out, clip_len=16, num_ids=8, num_per_id=4, seed=0, threads=threads, device="cuda",
                          infinite=True)
    _run(benchmark, iter(dl), "shard-gpu", "cuda", threads, 32, 16, (180, 90), rounds=5, batches=64)


@pytest.mark.cuda
def test_gpu_jpeg_loader(benchmark, tiny):
    from personvlad.data.gpu_jpeg import GpuJpegTrainLoader, gpu_jpeg_available

    if not gpu_jpeg_available():
        pytest.skip("torchvision with decode_jpeg(device='cuda') is not installed")
    threads = max(1, min(16, os.cpu_count() or 1))
    dl = GpuJpegTrainLoader(tiny.train, clip_len=16, size=(180, 90), num_ids=8, num_per_id=4, threads=threads,
                            infinite=True)
    _run(benchmark, iter(dl), "gpu-jpeg", "cuda", threads, 32, 16, (180, 90))
