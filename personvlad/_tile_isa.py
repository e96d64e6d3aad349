"""The C++ CPU backend's tile-loop instances (csrc/cpu/vlad_tiles.h), for the
code that builds that header on its own: the tests that check every instance
gives the same bits, and bench/cpu_tiles_probe.py, which times them.

The extension (csrc/cpu/person_vlad_cpu.cpp) builds the same three instances
with target attributes and picks one at run time; this module gives the
matching compiler flags, vector width and the instances this CPU can run.
"""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import List, Optional, Set

# instance -> (extra compiler flags, vector width in bytes), widest first
TILE_ISAS = {"avx512f": (["-mavx512f"], 64), "avx2": (["-mavx2"], 32), "baseline": ([], 16)}
# the extension's own C++ flags (setup.py), less OpenMP: the header has no parallel loop
CXX_FLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-Wno-psabi"]


def cpu_flags() -> Set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runnable_tile_isas() -> List[str]:
    """The instances this CPU runs, widest first; the baseline always."""
    flags = cpu_flags()
    return [isa for isa in TILE_ISAS if isa == "baseline" or isa in flags]


def host_cxx() -> Optional[str]:
    """An x86-64 host C++ compiler ($CXX, g++ or c++), or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
