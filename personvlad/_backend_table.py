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
from typing import Dict, Optional, Sequence

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


@functools.lru_cache(maxsize=1)
def load_table(path: str = TABLE_PATH) -> Dict[str, str]:
    """The table's ``classes``; {} (with a warning) for a missing classes
    map or a file that is not such JSON: a damaged table must not break
    ``import personvlad`` (nor ``personvlad bench table``, which rewrites it)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        classes = data["classes"]
        if not isinstance(classes, dict):
            raise TypeError(f"'classes' is a {type(classes).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"personvlad: {path}: expected a JSON object with a 'classes' map "
                      f"({type(e).__name__}: {e}); backend='auto' uses its default order "
                      "(rewrite the table with `personvlad bench table`)", RuntimeWarning, stacklevel=2)
        return {}
    return {str(k): str(v) for k, v in classes.items()}


# Read once, at import: backend="auto" runs inside torch.compile'd models, and
# Dynamo cannot trace the file access (os.path.exists) of a first read, nor
# the lru_cache wrapper of a later one; a module-level dict it reads as a constant.
_CLASSES: Dict[str, str] = load_table()


def pick_cuda_backend(features: torch.Tensor, parts: Optional[torch.Tensor], K: int,
                      candidates: Sequence[str]) -> str:
    N, C = features.shape[:2]
    P = math.prod(features.shape[2:])
    B = 1 if parts is None else parts.shape[1]
    best = _CLASSES.get(shape_class(C, P, K, B, features.dtype))
    if best in candidates:
        return best
    for name in DEFAULT_ORDER:
        if name in candidates:
            return name
    return candidates[0]
