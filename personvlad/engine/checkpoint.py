"""Training checkpoints: atomic writes, weights-only loading, RNG capture.

A checkpoint is a plain ``dict`` of tensors and Python containers, so it
loads with ``torch.load(weights_only=True)`` (no ``add_safe_globals``):

``format``, ``version`` (package), ``iteration`` (iterations done, over both
steps), ``step`` (1 or 2), ``model`` (state_dict), ``model_config`` (dict),
``optimizer``, ``scheduler``, ``loss`` (state_dict: OIM buffers or the
classifier), ``rng`` (see :func:`capture_rng`), ``config`` (TrainConfig as a
dict), ``best`` (best metric so far) and ``metrics`` (last evaluation).

Writes are atomic: the data goes to a temporary file in the destination
folder, is flushed and fsync'ed, then ``os.replace``'d over the target (and
the folder fsync'ed), so a process killed at any moment leaves either the
old or the new file, never a half-written one.  The temporary file
(``.{name}.XXXXXXXX.tmp``) a killed save leaves behind is removed by the next
save to the same path, so one path must have one writer at a time (two
processes saving the same file concurrently are not supported: one may
remove the other's temporary file, and the last replace would win anyway).
The file gets the mode ``open()`` would give it: the existing target's mode,
else ``0o666 & ~umask`` (not mkstemp's 0o600).
"""
from __future__ import annotations

import glob
import logging
import os
import random
import re
import stat
import tempfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT", "save_checkpoint", "load_checkpoint", "find_latest", "capture_rng", "restore_rng",
    "atomic_write_bytes", "LATEST", "BEST",
]

FORMAT = "personvlad-train/1"
LATEST = "latest.pt"
BEST = "best.pt"
_SNAPSHOT_RE = re.compile(r"^ckpt_(\d+)\.pt$")

# Test hook: called after the temporary file is complete and fsync'ed, just
# before os.replace (tests use it to kill a process mid-save).
_before_replace: Optional[Callable[[str, str], None]] = None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask_now() -> Optional[int]:
    """The process umask read without changing it (Linux >= 4.7), else None."""
    try:
        with open("/proc/self/status", "r", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    # os.umask can only be read by setting it: done once, at import (single
    # threaded then), since a thread creating a file between the two calls
    # would get umask 0.  Used only where /proc/self/status has no Umask line.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def _file_mode(path: str) -> int:
    """The permission bits ``open(path, "w")`` would leave ``path`` with."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mask = _umask_now()
        return 0o666 & ~(_UMASK_AT_IMPORT if mask is None else mask)


def _tmp_name_re(base: str) -> "re.Pattern[str]":
    # mkstemp names: prefix + 8 chars of [a-z0-9_] + suffix (no dot inside, so
    # "latest.pt" never matches the temporary files of "latest.pt.bak")
    return re.compile(re.escape(f".{base}.") + r"[a-z0-9_]{8}" + re.escape(".tmp"))


def _remove_stale_tmp(directory: str, base: str) -> None:
    """Remove ``.{base}.XXXXXXXX.tmp`` files left by saves killed before their
    replace (one writer per path: any such file is not this save's)."""
    pat = _tmp_name_re(base)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if pat.fullmatch(name):
            try:
                os.unlink(os.path.join(directory, name))
                log.info("removed a stale temporary file %s", os.path.join(directory, name))
            except OSError:
                pass


def _atomic(path: str, write: Callable[[Any], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    os.makedirs(directory, exist_ok=True)
    _remove_stale_tmp(directory, base)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if _before_replace is not None:
            _before_replace(tmp, path)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def save_checkpoint(state: Dict[str, Any], path: str) -> str:
    """Write ``state`` to ``path`` atomically (temp file + fsync + os.replace)."""
    if not isinstance(state, dict):
        raise ValueError(f"state: expected a dict, got {type(state).__name__}")
    state = dict(state)
    state.setdefault("format", FORMAT)
    _atomic(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` plus a format check."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: expected a personvlad checkpoint file, not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: expected a personvlad checkpoint readable with weights_only=True; {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: expected a checkpoint dict with a 'model' entry, got "
                         f"{type(state).__name__}{' without model' if isinstance(state, dict) else ''}")
    return state


def snapshot_name(iteration: int) -> str:
    return f"ckpt_{iteration:08d}.pt"


def list_snapshots(out_dir: str) -> List[str]:
    """``ckpt_XXXXXXXX.pt`` files in ``out_dir``, oldest first."""
    found = []
    for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")):
        m = _SNAPSHOT_RE.match(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def keep_snapshot(latest_path: str, iteration: int, keep: int) -> str:
    """Make ``ckpt_XXXXXXXX.pt`` next to ``latest_path`` a hard link of it (a
    copy where links are not supported) and prune all but the newest ``keep``."""
    import shutil

    directory = os.path.dirname(os.path.abspath(latest_path))
    snap = os.path.join(directory, snapshot_name(iteration))
    tmp = snap + ".tmp"
    try:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.link(latest_path, tmp)
    except OSError:
        shutil.copyfile(latest_path, tmp)
    os.replace(tmp, snap)
    for old in list_snapshots(directory)[:-keep]:
        try:
            os.unlink(old)
        except OSError:
            pass
    return snap


def find_latest(out_dir: str) -> Optional[str]:
    """The newest loadable checkpoint in ``out_dir``: ``latest.pt`` if it
    loads, else the newest ``ckpt_*.pt`` that does; ``None`` if none."""
    best_it, best_path = -1, None

    def try_load(p):
        try:
            return int(load_checkpoint(p).get("iteration", -1))
        except (ValueError, OSError, RuntimeError) as e:
            log.warning("skipping unreadable checkpoint %s: %s", p, e)
            return None

    latest = os.path.join(out_dir, LATEST)
    if os.path.isfile(latest):
        it = try_load(latest)
        if it is not None:
            best_it, best_path = it, latest
    for p in reversed(list_snapshots(out_dir)):
        named = int(_SNAPSHOT_RE.match(os.path.basename(p)).group(1))
        if named <= best_it:
            break
        it = try_load(p)
        if it is not None and it > best_it:
            best_it, best_path = it, p
            break
    return best_path


# ----------------------------------------------------------------- RNG state
def capture_rng(extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states as weights_only-safe values."""
    np_state = np.random.get_state(legacy=False)
    out: Dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    if extra:
        out.update(extra)
    return out


def restore_rng(state: Dict[str, Any]) -> None:
    if "python" in state:
        random.setstate(_to_tuples(state["python"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state({
            "bit_generator": n["bit_generator"],
            "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": int(n["pos"])},
            "has_gauss": int(n["has_gauss"]),
            "gauss": float(n["gauss"]),
        })
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda[:n]])


def _to_lists(v):
    if isinstance(v, (tuple, list)):
        return [_to_lists(x) for x in v]
    return v


def _to_tuples(v):
    if isinstance(v, list):
        return tuple(_to_tuples(x) for x in v)
    return v


def generator_state(gen: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    return None if gen is None else gen.get_state()
