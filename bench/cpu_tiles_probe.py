"""Time the CPU backend's tile loops (csrc/cpu/vlad_tiles.h) alone, per
instruction set, at one sample of the paper shape (K=64, P=110, B=6).

    python bench/cpu_tiles_probe.py [--rev REV] [--out FILE.json]

Builds the header (of the working tree, or of git revision REV) into a small
program per instruction set this CPU runs (avx512f, avx2, the x86-64
baseline), with the extension's flags, and prints the median microseconds of
one forward and one backward tile pass, plus a checksum of their outputs
(same checksum: same bits).  With the header of the current layout each
instance runs at its own vector width, as the extension does; headers from
before 2026-11-28 (one 64-byte vector type for every instruction set) are
built the old way, so the two can be compared on one machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from personvlad._tile_isa import CXX_FLAGS, TILE_ISAS, host_cxx, runnable_tile_isas

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>
#include "vlad_tiles.h"
using namespace personvlad::cpu_tiles;
#ifdef PV_OLD_API
#define FWD(r, s) forward_tiles_impl(r, 0, num_tiles(r.P, lanes<float>()), s.p)
#define BWD(r, s) backward_tiles_impl(r, 0, num_tiles(r.P, lanes<float>()), s.p)
typedef VecBuffer<float> Buf;
#else
#define FWD(r, s) forward_tiles_impl<float, NBX>(r, 0, r.P, s.as<float, NBX>())
#define BWD(r, s) backward_tiles_impl<float, NBX>(r, 0, r.P, s.as<float, NBX>())
typedef VecBuffer Buf;
#endif
template <typename F> double median_us(const F& f) {
  for (int i = 0; i < 50; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < 201; ++i) {
    const auto a = std::chrono::steady_clock::now();
    for (int j = 0; j < 10; ++j) f();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count() / 10);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
int main() {
  const int64_t K = 64, P = 110, B = 6;
  std::vector<float> G(K * P), M(B * P), z(K), A(K * P), S(K * P), dA(K * P), ds(K), dG(K * P), DZ(K * P), dM(B * P);
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  for (auto& x : G) x = nd(g) * 10;
  for (auto& x : M) x = std::abs(nd(g));
  for (auto& x : z) x = nd(g);
  for (auto& x : dA) x = nd(g);
  for (auto& x : ds) x = nd(g);
  TileArgs<float> r;
  r.G = G.data(); r.M = M.data(); r.z = z.data(); r.B = B; r.P = P; r.K = K; r.A = A.data(); r.S = S.data();
  r.dA = dA.data(); r.ds = ds.data(); r.dG = dG.data(); r.DZ = DZ.data(); r.dM = dM.data();
  Buf s(5 * K);
  const double fwd = median_us([&] { FWD(r, s); });
  const double bwd = median_us([&] { BWD(r, s); });
  unsigned long long h = 1469598103934665603ull;  // FNV-1a over the outputs' bytes
  for (const auto* v : {&A, &S, &dG, &DZ, &dM})
    for (const float x : *v) {
      const unsigned char* b = reinterpret_cast<const unsigned char*>(&x);
      for (int i = 0; i < 4; ++i) h = (h ^ b[i]) * 1099511628211ull;
    }
  std::printf("%.3f %.3f %016llx\n", fwd, bwd, h);
}
"""


def probe(rev: str | None = None) -> dict:
    cxx = host_cxx()
    if cxx is None:
        raise SystemExit("needs an x86-64 host C++ compiler")
    with tempfile.TemporaryDirectory() as d:
        header = Path(d) / "vlad_tiles.h"
        if rev:
            header.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:csrc/cpu/vlad_tiles.h"],
                                             check=True, capture_output=True, text=True).stdout)
        else:
            shutil.copy(ROOT / "csrc" / "cpu" / "vlad_tiles.h", header)
        old_api = "block_positions" not in header.read_text()
        (Path(d) / "probe.cpp").write_text(PROGRAM)
        rows = {}
        for isa in runnable_tile_isas():
            extra, nb = TILE_ISAS[isa]
            exe = Path(d) / f"probe_{isa}"
            api = ["-DPV_OLD_API"] if old_api else [f"-DNBX={nb}"]
            subprocess.run([cxx, *CXX_FLAGS, *extra, *api,
                            "-I", d, "-o", str(exe), str(Path(d) / "probe.cpp")], check=True, timeout=300)
            fwd, bwd, checksum = subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                                                timeout=300).stdout.split()
            rows[isa] = {"fwd_us": float(fwd), "bwd_us": float(bwd), "checksum": checksum,
                         "vector_bytes": 64 if old_api else nb}
    return {"rev": rev or "working tree", "shape": {"K": 64, "P": 110, "B": 6}, "compiler": cxx,
            "cpu": platform.processor() or platform.machine(), "instances": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="git revision whose csrc/cpu/vlad_tiles.h to build (default: the working tree)")
    ap.add_argument("--out", help="also write the result as JSON here")
    args = ap.parse_args()
    res = probe(args.rev)
    for isa, r in res["instances"].items():
        print(f"{isa:9s} {r['vector_bytes']:2d}-byte vectors  fwd {r['fwd_us']:8.2f} us  "
              f"bwd {r['bwd_us']:8.2f} us  checksum {r['checksum']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
