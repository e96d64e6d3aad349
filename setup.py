"""Build personvlad and its compiled extension personvlad._C.

- nvcc found (or FORCE_CUDA=1): CUDAExtension with csrc/cpu + csrc/cuda
  (no GPU is needed to compile).  CUDA_HOME is resolved to the real toolkit
  root (the directory holding lib64/libcudart.so) even when nvcc on PATH is a
  wrapper script.
- otherwise, or PERSONVLAD_CPU_ONLY=1: CppExtension with csrc/cpu only.
- TORCH_CUDA_ARCH_LIST defaults to "7.5;8.0;8.6;8.9;9.0+PTX".
- The C++ kernels are compiled with OpenMP where torch's threads are
  OpenMP's (see openmp_compile_flags): their at::parallel_for loops need it.
"""
import glob
import os
import shutil
import sys

from setuptools import setup


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """The CUDA toolkit root holding lib64/libcudart.so, or None."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.environ["CUDA_HOME"])
    if os.environ.get("CUDA_PATH"):
        candidates.append(os.environ["CUDA_PATH"])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        # nvcc may be a shell wrapper ("exec /usr/local/cuda-X/bin/nvcc"): read it.
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode(errors="ignore").split():
                    if tok.endswith("/bin/nvcc") and os.path.exists(tok):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in candidates:
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            if os.path.exists(os.path.join(root, lib, "libcudart.so")) and os.path.exists(
                os.path.join(root, "bin", "nvcc")
            ):
                return os.path.realpath(root)
    return None


if "--print-cuda-home" in sys.argv:  # used by the Makefile, before torch exists
    print(find_cuda_home() or "")
    sys.exit(0)

CPU_ONLY = _truthy("PERSONVLAD_CPU_ONLY")
CUDA_HOME = None if CPU_ONLY else find_cuda_home()
WITH_CUDA = (CUDA_HOME is not None or _truthy("FORCE_CUDA")) and not CPU_ONLY
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # must precede torch.utils.cpp_extension
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;8.6;8.9;9.0+PTX")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
rel = lambda paths: sorted(os.path.relpath(p, here) for p in paths)  # noqa: E731
sources = rel(glob.glob(os.path.join(here, "csrc", "*.cpp")) + glob.glob(os.path.join(here, "csrc", "cpu", "*.cpp")))
# The C++ standard comes from torch (C++17 up to 2.12, C++20 after).
# -ffp-contract=off: every multiply and add is rounded on its own, so the CPU
# kernels' results do not depend on which code path GCC's vectoriser takes.
# With contraction (GCC's default) the AVX-512 clone gave last-bit differences
# in 1 call in 15-20 run from a fresh thread (autograd's backward), which broke
# bitwise kill-and-resume of training (see csrc/cpu/person_vlad_cpu.cpp).
# -Wno-psabi: the tile kernels' 512-bit vector helpers (csrc/cpu/vlad_tiles.h)
# are always inlined, so GCC's note that such arguments changed ABI in GCC 4.6
# does not apply (torch builds with the same flag; a pragma cannot silence it).
cxx_flags = ["-O3", "-ffp-contract=off", "-Wno-psabi"]
define_macros = []


def openmp_compile_flags():
    """The compiler flag that turns on OpenMP, or None where the C++ compiler
    does not take it.  Called where torch's threads are OpenMP's.

    The kernels' loops use at::parallel_for, a header template: when torch's
    intra-op threads are OpenMP's, it parallelises only where the extension
    itself is compiled with OpenMP (_OPENMP); otherwise every loop runs on the
    calling thread.  Compile only: the extension is not linked to an OpenMP
    runtime of its own, so its GOMP_* calls bind to the one torch loaded and
    obey torch.set_num_threads (a second runtime, e.g. the system libgomp
    beside a wheel's renamed copy, would keep its own thread count and pool).
    """
    import subprocess
    import tempfile

    if sys.platform == "win32":
        return "/openmp"  # MSVC has it
    flag = "-fopenmp"
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint probe() { int n = 0;\n#pragma omp parallel\n"
                    "  n = omp_get_num_threads();\n  return n; }\n")
        try:
            r = subprocess.run([cxx, flag, "-c", src, "-o", os.path.join(tmp, "omp_probe.o")],
                               capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
    return flag if r.returncode == 0 else None


import torch  # noqa: E402

# torch's native thread pool (the other backend) needs nothing of ours.
TORCH_OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()
OPENMP_FLAG = openmp_compile_flags() if TORCH_OPENMP else None
if OPENMP_FLAG:
    cxx_flags.append(OPENMP_FLAG)
elif TORCH_OPENMP:
    # csrc/cpu refuses to build silently single-threaded: say so and opt in.
    define_macros.append(("PERSONVLAD_SERIAL_CPU", None))
    print("personvlad: WARNING: the C++ compiler has no usable OpenMP (-fopenmp); the CPU kernels' "
          "loops will run on one thread", file=sys.stderr)
# nvcc compiles a .cu once per architecture in TORCH_CUDA_ARCH_LIST, one after
# the other unless --threads says otherwise; the extension has one .cu, so
# ninja's parallel jobs (MAX_JOBS) never overlap those passes.  On the 2-core
# CI machine the five architectures took 359 s serially and 178 s with 2
# threads.  NVCC_THREADS overrides (0: nvcc takes as many as there are CPUs).
NVCC_THREADS = os.environ.get("NVCC_THREADS") or str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                     else (os.cpu_count() or 1))
if WITH_CUDA:
    sources += rel(glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(here, "csrc", "cuda", "*.cpp")))
    ext = CUDAExtension(
        "personvlad._C",
        sources,
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=define_macros + [("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", f"--threads={NVCC_THREADS}"]},
    )
else:
    ext = CppExtension(
        "personvlad._C",
        sources,
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
    )
print(f"personvlad: building {'CUDA' if WITH_CUDA else 'CPU-only'} extension (OpenMP: {OPENMP_FLAG or 'off'})"
      + (f" (CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
         f"nvcc threads {NVCC_THREADS})" if WITH_CUDA else ""),
      file=sys.stderr)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
