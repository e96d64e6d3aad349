"""Shared helpers for the pytest-benchmark suites in bench/.

Every benchmark gets, through an autouse fixture, these ``extra_info`` keys
(a test's own values win): ``device`` (GPU name or "cpu"), ``device_type``,
``torch``, ``triton``, ``cuda``, ``cudnn``, ``python``, ``cpu_threads``.
After the test it also adds

- ``cuda_max_allocated_bytes``: ``torch.cuda.max_memory_allocated`` over the
  whole test (CUDA only; ``peak_bytes``, when a test measures it itself, is
  the more precise per-call number);
- ``clips_per_s`` / ``frames_per_s`` / ``items_per_s`` when the test recorded
  ``clips`` / ``frames`` / ``items`` per round (divided by the mean time);
- ``speedup_vs_baseline`` (baseline median / this median) when ``baseline``
  names a benchmark of the same group (by its ``label``, ``variant`` or
  ``op_backend``) that already ran.

``record(benchmark, **info)`` adds the same environment keys plus ``info``
explicitly (for use outside this conftest's autouse fixture, e.g. helpers).
``sync_fn(fn, device)`` wraps a callable so each call ends with a CUDA
synchronize (so the timer sees the GPU work).

Tests marked ``@pytest.mark.cuda`` are skipped without a CUDA device.
"""
from __future__ import annotations

import functools
import os
import platform
from typing import Any, Callable, Dict

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
_LABEL_KEYS = ("label", "variant", "op_backend")
_RATE_KEYS = {"clips": "clips_per_s", "frames": "frames_per_s", "items": "items_per_s"}


@functools.lru_cache(maxsize=1)
def env_info() -> Dict[str, Any]:
    """Device and library versions (cached)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton absent
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info = dict(
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu",
        device_type="cuda" if HAS_CUDA else "cpu",
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        cudnn=cudnn,
        python=platform.python_version(),
        cpu_threads=torch.get_num_threads(),
    )
    if not HAS_CUDA:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def record(benchmark, **info: Any) -> Dict[str, Any]:
    """Add the environment keys and ``info`` to ``benchmark.extra_info``."""
    for k, v in env_info().items():
        benchmark.extra_info.setdefault(k, v)
    benchmark.extra_info.update(info)
    return benchmark.extra_info


def sync_fn(fn: Callable[..., Any], device: Any = "cpu") -> Callable[..., Any]:
    """``fn`` followed by ``torch.cuda.synchronize()`` when ``device`` is CUDA."""
    if torch.device(device).type != "cuda":
        return fn

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return wrapped


def _label(benchmark, node_name: str) -> str:
    for k in _LABEL_KEYS:
        if benchmark.extra_info.get(k) is not None:
            return str(benchmark.extra_info[k])
    return node_name


def _stat(benchmark, name):
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    if not inner:  # no rounds ran (the case was interrupted): no statistics
        return None
    v = getattr(inner, name, None)
    return v if v else None


_MEDIANS: Dict[tuple, float] = {}


@pytest.fixture(autouse=True)
def _bench_env(request):
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    for k, v in env_info().items():
        benchmark.extra_info.setdefault(k, v)
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    info = benchmark.extra_info
    if HAS_CUDA:
        torch.cuda.synchronize()
        info.setdefault("cuda_max_allocated_bytes", int(torch.cuda.max_memory_allocated()))
    mean, median = _stat(benchmark, "mean"), _stat(benchmark, "median")
    if mean is None or median is None:
        return
    for key, rate in _RATE_KEYS.items():
        if key in info and rate not in info:
            info[rate] = float(info[key]) / mean
    group = getattr(benchmark, "group", None)
    _MEDIANS[(group, _label(benchmark, request.node.name))] = median
    base = info.get("baseline")
    names = [str(x) for x in base] if isinstance(base, (list, tuple)) else [] if base is None else [str(base)]
    measured = [_MEDIANS[(group, n)] for n in names if (group, n) in _MEDIANS]
    if measured and "speedup_vs_baseline" not in info:  # the fastest baseline run so far
        info["speedup_vs_baseline"] = min(measured) / median


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# Keep CPU benchmarks from fighting over the cores with their own threads.
if not HAS_CUDA and os.environ.get("PERSONVLAD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PERSONVLAD_BENCH_THREADS"]))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Drop benchmarks that have no timings before pytest-benchmark writes its
    JSON.  ``bench/gpu_check.sh`` ends a step at its time limit with SIGINT;
    a case stopped before its first round has empty stats, and pytest-benchmark
    (5.x) then fails computing their minimum and writes no JSON at all, losing
    every case that did finish (seen on an H200 run)."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None:
        bs.benchmarks[:] = [b for b in bs.benchmarks if b]
    yield
