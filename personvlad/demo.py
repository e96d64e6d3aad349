"""``personvlad demo``: what the package does, on CPU, in a few minutes.

Part 1 (``op``): the fused op's output shape and a side-by-side of time and
peak memory for every backend available here vs the unfused PyTorch forms
(matmul reference, naive per-part broadcast) at a paper-like shape
(N=8, C=256, grid 2x11x5, B=6, K=64), then the layer dropped into a small 2-D
CNN for one training step.

Part 2 (``pipeline``): the whole re-id pipeline on a synthetic MARS-layout
data set — see :mod:`personvlad.demo_pipeline`.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

EPILOG = """examples:
  personvlad demo                 # op comparison + full synthetic pipeline
  personvlad demo --part op       # only the op/layer comparison (seconds)
  DEMO_FAST=1 personvlad demo     # reduced pipeline (CI), same code path
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the op comparison and the whole pipeline on synthetic data (CPU, minutes)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--part", choices=["all", "op", "pipeline"], default="all", help="what to run (default: all)")
    p.add_argument("--out", default="demo_out", help="output folder for data, checkpoints and pictures (default: demo_out)")
    p.add_argument("--fast", action="store_true", default=os.environ.get("DEMO_FAST") == "1",
                   help="reduced budget (also DEMO_FAST=1); same code path")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def _time(fn, reps):
    """Median wall time of ``reps`` calls after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def op_comparison(reps: int = 15) -> list:
    from . import ops, reference
    from ._memory import peak_bytes

    torch.manual_seed(0)
    N, C, S, B, K = 8, 256, (2, 11, 5), 6, 64
    F = torch.relu(torch.randn(N, C, *S))
    M = torch.rand(N, B, *S)
    c = torch.randn(K, C) / math.sqrt(C)
    W, z = 20 * c, -10 * (c * c).sum(1)
    args = [F, M, W, z, c]
    out = ops.person_vlad(*args)
    print(f"person_vlad: features {tuple(F.shape)}, parts {tuple(M.shape)}, K={K} -> output {tuple(out.shape)} "
          f"(backend auto = {ops.resolve_backend(F, M, W)})")

    variants = [("naive per-part NetVLAD (broadcast)", reference.person_vlad_naive),
                ("unfused PyTorch (matmul form)", reference.person_vlad_ref)]
    for b in ops.available_backends("cpu"):
        if b in ("reference", "triton"):
            continue
        variants.append((f"fused '{b}' backend", (lambda b: lambda *a: ops.person_vlad(*a, backend=b))(b)))

    rows = []
    for name, fn in variants:
        def fwd():
            with torch.no_grad():
                fn(*args)

        grads = [t.detach().requires_grad_(True) for t in args]

        def fwdbwd():
            for t in grads:
                t.grad = None
            fn(*grads).sum().backward()

        n = 2 if "naive" in name else reps
        t_f = _time(fwd, n)
        t_fb = _time(fwdbwd, n)
        mem = peak_bytes(fwdbwd, "cpu")
        rows.append((name, t_f * 1e3, t_fb * 1e3, mem / 2**20))
    base = rows[1]
    print(f"\n{'variant':40s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'peak MiB':>9s} {'fwd+bwd speed-up':>17s}")
    for name, tf, tfb, mem in rows:
        print(f"{name:40s} {tf:9.1f} {tfb:11.1f} {mem:9.1f} {base[2] / tfb:16.2f}x")
    print(f"(CPU, median of {reps} runs; speed-up vs the unfused matmul form; peak = resident-memory growth;"
          " the naive form is timed with fewer runs)")
    return rows


def layer_in_cnn() -> None:
    from .nn import PersonVLAD

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
        PersonVLAD(32, num_clusters=8, num_parts=3),
    )
    imgs = torch.rand(4, 3, 32, 16)
    with torch.no_grad():
        feats = net[:-1](imgs)
    net[-1].init_centers(feats.permute(0, 2, 3, 1).reshape(-1, 32))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    desc = net(imgs)
    loss = (desc[0] - desc[1]).pow(2).sum() - (desc[0] - desc[2]).pow(2).sum()
    loss.backward()
    opt.step()
    _, parts = net[-1](feats, return_parts=True)
    print(f"\nPersonVLAD in a 2-D CNN: images {tuple(imgs.shape)} -> descriptors {tuple(desc.shape)} "
          f"(output_dim={net[-1].output_dim}), part maps {tuple(parts.shape)}; one Adam step taken, "
          f"loss {loss.item():.4f}")


def main(args) -> int:
    if args.part in ("all", "op"):
        print("== 1. The fused op and the layer ==")
        op_comparison(reps=5 if args.fast else 15)
        layer_in_cnn()
    if args.part in ("all", "pipeline"):
        from .demo_pipeline import run_pipeline

        print("\n== 2. The re-id pipeline on synthetic MARS-layout data ==")
        run_pipeline(out_dir=args.out, fast=args.fast, seed=args.seed)
    return 0
