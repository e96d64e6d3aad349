"""``backend="auto"`` on CUDA tensors: cuda vs triton per shape class.

The choice comes from committed GPU benchmark results: ``bench/results/*.json``
are reduced by ``personvlad bench table`` into ``backend_table.json`` beside
this file, mapping a shape class to the backend that was faster there.  Shape
classes with no measurement fall back to ``DEFAULT_ORDER``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

TABLE_PATH = os.path.join(os.path.dirname(__file__), "backend_table.json")
# Order used where no benchmark covers the shape class: the CUDA kernels were
# the faster backend forward+backward in every class measured so far (H200,
# bench/results/gpu-h200-20261128: 1.08-1.73x over fwd + fwd+bwd; Triton won
# only the large shape's forward alone).
DEFAULT_ORDER = ("cuda", "triton")


def _bucket(x: int) -> int:
    """Power-of-two bucket (1, 2, 4, ...) of a positive size."""
    b = 1
    while b < x:
        b *= 2
    return b


def shape_class(C: int, P: int, K: int, B: int, dtype: torch.dtype) -> str:
    return f"C{_bucket(C)}-P{_bucket(P)}-K{_bucket(K)}-B{_bucket(B)}-{str(dtype).replace('torch.', '')}"


def _read(path: str) -> Dict[str, Any]:
    """The table file as a dict with a ``classes`` map; {} (with a warning)
    for a file that is not one: a damaged table must not break ``import
    personvlad`` (nor ``personvlad bench table``, which rewrites it)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("classes"), dict):
            raise TypeError("no 'classes' map")
        by_mode = data.get("by_mode", {})
        if not isinstance(by_mode, dict) or not all(isinstance(v, dict) for v in by_mode.values()):
            raise TypeError("'by_mode' is not a map of maps")
    except (OSError, ValueError, TypeError) as e:
        warnings.warn(f"personvlad: {path}: expected a JSON object with a 'classes' map "
                      f"({type(e).__name__}: {e}); backend='auto' uses its default order "
                      "(rewrite the table with `personvlad bench table`)", RuntimeWarning, stacklevel=3)
        return {}
    return data


def _load_all(path: str = TABLE_PATH) -> Tuple[Dict[str, str], Dict[str, Dict[str, str]]]:
    """(shape class -> backend over forward and forward+backward together,
    ``{"fwd": {class: backend}, "fwdbwd": {...}}`` each mode decided on its
    own: {} for a table written before modes were kept apart)."""
    data = _read(path)
    classes = {str(k): str(v) for k, v in data.get("classes", {}).items()}
    by_mode = {str(m): {str(k): str(v) for k, v in t.items()} for m, t in data.get("by_mode", {}).items()}
    return classes, by_mode


@functools.lru_cache(maxsize=1)
def load_table(path: str = TABLE_PATH) -> Dict[str, str]:
    """Shape class -> backend, over forward and forward+backward together."""
    return _load_all(path)[0]


# Read once, at import: backend="auto" runs inside torch.compile'd models, and
# Dynamo cannot trace the file access (os.path.exists) of a first read, nor
# the lru_cache wrapper of a later one; module-level dicts it reads as constants.
_CLASSES, _BY_MODE = _load_all()


def pick_cuda_backend(features: torch.Tensor, parts: Optional[torch.Tensor], K: int,
                      candidates: Sequence[str], backward: Optional[bool] = None) -> str:
    """The backend for these tensors among ``candidates``: the table's choice
    for the shape class -- of the forward alone (``backward=False``: no
    backward can follow), of forward + backward (``True``), or of both summed
    (None, or a table without per-mode choices) -- else ``DEFAULT_ORDER``."""
    N, C = features.shape[:2]
    P = math.prod(features.shape[2:])
    B = 1 if parts is None else parts.shape[1]
    cls = shape_class(C, P, K, B, features.dtype)
    best = None
    if backward is not None:
        best = _BY_MODE.get("fwdbwd" if backward else "fwd", {}).get(cls)
    if best is None:
        best = _CLASSES.get(cls)
    if best in candidates:
        return best
    for name in DEFAULT_ORDER:
        if name in candidates:
            return name
    return candidates[0]
