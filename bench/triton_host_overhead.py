"""Host-side cost of one eager call of the Triton op, kernel launches stubbed.

Runs without a GPU and without TRITON_INTERPRET: the Triton launchers
(``Autotuner.run``, ``JITFunction.run``) are replaced by no-ops and the
inputs are CPU tensors, so what is timed is everything the host does around
the launches: ``person_vlad_triton``'s checks, the op body (shapes, dot
precisions, allocations -- CPU ``torch.empty`` here, the caching allocator
on a GPU) and, where they are on, the ``triton_op`` / ``custom_op`` dispatch
and autograd wrapper and the ``wrap_triton`` calls.  Not timed: Triton's own
launcher and the kernels (``bench/profile_op.py`` on a GPU has those).

    python bench/triton_host_overhead.py                # forward, tiled path (3 launches), direct eager call
    PERSONVLAD_TRITON_DIRECT=0 python bench/triton_host_overhead.py   # through the op, as before the direct path
    python bench/triton_host_overhead.py --wrap         # through the op, every launch through wrap_triton, as before 208c2e7
    python bench/triton_host_overhead.py --layers       # also: the op body alone, person_vlad's checks
    python bench/triton_host_overhead.py --backward     # also: forward + backward (features require grad)

Prints microseconds per call: the best of --repeats timings of --calls calls.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("PERSONVLAD_QUIET_EXT", "1")

import torch  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _best_us(fn, calls: int, repeats: int) -> float:
    for _ in range(min(50, calls)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wrap", action="store_true",
                   help="through the op, each launch through wrap_triton (as before 208c2e7)")
    p.add_argument("--layers", action="store_true", help="also time the op body alone and person_vlad's checks")
    p.add_argument("--backward", action="store_true", help="also time forward + backward (5 more launches)")
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)

    launches = []
    Autotuner.run = lambda self, *args, **kw: launches.append(self)
    JITFunction.run = lambda self, *args, **kw: launches.append(self)
    from personvlad import ops
    from personvlad.kernels import person_vlad as tk

    tk.check_supported = lambda *args, **kw: None  # CPU tensors outside the interpreter
    # the stubbed kernels leave the buffers uninitialised: denormals there would
    # slow the host-side reductions of the backward down at random
    torch.set_flush_denormal(True)
    if a.wrap:  # before 208c2e7 every eager call went through the op, and each launch through wrap_triton
        os.environ["PERSONVLAD_TRITON_DIRECT"] = "0"
        tk._wrapping = lambda: True
    # the paper's channels, clusters and parts; P = 200 > 128 takes the tiled path
    N, C, P, B, K = 8, 256, 200, 6, 64
    g = torch.Generator().manual_seed(0)
    F, M = torch.randn(N, C, P, generator=g), torch.rand(N, B, P, generator=g)
    W, z, c = torch.randn(K, C, generator=g), torch.randn(K, generator=g), torch.randn(K, C, generator=g)

    def op():
        with torch.no_grad():
            tk.person_vlad_triton(F, M, W, z, c, True)

    launches.clear()
    op()
    names = [getattr(k, "fn", k).__name__ for k in launches]
    print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"launches per call: {len(names)} ({', '.join(names)}); wrap_triton in eager: {a.wrap}; "
          f"through the op: {not tk.direct_call_ok()}")
    print(f"person_vlad_triton, forward: {_best_us(op, a.calls, a.repeats):.1f} us/call")
    if a.backward:
        # The backward's last steps are PyTorch reductions (dW, dz, dc), which
        # on CPU tensors compute for real: at a small N, C, K they cost little,
        # as the asynchronous launches they are on a GPU.  Same P and B.
        n, ch, k = 2, 16, 8
        Fs = torch.randn(n, ch, P, generator=g).requires_grad_(True)
        Ms, Ws, zs, cs = M[:n], W[:k, :ch].contiguous(), z[:k].contiguous(), c[:k, :ch].contiguous()
        dy = torch.ones(n, k * ch)

        def fwd_small():
            with torch.no_grad():
                tk.person_vlad_triton(Fs, Ms, Ws, zs, cs, True)

        def fwd_bwd():
            tk.person_vlad_triton(Fs, Ms, Ws, zs, cs, True).backward(dy)
            Fs.grad = None

        print(f"N={n}, C={ch}, K={k}: forward {_best_us(fwd_small, a.calls, a.repeats):.1f} us/call, "
              f"forward + backward {_best_us(fwd_bwd, a.calls, a.repeats):.1f} us/call")
    if a.layers:
        def body():
            with torch.no_grad():
                tk._forward_impl(F, M, W, z, c, True, False)

        from torch._library.triton import set_wrap_triton_enabled

        with set_wrap_triton_enabled(False):  # as triton_op's eager call runs the body
            print(f"op body alone (_forward_impl): {_best_us(body, a.calls, a.repeats):.1f} us/call")
        print(f"ops.person_vlad checks (_validate): "
              f"{_best_us(lambda: ops._validate(F, M, W, z, c, True, 'auto'), a.calls * 10, a.repeats):.2f} us/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
