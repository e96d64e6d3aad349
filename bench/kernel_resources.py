"""Registers, spills and shared memory of every autotuned Triton kernel config,
compiled ahead of time for real GPU targets -- no GPU needed.

Each config of each kernel in kernels/person_vlad.py is compiled for the
target with the dot precisions the host would pick there
(:func:`personvlad.kernels.person_vlad.dot_precisions`), and the cubin's
resource usage is read with the ``cuobjdump`` that Triton ships.  A config
whose registers spill to the stack runs far slower than its neighbours; one
that needs more shared memory than the GPU has cannot launch.  Exits 1 when a
config spills more than ``--max-stack`` bytes.

    python bench/kernel_resources.py                       # sm_90 and sm_75, bf16 and fp32, K=64
    python bench/kernel_resources.py --targets 90 --block-k 64 128 --json out.json
    python bench/kernel_resources.py --scan --block-k 128 --max-stack 0   # candidates for new lists

Runs without ``TRITON_INTERPRET`` (the interpreter's config lists are cut to
one small config).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("PERSONVLAD_QUIET_EXT", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from personvlad.kernels import person_vlad as tk  # noqa: E402

_INTS = ("C", "P", "K", "B", "NSLOT", "P_BUCKET", "N", "NPG", "NCHUNK", "NSLICE")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(path):
        raise SystemExit(f"cuobjdump not found at {path} (it ships with Triton's NVIDIA backend)")
    return path


def _compile(fn, sig: Dict[str, str], consts: Dict, warps: int, stages: int, cap: int):
    names = fn.arg_names
    full = {n: ("constexpr" if n in consts else sig.get(n, "i32")) for n in names}
    src = ASTSource(fn=fn, signature=full, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options={"num_warps": warps, "num_stages": stages})


def _usage(kernel, tool: str) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = _RES.search(out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out[-500:]}")
    reg, stack, _static_smem, local = map(int, m.groups())
    return {"regs": reg, "stack": stack, "local": local, "smem": int(kernel.metadata.shared)}


def cases(dtype: str, cap: int, block_k: int):
    """(kernel name, jit fn, signature, constexprs, [(config dict, warps, stages)])."""
    f, f32 = f"*{dtype}", "*fp32"
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    logit, gemm = tk.dot_precisions(torch.device("cuda", 0), tdt, capability=divmod(cap, 10))

    def cfgs(kernel):
        return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kernel.configs]

    ints = {n: "i32" for n in _INTS}
    out = []
    for bp in (64, 128):
        if block_k * bp <= tk.SINGLE_MAX_TILE[gemm]:  # the host sends larger tiles down the tiled path
            out.append((f"fwd_single(BLOCK_P={bp})", tk._fwd_single_kernel.fn,
                        dict(ints, F_ptr=f, M_ptr=f, W_ptr=f32, Z_ptr=f32, CEN_ptr=f32, OUT_ptr=f, NORM_ptr=f32),
                        dict(HAS_PARTS=True, NORMALIZE=True, LOGIT_PREC=logit, DOT_PREC=gemm,
                             BLOCK_K=block_k, BLOCK_P=bp), cfgs(tk._fwd_single_kernel)))
            out.append((f"fwd_split(BLOCK_P={bp})", tk._fwd_split_kernel.fn,
                        dict(ints, F_ptr=f, M_ptr=f, W_ptr=f32, Z_ptr=f32, CEN_ptr=f32, OUT_ptr=f, V_ptr=f32,
                             SS_ptr=f32, CNT_ptr="*i32", NORM_ptr=f32),
                        dict(HAS_PARTS=True, NORMALIZE=True, LOGIT_PREC=logit, DOT_PREC=gemm, BLOCK_K=block_k,
                             BLOCK_P=bp, FIN_C=tk._block_c_rows(block_k, tk.MAX_CHANNELS), SPLIT_C=128),
                        cfgs(tk._fwd_split_kernel if cap != 90 else tk._fwd_split_kernel_sm90)))
    # the streamed forward (any P), normalised: V in the float32 output, or
    # its high halves in a 16-bit output and the low halves in an int16
    # buffer, as the host launches it
    out.append(("fwd_stream", tk._fwd_stream_kernel.fn,
                dict(ints, F_ptr=f, M_ptr=f, W_ptr=f32, Z_ptr=f32, CEN_ptr=f32, OUT_ptr=f,
                     V_ptr=f32 if dtype == "fp32" else "*i16", CNT_ptr="*i32", NORM_ptr=f32),
                dict(HAS_PARTS=True, NORMALIZE=True, V_IS_OUT=(dtype == "fp32"), V_HALVES=(dtype != "fp32"),
                     LOGIT_PREC=logit, DOT_PREC=gemm,
                     BLOCK_K=block_k, FIN_C=tk._block_c_rows(block_k, tk.MAX_CHANNELS),
                     STREAM_C=tk.stream_channels(block_k, tk.MAX_CHANNELS)),
                cfgs(tk._fwd_stream_kernel)))
    out.append(("fwd_assign", tk.assign_kernel(block_k).fn,
                dict(ints, F_ptr=f, M_ptr=f, W_ptr=f32, Z_ptr=f32, AP_ptr=f32, SPART_ptr=f32),
                dict(HAS_PARTS=True, LOGIT_PREC=logit, BLOCK_K=block_k), cfgs(tk.assign_kernel(block_k))))
    gemm_cfgs = cfgs(tk._gemm_kc_kernel)  # its BLOCK_K is a tile of its own, independent of K
    for sub in (True, False):
        out.append((f"gemm_kc(SUB_SC={sub})", tk._gemm_kc_kernel.fn,
                    dict(ints, X_ptr=f32, F_ptr=f, S_ptr=f32, CEN_ptr=f32, OUT_ptr=f32),
                    dict(SUB_SC=sub, DOT_PREC=gemm), gemm_cfgs))
    out.append(("bwd_main", tk._bwd_main_kernel.fn,
                dict(ints, F_ptr=f, M_ptr=f, W_ptr=f32, Z_ptr=f32, DV_ptr=f32, DS_ptr=f32, DF_ptr=f, DM_ptr=f,
                     DG_ptr=f32, DZPART_ptr=f32, SPART_ptr=f32),
                dict(HAS_PARTS=True, LOGIT_PREC=logit, DOT_PREC=gemm, BLOCK_K=block_k),
                cfgs(tk.bwd_main_kernel(block_k))))
    return (logit, gemm), out


# --scan: every combination, for the kernels whose tiles grow with BLOCK_K
SCAN_KERNELS = ("fwd_assign", "bwd_main", "fwd_stream")
SCAN_GRID = [(dict(BLOCK_P=bp, BLOCK_C=bc), w, st)
             for bp in (16, 32, 64) for bc in (16, 32) for w in (4, 8) for st in (1, 2)]


def run(targets: List[int], dtypes: List[str], block_ks: List[int], scan: bool = False) -> List[Dict]:
    tool = _cuobjdump()
    rows = []
    for cap in targets:
        for dtype in dtypes:
            for bk in block_ks:
                precs, kernels = cases(dtype, cap, bk)
                if scan:
                    kernels = [(n, fn, sig, consts, SCAN_GRID) for n, fn, sig, consts, _ in kernels
                               if n in SCAN_KERNELS]
                for name, fn, sig, consts, configs in kernels:
                    for cfg, warps, stages in configs:
                        k = _compile(fn, sig, dict(consts, **cfg), warps, stages, cap)
                        row = dict(target=f"sm_{cap}", dtype=dtype, BLOCK_K=bk, logit_prec=precs[0],
                                   dot_prec=precs[1], kernel=name, config=cfg, num_warps=warps,
                                   num_stages=stages, **_usage(k, tool))
                        rows.append(row)
                        print(f"sm_{cap} {dtype:4s} K{bk:<3d} {precs[0]:>6s}/{precs[1]:<6s} {name:24s} "
                              f"{' '.join(f'{a}={b}' for a, b in cfg.items()):36s} w{warps} s{stages}  "
                              f"regs {row['regs']:3d}  stack {row['stack']:5d}  smem {row['smem']:6d}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, nargs="+", default=[90, 75], help="compute capabilities x10 (default: 90 75)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--block-k", type=int, nargs="+", default=[64], help="BLOCK_K values (K rounded up to a power of two)")
    p.add_argument("--max-stack", type=int, default=128, help="fail when a config spills more bytes than this")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--scan", action="store_true",
                   help=f"instead of the autotune lists, compile {len(SCAN_GRID)} configs (BLOCK_P 16/32/64 x "
                        f"BLOCK_C 16/32 x 4/8 warps x 1/2 stages) of {', '.join(SCAN_KERNELS)}: to choose lists")
    a = p.parse_args(argv)
    rows = run(a.targets, a.dtypes, a.block_k, a.scan)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["stack"] > a.max_stack]
    for r in bad:
        print(f"SPILLS: {r['target']} {r['dtype']} K{r['BLOCK_K']} {r['kernel']} {r['config']} "
              f"w{r['num_warps']} s{r['num_stages']}: {r['stack']} bytes of stack", file=sys.stderr)
    print(f"{len(rows)} configs, {len(bad)} spilling more than {a.max_stack} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
