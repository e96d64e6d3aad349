"""Part-alignment maps: learned (1x1x1 conv + sigmoid) or fixed stripes/grid.

All maps have shape (N, B, T', H', W') on the feature map's grid.  Fixed maps
are hard 0/1 masks built from the feature map's (static) size with the bins of
adaptive pooling: part ``i`` of ``n`` along a length-``L`` axis covers
``[floor(i*L/n), ceil((i+1)*L/n))``, so every part is non-empty even when
``L < n`` (neighbouring parts then overlap) and the parts cover the axis.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

__all__ = ["bin_masks", "fixed_part_maps", "LearnedParts"]


def bin_masks(length: int, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n, length) 0/1 masks of the adaptive-pooling bins of ``length`` into ``n``."""
    if length < 1 or n < 1:
        raise ValueError(f"bin_masks: expected length >= 1 and n >= 1, got length={length}, n={n}")
    # Device-side integer arithmetic: no host->device copies, trace-friendly.
    i = torch.arange(n, device=device)
    lo = ((i * length) // n)[:, None]
    hi = (((i + 1) * length + n - 1) // n)[:, None]  # ceil((i+1)*length/n)
    pos = torch.arange(length, device=device)
    return ((pos[None, :] >= lo) & (pos[None, :] < hi)).to(dtype)


def fixed_part_maps(
    mode: str,
    spatial: Tuple[int, int, int],
    *,
    stripes: int = 5,
    grid: Tuple[int, int] = (5, 5),
    batch: int = 1,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Fixed part maps (batch, B, T', H', W') for ``mode`` in {"stripe", "grid"}.

    ``"stripe"``: ``stripes`` horizontal stripes (bins along H', constant over
    T' and W'), B = stripes.  ``"grid"``: ``grid[0]`` rows x ``grid[1]`` columns
    (H' x W'), row-major, B = rows*cols.  Constant over time.
    """
    if len(spatial) != 3:
        raise ValueError(f"spatial: expected (T', H', W'), got {spatial!r}")
    T, H, W = (int(s) for s in spatial)
    if mode == "stripe":
        rows = bin_masks(H, stripes, device, dtype)  # (B, H)
        maps = rows[:, None, :, None].expand(stripes, T, H, W)
    elif mode == "grid":
        gr, gc = grid
        rows = bin_masks(H, gr, device, dtype)  # (gr, H)
        cols = bin_masks(W, gc, device, dtype)  # (gc, W)
        cells = rows[:, None, :, None] * cols[None, :, None, :]  # (gr, gc, H, W)
        maps = cells.reshape(gr * gc, 1, H, W).expand(gr * gc, T, H, W)
    else:
        raise ValueError(f"mode: expected 'stripe' or 'grid', got {mode!r}")
    return maps.unsqueeze(0).expand(batch, *maps.shape).contiguous()


class LearnedParts(nn.Module):
    """``num_parts`` maps ``sigmoid(weight · F + bias)`` (a 1x1x1 convolution),
    the same formula as :meth:`personvlad.nn.PersonVLAD.part_maps`; used by the
    avg/max heads (the vlad head uses the layer's own part parameters)."""

    def __init__(self, dim: int, num_parts: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_parts = num_parts
        self.weight = nn.Parameter(torch.empty(num_parts, dim))
        self.bias = nn.Parameter(torch.empty(num_parts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.dim)
        with torch.no_grad():
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        flat = x.flatten(2)  # (N, dim, P); also for N = 0, where reshape(N, dim, -1) cannot infer P
        logits = torch.matmul(self.weight.to(flat.dtype), flat) + self.bias.to(flat.dtype)[None, :, None]
        return torch.sigmoid(logits).reshape(N, self.num_parts, *x.shape[2:])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_parts={self.num_parts}"
