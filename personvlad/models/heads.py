"""Aggregation heads: PersonVLAD (``vlad``) and per-part 3D global pooling
(``avg`` / ``max``, the paper's "3D ConvNets+GP" baseline).

Heads take the backbone map ``F`` (N, D, T', H', W') and part maps
(N, B, T', H', W') or None, and return (N, output_dim) L2-normalised
descriptors.  Everything is vectorised over parts (no Python loop over parts,
no host synchronisation).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F_
from torch import nn

from .. import ops
from ..nn import PersonVLAD
from .parts import LearnedParts

__all__ = ["VLADHead", "PoolHead"]


class VLADHead(nn.Module):
    """PersonVLAD aggregation, output ``num_clusters * dim``.

    ``learned_parts > 0``: the part maps are the layer's own
    ``sigmoid(part_weight · F + part_bias)`` (:class:`personvlad.nn.PersonVLAD`
    with ``num_parts=learned_parts``); otherwise the layer is plain NetVLAD and
    fixed maps, if any, are passed to :func:`personvlad.ops.person_vlad` as
    ``parts``.
    """

    def __init__(self, dim: int, num_clusters: int, learned_parts: int, alpha: float, backend: str = "auto") -> None:
        super().__init__()
        self.vlad = PersonVLAD(dim, num_clusters=num_clusters, num_parts=learned_parts, alpha=alpha,
                               normalize=True, backend=backend)

    @property
    def output_dim(self) -> int:
        return self.vlad.output_dim

    @property
    def learned(self) -> bool:
        return self.vlad.num_parts > 0

    def part_maps(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return self.vlad.part_maps(x)

    def center_parameters(self):
        return [self.vlad.centers, self.vlad.assign_weight, self.vlad.assign_bias]

    def forward(self, x: torch.Tensor, parts: Optional[torch.Tensor]) -> torch.Tensor:
        v = self.vlad
        return ops.person_vlad(x, parts, v.assign_weight, v.assign_bias, v.centers, normalize=True, backend=v.backend)


class PoolHead(nn.Module):
    """Per-part 3D global pooling + a per-part linear layer, concatenated.

    avg: ``p[b] = sum_s M[b,s] F[:,s] / sum_s M[b,s]`` (one GEMM for all parts).
    max: ``p[b] = max_s M[b,s] F[:,s]`` (for 0/1 maps and the non-negative
    ReLU features this is the max over the part's cells).
    Without parts (``num_parts=0``) one global part is used.  Then
    ``y[b] = p[b] @ weight[b] + bias[b]`` (weight (B, D, E)) and the output is
    ``normalize(concat_b y[b])`` of size ``max(B, 1) * E``.
    """

    def __init__(self, mode: str, dim: int, num_parts: int, embed_dim: int, learned: bool) -> None:
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"mode: expected 'avg' or 'max', got {mode!r}")
        self.mode = mode
        self.dim = dim
        self.embed_dim = embed_dim
        self.num_slots = max(num_parts, 1)
        self.parts = LearnedParts(dim, num_parts) if learned else None
        self.weight = nn.Parameter(torch.empty(self.num_slots, dim, embed_dim))
        self.bias = nn.Parameter(torch.empty(self.num_slots, embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.dim)
        with torch.no_grad():
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.zeros_(self.bias)

    @property
    def output_dim(self) -> int:
        return self.num_slots * self.embed_dim

    @property
    def learned(self) -> bool:
        return self.parts is not None

    def part_maps(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.parts is None else self.parts(x)

    def center_parameters(self):
        return []

    def pool(self, x: torch.Tensor, parts: Optional[torch.Tensor]) -> torch.Tensor:
        """(N, max(B,1), D) pooled part vectors."""
        # flatten(2), not reshape(N, D, -1): with N = 0 the -1 cannot be inferred
        f = x.flatten(2)  # (N, D, P)
        if parts is None:
            return (f.mean(-1) if self.mode == "avg" else f.amax(-1)).unsqueeze(1)
        m = parts.flatten(2).to(f.dtype)  # (N, B, P)
        if self.mode == "avg":
            num = torch.bmm(m, f.transpose(1, 2))  # (N, B, D)
            den = m.sum(-1, keepdim=True).clamp_min(1e-6)
            return num / den
        return (m.unsqueeze(2) * f.unsqueeze(1)).amax(-1)  # (N, B, D)

    def forward(self, x: torch.Tensor, parts: Optional[torch.Tensor]) -> torch.Tensor:
        if parts is not None and parts.shape[1] != self.num_slots:
            raise ValueError(f"parts: expected {self.num_slots} part maps, got {parts.shape[1]}")
        p = self.pool(x, parts)  # (N, B, D)
        y = torch.einsum("nbd,bde->nbe", p, self.weight) + self.bias
        return F_.normalize(y.flatten(1), dim=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, dim={self.dim}, parts={self.num_slots}, embed_dim={self.embed_dim}"
