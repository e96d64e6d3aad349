"""Eager launches of autotuned Triton kernels without ``Autotuner.run``'s
per-call Python.

Once an autotuner has chosen a config for a key, every further
``Autotuner.run`` still rebuilds that key from a dict of all the arguments
(a comprehension over the argument names, ``str()`` of every tensor's dtype),
merges the config's kwargs and checks its hooks before it calls the
``JITFunction``.  Skipping that saves 10-12 us per autotuned launch on a
2-core Xeon (medians of ``bench/triton_host_overhead.py --launcher
--ab-tuned``; a one-program forward's host time is ~70 us there).  :func:`tuned`
wraps an autotuner so that an eager launch looks the chosen config up by a
tuple of the same key values (the tuner's key arguments, then the dtypes of
the tensor arguments, positional and keyword) and calls ``JITFunction.run`` with it directly.  A key
it has not seen goes through the autotuner (which benchmarks, or takes its
own cache) and remembers ``best_config``.  The kernel that runs, its
config and its specialisation (left to ``JITFunction.run``) are the ones
``Autotuner.run`` would use.  (``best_config`` is read under the launcher's
lock right after its own call; a launch of the same autotuner from outside
:func:`tuned` on another thread in between -- none in this package -- could
leave another key's config there: a slower launch, or one rounded
differently, not a wrong one -- every config of a kernel computes the op.)

Only autotuners without hooks qualify (no ``reset_to_zero`` /
``restore_value``, no config ``pre_hook``, no pruning); anything else, or a
Triton whose autotuner lacks the attributes this relies on, is returned
unchanged.  torch.compile / make_fx launches keep going through
``wrap_triton`` and the autotuner itself.
"""
from __future__ import annotations

import threading

import torch

__all__ = ["tuned"]


class _Tuned:
    """``tuner[grid](*args, **kw)`` with the chosen config looked up by key."""

    __slots__ = ("tuner", "_run", "_key_at", "_best", "_lock")

    def __init__(self, tuner):
        self.tuner = tuner
        self._run = tuner.fn.run
        names = list(tuner.arg_names)
        self._key_at = tuple((names.index(k), k) for k in tuner.keys)
        self._best = {}
        self._lock = threading.Lock()

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launch(grid, args, kw)

    def launch(self, grid, args, kw):
        n = len(args)
        key = tuple(args[i] if i < n else kw.get(k) for i, k in self._key_at) + tuple(
            a.dtype for a in args if isinstance(a, torch.Tensor)) + tuple(
            v.dtype for v in kw.values() if isinstance(v, torch.Tensor))
        cfg = self._best.get(key)
        if cfg is None:
            with self._lock:  # best_config belongs to this launch's key until the lock is released
                ret = self.tuner[grid](*args, **kw)
                best = getattr(self.tuner, "best_config", None)
                if best is not None:  # else (a Triton that does not say): through the autotuner every time
                    self._best[key] = dict(best.all_kwargs())
            return ret
        return self._run(*args, grid=grid, warmup=False, **kw, **cfg)


def _qualifies(tuner) -> bool:
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(tuner, Autotuner):
        return False
    need = ("fn", "keys", "arg_names", "configs", "reset_to_zero", "restore_value")
    if not all(hasattr(tuner, a) for a in need) or not hasattr(tuner.fn, "run"):
        return False
    if tuner.reset_to_zero or tuner.restore_value or any(c.pre_hook is not None for c in tuner.configs):
        return False
    if getattr(tuner, "early_config_prune", None) or getattr(tuner, "perf_model", None):
        return False
    return all(k in tuner.arg_names for k in tuner.keys)


_TUNED = {}
_TUNED_LOCK = threading.Lock()


def tuned(kernel):
    """The eager launcher for ``kernel``: a :class:`_Tuned` for an autotuner
    that qualifies (one per autotuner, so one lock guards its choices), else
    ``kernel`` itself."""
    t = _TUNED.get(id(kernel))
    if t is None or (t is not kernel and t.tuner is not kernel):
        with _TUNED_LOCK:
            t = _TUNED.get(id(kernel))
            if t is None or (t is not kernel and t.tuner is not kernel):
                t = _Tuned(kernel) if _qualifies(kernel) else kernel
                _TUNED[id(kernel)] = t
    return t
