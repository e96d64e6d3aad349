"""The drop-in ``PersonVLAD`` layer (SPEC §2)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .ops import BACKENDS, _check_same_device, person_vlad

__all__ = ["PersonVLAD", "kmeans"]


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 50,
    seed: Optional[int] = 0,
    tol: float = 1e-6,
) -> torch.Tensor:
    """K-means with k-means++ seeding, in torch (float32 or wider).

    ``x`` (M, D) with M >= k.  Returns the (k, D) centers.  Deterministic for a
    given ``seed``.  Empty clusters are re-seeded with the point farthest from
    its center.
    """
    if x.dim() != 2:
        raise ValueError(f"descriptors: expected shape (M, dim), got shape {tuple(x.shape)}")
    M = x.shape[0]
    if k < 1:
        raise ValueError(f"num_clusters: expected >= 1, got {k}")
    if M < k:
        raise ValueError(f"descriptors: expected at least num_clusters={k} rows, got {M}")
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("descriptors: expected finite values, got NaN/inf")
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()

    def rand_index(weights: Optional[torch.Tensor]) -> int:
        if weights is None or float(weights.sum()) <= 0:
            return int(torch.randint(M, (1,), generator=gen))
        return int(torch.multinomial(weights.cpu().double(), 1, generator=gen))

    # k-means++ seeding: each next center drawn with probability ~ D(x)^2.
    centers = x.new_empty(k, x.shape[1])
    centers[0] = x[rand_index(None)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for j in range(1, k):
        centers[j] = x[rand_index(d2)]
        d2 = torch.minimum(d2, ((x - centers[j]) ** 2).sum(1))

    x_sq = (x * x).sum(1, keepdim=True)
    for _ in range(iters):
        dist = x_sq - 2 * x @ centers.T + (centers * centers).sum(1)[None]
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        new = sums / counts.clamp_min(1)[:, None]
        empty = counts == 0
        if empty.any():
            mind = dist.gather(1, assign[:, None]).squeeze(1)
            far = torch.argsort(mind, descending=True)[: int(empty.sum())]
            new[empty] = x[far]
        shift = (new - centers).norm() / max(float(centers.norm()), 1e-12)
        centers = new
        if shift < tol:
            break
    return centers


class PersonVLAD(nn.Module):
    """Part-reweighted NetVLAD aggregation as a layer.

    ``forward(x)`` with ``x`` (N, dim, *S) (1-3 spatial dims) returns the
    (N, num_clusters*dim) descriptor (or (N, num_clusters, dim) when
    ``normalize=False``).  Parts are ``sigmoid(part_weight · x + part_bias)``,
    one map per part (a 1×…×1 convolution); ``num_parts=0`` is plain NetVLAD.
    Input descriptors are not L2-normalised (that would cancel the part maps).
    """

    def __init__(
        self,
        dim: int,
        num_clusters: int = 64,
        num_parts: int = 6,
        alpha: float = 1000.0,
        normalize: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, v, lo in (("dim", dim, 1), ("num_clusters", num_clusters, 1), ("num_parts", num_parts, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha: expected a finite float > 0, got {alpha!r}")
        backends = ("auto",) + tuple(BACKENDS)
        if not isinstance(backend, str) or backend not in backends:
            raise ValueError(f"backend: expected one of {backends}, got {backend!r}")
        self.dim = dim
        self.num_clusters = num_clusters
        self.num_parts = num_parts
        self.alpha = float(alpha)
        self.normalize = bool(normalize)
        self.backend = backend
        self.centers = nn.Parameter(torch.empty(num_clusters, dim))
        self.assign_weight = nn.Parameter(torch.empty(num_clusters, dim))
        self.assign_bias = nn.Parameter(torch.empty(num_clusters))
        if num_parts > 0:
            self.part_weight = nn.Parameter(torch.empty(num_parts, dim))
            self.part_bias = nn.Parameter(torch.empty(num_parts))
        else:
            self.register_parameter("part_weight", None)
            self.register_parameter("part_bias", None)
        self.reset_parameters()

    @property
    def output_dim(self) -> int:
        return self.num_clusters * self.dim

    def reset_parameters(self) -> None:
        with torch.no_grad():
            # Random unit-scale centers, then the alpha-coupled assignment.
            nn.init.uniform_(self.centers, 0.0, 1.0 / math.sqrt(self.dim))
            self._couple_assignment()
            if self.part_weight is not None:
                bound = 1.0 / math.sqrt(self.dim)
                nn.init.uniform_(self.part_weight, -bound, bound)
                nn.init.zeros_(self.part_bias)

    @torch.no_grad()
    def _couple_assignment(self) -> None:
        c = self.centers
        self.assign_weight.copy_(2.0 * self.alpha * c)
        self.assign_bias.copy_(-self.alpha * (c * c).sum(1))

    @torch.no_grad()
    def init_centers(self, descriptors: torch.Tensor, iters: int = 50, seed: Optional[int] = 0) -> "PersonVLAD":
        """k-means (k-means++ seeded) on ``descriptors`` (M, dim); sets the
        centers ``c`` and ``W = 2*alpha*c``, ``z = -alpha*||c||^2``."""
        if not isinstance(descriptors, torch.Tensor) or descriptors.dim() != 2 or descriptors.shape[1] != self.dim:
            shape = tuple(descriptors.shape) if isinstance(descriptors, torch.Tensor) else type(descriptors).__name__
            raise ValueError(f"descriptors: expected shape (M, dim={self.dim}), got {shape}")
        c = kmeans(descriptors, self.num_clusters, iters=iters, seed=seed)
        self.centers.copy_(c.to(self.centers))
        self._couple_assignment()
        return self

    def part_maps(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """(N, num_parts, *S) sigmoid part maps for ``x`` (N, dim, *S)."""
        if self.part_weight is None:
            return None
        flat = x.flatten(2)  # (N, dim, P); also for N = 0, where reshape(N, dim, -1) cannot infer P
        logits = torch.matmul(self.part_weight.to(flat.dtype), flat) + self.part_bias.to(flat.dtype)[None, :, None]
        return torch.sigmoid(logits).reshape(x.shape[0], self.num_parts, *x.shape[2:])

    def forward(self, x: torch.Tensor, return_parts: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4, 5) or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (N, dim={self.dim}, *S) with 1-3 spatial dims, got {shape}")
        if not x.is_floating_point():  # before the part maps' matmul (which would fail or cast the weights)
            raise ValueError(f"x: expected a floating-point dtype, got {x.dtype}")
        # Also before the part maps' matmul: the op's ValueError, not the matmul's RuntimeError.
        _check_same_device("", x, assign_weight=self.assign_weight, assign_bias=self.assign_bias,
                           centers=self.centers, part_weight=self.part_weight, part_bias=self.part_bias)
        parts = self.part_maps(x)
        out = person_vlad(
            x, parts, self.assign_weight, self.assign_bias, self.centers,
            normalize=self.normalize, backend=self.backend,
        )
        if return_parts:
            if parts is None:  # plain NetVLAD: (N, 0, *S), as SPEC §2 shapes it
                parts = x.new_empty(x.shape[0], 0, *x.shape[2:])
            return out, parts
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_clusters={self.num_clusters}, num_parts={self.num_parts}, "
                f"alpha={self.alpha}, normalize={self.normalize}, backend={self.backend!r}")
