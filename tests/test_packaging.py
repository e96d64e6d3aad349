"""What `pip install` gives a user: the sdist carries every source the build
needs, and a wheel built from that sdist alone (the C++ extension compiled,
CPU-only to keep this test near a minute) installs into an empty folder and
works there without the repository on the path: the compiled op, the Triton
kernels package, the packaged backend table, the CLI.

The build runs in a copy of the tracked files, so the checkout gets no
egg-info or build folder.  Marked ``packaging``: ``make compat-test`` leaves it
out (it checks setuptools' packaging, not the torch version)."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.packaging


def _tracked_files():
    if shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("needs a git checkout (the tracked files are what a release packs)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(REPO, p))]


def _run(cmd, cwd, env=None, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r


_CHECK = r"""
import os, sys
import torch
import personvlad
from personvlad import ops, reference
site = sys.argv[1]
assert os.path.realpath(personvlad.__file__).startswith(os.path.realpath(site)), personvlad.__file__
assert ops.extension_loaded(), "the compiled extension did not load"
assert "cpu" in ops.available_backends("cpu"), ops.available_backends("cpu")
g = torch.Generator().manual_seed(0)
F = torch.randn(2, 8, 3, 5, generator=g, dtype=torch.float64)
M = torch.rand(2, 3, 3, 5, generator=g, dtype=torch.float64)
W = torch.randn(4, 8, generator=g, dtype=torch.float64)
z = torch.randn(4, generator=g, dtype=torch.float64)
c = torch.randn(4, 8, generator=g, dtype=torch.float64)
got = ops.person_vlad(F, M, W, z, c, backend="cpu")
want = reference.person_vlad_ref(F, M, W, z, c, True)
assert torch.allclose(got, want, atol=1e-12, rtol=0), (got - want).abs().max()
import personvlad.kernels, personvlad.kernels.person_vlad as k  # the Triton kernels ship as personvlad.kernels
assert os.path.realpath(k.__file__).startswith(os.path.realpath(site)), k.__file__
from personvlad import _backend_table
from personvlad.engine.config import TrainConfig, resolve_config
assert os.path.realpath(resolve_config("mars")).startswith(os.path.realpath(site))  # the shipped configs
assert TrainConfig.from_yaml(resolve_config("mars")).data.dataset == "mars"
assert os.path.isfile(os.path.join(os.path.dirname(personvlad.__file__), "backend_table.json"))
print("installed package OK")
"""


def test_sdist_builds_a_wheel_that_works_outside_the_repo(tmp_path):
    files = _tracked_files()
    src = tmp_path / "src"
    for p in files:
        dst = src / p
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(REPO, p), dst)
    env = dict(os.environ, PERSONVLAD_CPU_ONLY="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("PYTHONPATH", None)

    # 1. the sdist holds every tracked source the build or the package needs
    dist = tmp_path / "dist"
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=src, env=env)
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        members = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    needed = [p for p in files
              if p.startswith(("csrc/", "kernels/", "personvlad/", "configs/"))
              or p in ("setup.py", "pyproject.toml", "CMakeLists.txt", "MANIFEST.in", "README.md")]
    assert any(p.endswith(".cu") for p in needed) and any(p.endswith(".h") for p in needed)
    missing = sorted(set(needed) - members)
    assert not missing, f"{sdist.name} lacks {missing}"

    # 2. a wheel from the unpacked sdist alone (no checkout around it)
    unpacked = tmp_path / "unpacked"
    with tarfile.open(sdist) as t:
        t.extractall(unpacked, filter="data") if sys.version_info >= (3, 12) else t.extractall(unpacked)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
          str(unpacked / top), "-w", str(wheels)], cwd=tmp_path, env=env)
    (whl,) = wheels.glob("personvlad-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
    assert any(n.startswith("personvlad/_C") and n.endswith(".so") for n in names), "no compiled extension"
    for n in ("personvlad/kernels/person_vlad.py", "personvlad/kernels/conv_epilogue.py",
              "personvlad/backend_table.json", "personvlad/ops.py", "personvlad/configs/mars.yaml"):
        assert n in names, f"{whl.name} lacks {n}"
    assert not any(n.startswith(("csrc/", "tests/", "kernels/")) for n in names)

    # 3. installed into an empty folder, used from elsewhere
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
          str(whl)], cwd=tmp_path, env=env)
    run_env = dict(env, PYTHONPATH=str(site), PERSONVLAD_QUIET_EXT="0")
    r = _run([sys.executable, "-c", _CHECK, str(site)], cwd=tmp_path, env=run_env)
    assert "installed package OK" in r.stdout
    r = _run([sys.executable, "-m", "personvlad.cli", "--help"], cwd=tmp_path, env=run_env)
    assert "train" in r.stdout and "evaluate" in r.stdout
