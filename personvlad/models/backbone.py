"""C3D-style 3D ConvNet backbone.

conv1a -> pool1 (1x2x2) -> conv2a -> pool2 (2x2x2) -> conv3a, conv3b -> pool3
(2x2x2) -> conv4a, conv4b -> pool4 (2x2x2) -> conv5a, conv5b; every conv is
3x3x3 with padding 1 followed by ReLU (optionally BatchNorm3d before the ReLU).
All pools are max pools with stride = kernel, no padding and floor rounding,
so a (T, H, W) clip gives a (T//8, H//16, W//16)-ish map; exactly
``T' = T//8``, ``H' = ((H//2)//2//2)//2``, ``W'`` likewise (see
:func:`feature_shape`).  16x180x90 -> 2x11x5.  No pool5 / fc layers: the
feature map of conv5b is the set of local descriptors the heads aggregate.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

__all__ = ["C3DBackbone", "CONV_NAMES", "POOLS", "feature_shape", "min_input_size"]

# (name, stage index into widths) in forward order.
CONV_NAMES = (
    ("conv1a", 0), ("conv2a", 1), ("conv3a", 2), ("conv3b", 2),
    ("conv4a", 3), ("conv4b", 3), ("conv5a", 4), ("conv5b", 4),
)
# Pool after these convs: (kernel = stride) in (T, H, W).
POOLS = {"conv1a": (1, 2, 2), "conv2a": (2, 2, 2), "conv3b": (2, 2, 2), "conv4b": (2, 2, 2)}


def feature_shape(clip_len: int, height: int, width: int) -> Tuple[int, int, int]:
    """(T', H', W') of the conv5b map for a (T, H, W) clip (floor pooling)."""
    t, h, w = clip_len, height, width
    for kt, kh, kw in POOLS.values():
        t, h, w = t // kt, h // kh, w // kw
    return t, h, w


def min_input_size() -> Tuple[int, int, int]:
    """Smallest (T, H, W) whose feature map is non-empty."""
    t = h = w = 1
    for kt, kh, kw in POOLS.values():
        t, h, w = t * kt, h * kh, w * kw
    return t, h, w


class C3DBackbone(nn.Module):
    """The 8-conv C3D trunk without pool5/fc; ``widths`` are the channels of
    the 5 stages (conv1a, conv2a, conv3*, conv4*, conv5*)."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 256, 256), in_channels: int = 3,
                 batch_norm: bool = False) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 5 or min(widths) < 1:
            raise ValueError(f"widths: expected 5 ints >= 1, got {widths!r}")
        self.widths = widths
        self.out_channels = widths[4]
        self.batch_norm = bool(batch_norm)
        cin = in_channels
        for name, stage in CONV_NAMES:
            cout = widths[stage]
            self.add_module(name, nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                self.add_module(name.replace("conv", "bn"), nn.BatchNorm3d(cout))
            if name in POOLS:
                k = POOLS[name]
                self.add_module("pool" + name[4], nn.MaxPool3d(kernel_size=k, stride=k))
            cin = cout
        self.relu = nn.ReLU(inplace=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def convs(self):
        """(name, nn.Conv3d) pairs in forward order."""
        return [(name, getattr(self, name)) for name, _ in CONV_NAMES]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, _ in CONV_NAMES:
            x = getattr(self, name)(x)
            if self.batch_norm:
                x = getattr(self, name.replace("conv", "bn"))(x)
            x = self.relu(x)
            if name in POOLS:
                x = getattr(self, "pool" + name[4])(x)
        return x
