"""Peak-memory measurement for benchmarks and the demo.

CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before.
CPU: growth of the process's peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``).  So that blocks freed by earlier calls are not
silently reused, glibc's ``malloc_trim(0)`` first hands every free page of
every arena back to the OS; the measured call then faults in what it
allocates.  The allocator's policy is not changed, so timings taken in the
same process stay representative.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Callable

import torch

@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak memory (bytes) that one call of ``fn`` adds on ``device``;
    -1 where it cannot be measured."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS:")
    except OSError:
        return -1
    fn()
    return max(0, _status_kib("VmHWM:") - base) * 1024
