"""Where the fused op's time goes, per variant: wall time, device time and the
kernels (``torch.profiler``), at the op benchmarks' shapes.

    python bench/profile_op.py --out DIR                       # GPU: paper + large, bf16 + fp32
    python bench/profile_op.py --device cpu --shapes tiny --out DIR   # (what the test runs)

For each shape, dtype, variant (``fused-cuda``, ``fused-triton``,
``fused-triton-split`` (paper shape), ``fused-triton-stream`` (large shape, forward),
``fused-cuda-split3`` (bf16), ``fused-cuda-1k`` (samples split over blocks at both shapes),
``fused-cuda-1k-tc`` (bf16: its products on tensor cores), ``unfused-compile``,
``floor`` (no VLAD work: the harness's own cost), ``unfused-eager``; on CPU ``fused-cpu`` and
``unfused-eager``) and pass (``fwd``, ``fwdbwd``) it records

- ``wall_us``: median over ``--rounds`` of one call + synchronize (what the
  op benchmarks time: host overhead and launch latency included);
- ``pipelined_us``: ``--rounds`` calls back to back, one synchronize at the
  end, per call: with the host running ahead, this is the device time when
  the GPU is the bottleneck and the host time when it is not;
- ``device_busy_us``: the sum of the kernels' (and copies') device time per
  call, from the profiler (CUDA only): what the GPU itself spends;
- ``kernels``: the top entries of that sum, ``[name, launches per call, us per call]``
  (on CPU the top operators by self CPU time instead);
- ``launches_per_call``.

``wall_us - device_busy_us`` is roughly what host overhead and gaps cost;
``device_busy_us`` against the roofline is what kernel work could still win.
Writes ``profile_op.json`` and ``profile_op.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _env import scoped_env  # noqa: E402
from test_bench_ops import _ABLATION_ENV, GPU_SHAPES, _inputs, _op_step, _skip_reason, _variants  # noqa: E402

SHAPES = dict(GPU_SHAPES, tiny=dict(N=2, C=16, S=(2, 3, 2), B=2, K=4))
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GPU_VARIANTS = ("fused-cuda", "fused-triton", "fused-triton-split", "fused-triton-stream", "fused-cuda-split3",
                "fused-cuda-1k", "fused-cuda-1k-tc", "unfused-compile", "unfused-eager", "floor")
CPU_VARIANTS = ("fused-cpu", "unfused-eager")


def _device_us(evt) -> float:
    v = getattr(evt, "self_device_time_total", None)
    if v is None:
        v = getattr(evt, "self_cuda_time_total", 0.0)
    return float(v)


def profile_case(fn, args, mode, device, rounds, top):
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = _op_step(fn, args, mode)  # unsynchronised: the pipelined timing needs that
    for _ in range(3):  # compilation, autotuning, cuDNN/cuBLAS heuristics
        step()
    sync()
    walls = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        sync()
        walls.append(time.perf_counter() - t0)
    sync()
    t0 = time.perf_counter()
    for _ in range(rounds):
        step()
    sync()
    pipelined = (time.perf_counter() - t0) / rounds
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    n_prof = max(3, rounds // 2)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n_prof):
            step()
        sync()
    rows = []
    if cuda:
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA and _device_us(e) > 0:
                rows.append((e.key, e.count / n_prof, _device_us(e) / n_prof))
    else:
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0:
                rows.append((e.key, e.count / n_prof, float(e.self_cpu_time_total) / n_prof))
    rows.sort(key=lambda r: -r[2])
    out = dict(
        wall_us=statistics.median(walls) * 1e6,
        wall_min_us=min(walls) * 1e6,
        pipelined_us=pipelined * 1e6,
        launches_per_call=sum(r[1] for r in rows) if cuda else None,
        kernels=[[k, round(c, 2), round(t, 2)] for k, c, t in rows[:top]],
    )
    if cuda:
        out["device_busy_us"] = sum(r[2] for r in rows)
    return out


def run(device, shapes, dtypes, variants, modes, rounds, top, save=None):
    """Profile every case; ``save(results)`` after each one, so a run stopped
    at a time limit keeps the cases that finished."""
    table = _variants(device)
    results = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for dname in dtypes:
            dtype = DTYPES[dname]
            if device == "cpu" and dtype != torch.float32:
                continue
            for mode in modes:
                for v in variants:
                    if v not in table:
                        continue
                    if _skip_reason(v, shape_name, shape, dtype, mode):
                        continue  # as in the op benchmarks
                    torch.manual_seed(0)
                    args = _inputs(shape, dtype, device, requires_grad=(mode == "fwdbwd"))
                    rec = dict(shape=shape_name, dtype=dname, mode=mode, variant=v, N=shape["N"], C=shape["C"],
                               P=math.prod(shape["S"]), B=shape["B"], K=shape["K"])
                    try:
                        with scoped_env(_ABLATION_ENV.get(v, {})):  # the variant's switch, for this case only
                            rec.update(profile_case(table[v], args, mode, device, rounds, top))
                    except Exception as e:  # one failing variant must not cost the others
                        rec["error"] = f"{type(e).__name__}: {e}"
                    results.append(rec)
                    print(_line(rec), flush=True)
                    if save is not None:
                        save(results)
                    del args
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return results


def _line(r):
    if "error" in r:
        return f"{r['shape']:6} {r['dtype']:4} {r['mode']:6} {r['variant']:16} ERROR {r['error']}"
    busy = r.get("device_busy_us")
    busy_s = f"busy {busy:8.1f} us  launches {r['launches_per_call']:5.1f}" if busy is not None else ""
    return (f"{r['shape']:6} {r['dtype']:4} {r['mode']:6} {r['variant']:16} wall {r['wall_us']:8.1f} us  "
            f"pipelined {r['pipelined_us']:8.1f} us  {busy_s}")


def markdown(results, env):
    lines = [f"# Op profile ({env['device']}, torch {env['torch']})", "",
             "wall: one call + sync (median); pipelined: back-to-back calls, per call; "
             "busy: device time of the kernels per call (profiler).", ""]
    lines += ["| shape | dtype | pass | variant | wall µs | pipelined µs | busy µs | launches | top kernels (µs per call) |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['variant']} | error: {r['error']} | | | | |")
            continue
        busy = r.get("device_busy_us")
        busy_s = "" if busy is None else f"{busy:.1f}"
        n = r["launches_per_call"]
        n_s = "" if n is None else f"{n:.0f}"
        top = "; ".join(f"{k[:48]} {t:.1f}" for k, _, t in r["kernels"][:4])
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['variant']} | {r['wall_us']:.1f} | "
                     f"{r['pipelined_us']:.1f} | {busy_s} | {n_s} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES) + " (default: paper,large)")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--variants", default=None)
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("profile_op: no CUDA device (use --device cpu)")
    shapes = (a.shapes or "paper,large").split(",")
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r}; expected some of {sorted(SHAPES)}")
    variants = a.variants.split(",") if a.variants else list(GPU_VARIANTS if a.device == "cuda" else CPU_VARIANTS)
    env = dict(device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu", torch=torch.__version__,
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if a.device == "cuda" else None)
    os.makedirs(a.out, exist_ok=True)

    def save(results):
        for name, text in (("profile_op.json", json.dumps(dict(env=env, results=results), indent=1)),
                           ("profile_op.md", markdown(results, env))):
            tmp = os.path.join(a.out, f".{name}.part")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(a.out, name))

    results = run(a.device, shapes, a.dtypes.split(","), variants, a.modes.split(","), a.rounds, a.top, save)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
