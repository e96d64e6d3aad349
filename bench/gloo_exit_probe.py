"""How often a two-process gloo job aborts at exit, with and without
:func:`personvlad.engine.distributed.drain_gloo`.

    python bench/gloo_exit_probe.py [--runs 40] [--mode plain|drain|both] [--out FILE.json]

Each run spawns two ranks (``torch.multiprocessing.spawn``). Each rank runs
the tail of a DDP job: three DDP steps, an all-reduce of a tensor made in
Python, a barrier, then (``drain`` mode) ``drain_gloo()``, then
``destroy_process_group()``, and exits. ``plain`` is what the trainer did
before drain_gloo. A run fails when a rank dies. The torch bug behind it
makes a rank die with SIGABRT ("terminate called without an active
exception"): a gloo worker thread still frees the last collective's tensors
while the interpreter finalises (see drain_gloo). The JSON holds the counts,
the drain times (ms, per rank and run) and the torch version. Not a test:
the abort is a race, so its rate depends on the machine and its load.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time


def _rank(rank: int, world: int, port: int, drain: bool, result_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4))
    for _ in range(3):
        model(torch.randn(2, 8)).sum().backward()
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.barrier()
    del model, t
    if drain:
        from personvlad.engine.distributed import drain_gloo

        t0 = time.perf_counter()
        ok = drain_gloo()
        with open(os.path.join(result_dir, f"drain{rank}.json"), "w") as f:
            json.dump({"ok": ok, "ms": (time.perf_counter() - t0) * 1e3}, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(runs: int, drain: bool) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    failures, drains, not_ok = [], [], 0
    for i in range(runs):
        with tempfile.TemporaryDirectory() as d:
            try:
                mp.spawn(_rank, args=(2, _free_port(), drain, d), nprocs=2, join=True)
            except mp.ProcessExitedException as e:
                failures.append({"run": i, "rank": e.error_index, "signal": e.signal_name, "exit_code": e.exit_code})
                continue
            for r in range(2):
                if drain:
                    res = json.load(open(os.path.join(d, f"drain{r}.json")))
                    drains.append(round(res["ms"], 3))
                    not_ok += not res["ok"]
    out = {"mode": "drain" if drain else "plain", "runs": runs, "aborted": len(failures), "failures": failures}
    if drain:
        s = sorted(drains)
        out.update(drain_ms={"median": s[len(s) // 2], "max": s[-1]} if s else None, drain_false=not_ok)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--mode", choices=("plain", "drain", "both"), default="both")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if a.runs < 1:
        raise ValueError(f"--runs: expected >= 1, got {a.runs}")
    import platform

    import torch

    modes = ("plain", "drain") if a.mode == "both" else (a.mode,)
    res = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "results": [probe(a.runs, m == "drain") for m in modes]}
    for r in res["results"]:
        extra = f", drain median {r['drain_ms']['median']} ms, max {r['drain_ms']['max']} ms" if r.get("drain_ms") else ""
        print(f"torch {res['torch']}: {r['mode']}: {r['aborted']}/{r['runs']} runs aborted{extra}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
