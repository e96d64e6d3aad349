"""torch.distributed helpers for ``torchrun``-launched training.

``torchrun --nproc_per_node=N -m personvlad.cli train ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT``; :func:`setup` reads
them and initialises NCCL (CUDA) or gloo (CPU).  Without them everything runs
in one process (rank 0 of 1).
"""
from __future__ import annotations

import datetime
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "cleanup", "drain_gloo", "is_dist", "barrier", "broadcast_object", "all_reduce_mean",
           "launched_by_torchrun"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device: expected an available device, got {pref!r} but CUDA is not available")
        if pref == "cuda":
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return torch.device(pref)
    if pref != "cpu":
        raise ValueError(f"device: expected auto|cpu|cuda|cuda:N, got {pref!r}")
    return torch.device("cpu")


def setup(device_pref: str = "auto", timeout_minutes: int = 120) -> DistInfo:
    """Initialise the process group when launched by torchrun (env vars) or
    return the single-process info.  An already initialised group is reused."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = resolve_device(device_pref, local)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistInfo(rank, world, local, dist.get_backend(), device, False)
    if not launched_by_torchrun():
        device = resolve_device(device_pref, 0)
        if device.type == "cuda":
            # device: cuda:N in one process: streams, events and pinned copies
            # then all belong to that device
            torch.cuda.set_device(device)
        return DistInfo(device=device)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_pref, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local, backend, device, True)


def cleanup(info: DistInfo, *, drain: bool) -> None:
    """Tear down the process group this process set up.  With ``drain=True``
    (a run that ended normally on every rank) a gloo group is drained first
    (:func:`drain_gloo`).  The drain is a collective, so a run that failed
    passes ``drain=False`` and does not wait on ranks that may be gone.  The
    argument has no default: a caller on a failure path cannot get the
    collective by forgetting it."""
    if info.initialized_here and dist.is_available() and dist.is_initialized():
        if drain and dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            drain_gloo()
        dist.destroy_process_group()


def drain_gloo(deadline_s: float = 10.0) -> bool:
    """Return once every gloo worker thread has let go of the collectives it ran.

    Why: a gloo worker thread wakes the waiting caller as soon as a collective
    is done, and only then destroys the work item and the tensors it holds.  A
    tensor made in Python has a Python object, so dropping it takes the GIL.
    If the interpreter is finalising by then, the thread cannot take the GIL,
    and the process aborts at exit with SIGABRT ("terminate called without an
    active exception") after a run that succeeded.  This is a torch bug (seen
    on torch 2.11 and 2.14); ``bench/gloo_exit_probe.py`` reproduces it and
    measures this drain.

    How: each worker thread destroys its previous work item before it takes
    the next one.  So this all-reduces one sentinel tensor at a time and
    waits until its last reference is dropped.  A weakref callback runs in the
    thread that drops it, which names the worker thread.  Once every worker
    thread of the group (``options._threads``, 2 by default) has released a
    sentinel, nothing that ran before the drain is still held.  Each sentinel
    also carries this rank's "need more" flag, so all ranks stop after the
    same round.  Returns False if ``deadline_s`` passed first; the caller
    then goes on as before.
    """
    try:
        threads = int(dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._threads)
    except (AttributeError, RuntimeError, TypeError, ValueError):
        threads = 2  # torch's default
    seen = set()
    caller = threading.get_ident()

    def released(_ref) -> None:  # runs in the thread that dropped the sentinel
        seen.add(threading.get_ident())

    end = time.monotonic() + deadline_s
    need = 1.0
    while True:
        sentinel = torch.tensor([need], dtype=torch.float64)
        ref = weakref.ref(sentinel, released)
        dist.all_reduce(sentinel)
        more = float(sentinel[0]) > 0
        del sentinel
        while ref() is not None and time.monotonic() < end:
            time.sleep(0.0002)  # lets the worker thread take the GIL
        done = len(seen - {caller}) >= threads
        if not more:
            return done
        need = 0.0 if done or time.monotonic() >= end else 1.0


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box: List[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()
