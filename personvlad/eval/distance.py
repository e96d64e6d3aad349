"""Query x gallery distance matrices (chunked, torch on GPU when available)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .protocols import check_positive_int

METRICS = ("euclidean", "sqeuclidean", "cosine")


def _as_2d_float(x, name: str):
    import torch

    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        a = np.asarray(x)
        if a.dtype.kind not in "fiu":
            raise ValueError(f"{name}: expected a real-valued (n, D) array, got dtype {a.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(a))
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (n, D) array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def compute_distmat(qf, gf, metric: str = "euclidean", chunk: int = 4096,
                    device: Optional[str] = None) -> np.ndarray:
    """Distance matrix between query features ``qf (Q, D)`` and gallery ``gf (G, D)``.

    ``metric``:
      * ``"euclidean"`` (default): the plain Euclidean distance
        ``sqrt(max(|q|^2 + |g|^2 - 2 q.g, 0))`` -- *not* squared, so the numbers
        are true distances (for L2-normalised descriptors in ``[0, 2]``); the
        ranking is the same as with the squared distance.
      * ``"sqeuclidean"``: the squared Euclidean distance.
      * ``"cosine"``: ``1 - cos(q, g)`` (features are L2-normalised first).

    Computed with torch in float32 (float64 if either input is float64) on
    ``device`` (default: CUDA when available, else CPU), ``chunk`` query rows
    at a time, and returned as a numpy array ``(Q, G)`` of that dtype.
    Inputs may be numpy arrays or torch tensors.
    """
    import torch

    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    check_positive_int("chunk", chunk)
    q = _as_2d_float(qf, "qf")
    g = _as_2d_float(gf, "gf")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"gf: feature dimension {g.shape[1]} does not match qf's {q.shape[1]}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float64 if (q.dtype == torch.float64 or g.dtype == torch.float64) else torch.float32
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available here")
    g = g.to(dev, dtype)
    if metric == "cosine":
        g = torch.nn.functional.normalize(g, dim=1)
    else:
        g_sq = (g * g).sum(1)
    out = np.empty((q.shape[0], g.shape[0]), dtype=np.float64 if dtype == torch.float64 else np.float32)
    with torch.no_grad():
        for s in range(0, q.shape[0], int(chunk)):
            qb = q[s:s + int(chunk)].to(dev, dtype)
            if metric == "cosine":
                qb = torch.nn.functional.normalize(qb, dim=1)
                d = 1.0 - qb @ g.T
            else:
                d = (qb * qb).sum(1, keepdim=True) + g_sq[None, :] - 2.0 * (qb @ g.T)
                d.clamp_(min=0.0)
                if metric == "euclidean":
                    d.sqrt_()
            out[s:s + qb.shape[0]] = d.cpu().numpy()
    return out
