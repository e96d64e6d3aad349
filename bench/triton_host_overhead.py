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
    python bench/triton_host_overhead.py --launcher     # Triton's own launch path too (see below)
    python bench/triton_host_overhead.py --path single  # the one-program forward (P = 110) instead of the tiled one
    python bench/triton_host_overhead.py --launcher --untuned   # every launch through Autotuner.run (before kernels.tuned)
    python bench/triton_host_overhead.py --launcher --ab-tuned  # both, interleaved in one process (min and median)

``--launcher`` keeps ``Autotuner.run`` and ``JITFunction.run`` and stubs one
level lower: Triton's driver answers for an sm_90 device 0 (stream 0, a
benchmarker that times nothing, so the autotuners settle on their first
config without running anything), the kernels are compiled for sm_90 on the
first call, and each compiled kernel's launcher (the C function that packs
the arguments and calls ``cuLaunchKernel``) is a no-op.  What that adds to
the default mode is Triton's Python per launch: the autotuner's key and
cache, argument binding and specialisation, the compiled-kernel cache key,
the grid.

Prints microseconds per call: the best of --repeats timings of --calls calls.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import types

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("PERSONVLAD_QUIET_EXT", "1")

import torch  # noqa: E402
import triton  # noqa: E402
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


def _fake_sm90_driver(launches) -> None:
    """Triton's driver for an sm_90 device that launches nothing (--launcher):
    each compiled kernel's launcher records the kernel's name instead."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    class FakeDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):  # every config "takes" 1 ms: the first is chosen, none is run
            return lambda fn, quantiles=None, **kw: [1.0] * len(quantiles) if quantiles else 1.0

    def init_handles(self):
        if self.module is None:
            self.module, self.function = object(), 0
            self._run = lambda *args: launches.append(types.SimpleNamespace(__name__=self.name))

    driver.set_active(FakeDriver())
    CompiledKernel._init_handles = init_handles


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wrap", action="store_true",
                   help="through the op, each launch through wrap_triton (as before 208c2e7)")
    p.add_argument("--layers", action="store_true", help="also time the op body alone and person_vlad's checks")
    p.add_argument("--backward", action="store_true", help="also time forward + backward (5 more launches)")
    p.add_argument("--launcher", action="store_true",
                   help="keep Triton's launch path, stub only the driver and the compiled kernels' launchers")
    p.add_argument("--untuned", action="store_true",
                   help="launch autotuned kernels through Autotuner.run every time, as before kernels._launch.tuned")
    p.add_argument("--ab-tuned", action="store_true",
                   help="time the forward with and without kernels.tuned, interleaved in blocks of --calls, "
                        "--repeats blocks each (this machine's timings drift by +-20%% from run to run)")
    p.add_argument("--path", choices=("tiled", "single", "split"), default="tiled",
                   help="forward path (PERSONVLAD_TRITON_FWD); single/split run at P = 110 (the paper's grid)")
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)

    launches = []
    if a.launcher:
        _fake_sm90_driver(launches)
    else:
        def autotuner_run(self, *args, **kw):  # settles on the first config, as kernels.tuned expects
            launches.append(self)
            self.best_config = self.configs[0]

        Autotuner.run = autotuner_run
        JITFunction.run = lambda self, *args, **kw: launches.append(self)
    os.environ["PERSONVLAD_TRITON_FWD"] = a.path
    # the dot precision of an H100/H200: on CPU tensors the host would pick
    # "ieee", whose smaller one-program tile sends P = 110 down the tiled path
    os.environ["PERSONVLAD_TRITON_DOT"] = "tf32x3"
    from personvlad import ops
    from personvlad.kernels import person_vlad as tk

    tk.check_supported = lambda *args, **kw: None  # CPU tensors outside the interpreter
    if a.untuned:
        tk.tuned = lambda kernel: kernel
    # the stubbed kernels leave the buffers uninitialised: denormals there would
    # slow the host-side reductions of the backward down at random
    torch.set_flush_denormal(True)
    if a.wrap:  # before 208c2e7 every eager call went through the op, and each launch through wrap_triton
        os.environ["PERSONVLAD_TRITON_DIRECT"] = "0"
        tk._wrapping = lambda: True
    # the paper's channels, clusters and parts; P = 200 > 128 takes the tiled path
    N, C, P, B, K = 8, 256, 200 if a.path == "tiled" else 110, 6, 64
    g = torch.Generator().manual_seed(0)
    F, M = torch.randn(N, C, P, generator=g), torch.rand(N, B, P, generator=g)
    W, z, c = torch.randn(K, C, generator=g), torch.randn(K, generator=g), torch.randn(K, C, generator=g)

    def op():
        with torch.no_grad():
            tk.person_vlad_triton(F, M, W, z, c, True)

    launches.clear()
    op()  # with --launcher: compiles the kernels for sm_90
    names = [getattr(k, "fn", k).__name__ for k in launches]
    print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, triton {triton.__version__}; "
          f"forward path {a.path}, P={P}; launches per call: {len(names)} ({', '.join(names)}); "
          f"wrap_triton in eager: {a.wrap}; through the op: {not tk.direct_call_ok()}; "
          f"Triton's launch path: {'run, launcher stubbed' if a.launcher else 'stubbed'}; "
          f"autotuners {'run every launch' if a.untuned else 'past after their choice (kernels.tuned)'}")
    if a.ab_tuned:
        real_tuned, blocks = tk.tuned, {"untuned": [], "tuned": []}
        for _ in range(a.repeats):
            for name, fn in (("untuned", lambda kernel: kernel), ("tuned", real_tuned)):
                tk.tuned = fn
                blocks[name].append(_best_us(op, a.calls, 1))
        tk.tuned = real_tuned
        for name, ts in blocks.items():
            print(f"person_vlad_triton, forward, {name}: min {min(ts):.1f}, median {statistics.median(ts):.1f} us/call")
    else:
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
