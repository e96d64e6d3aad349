"""Comparison losses: a softmax classifier and the batch-hard triplet loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftmaxCELoss", "BatchHardTripletLoss"]


def _check_features(features, labels, dim=None) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or (dim is not None and features.shape[1] != dim):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features: expected shape (N, {dim if dim is not None else 'D'}), got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"features: expected a floating dtype, got {features.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected shape ({features.shape[0]},), got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer dtype, got {labels.dtype}")
    if labels.device != features.device:
        raise ValueError(f"labels: expected device {features.device} (as features), got {labels.device}")


class SoftmaxCELoss(nn.Module):
    """A linear classifier on the (optionally L2-normalised) features plus
    cross-entropy.  Label ``-1`` (unlabeled) is ignored; a batch with no
    labeled sample gives a zero connected to the graph."""

    def __init__(self, num_features: int, num_classes: int, bias: bool = True,
                 normalize: bool = False, label_smoothing: float = 0.0) -> None:
        super().__init__()
        for name, v in (("num_features", num_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not isinstance(label_smoothing, (int, float)) or not (0.0 <= label_smoothing < 1.0):
            raise ValueError(f"label_smoothing: expected a float in [0, 1), got {label_smoothing!r}")
        self.num_features = num_features
        self.num_classes = num_classes
        self.normalize = bool(normalize)
        self.label_smoothing = float(label_smoothing)
        self.classifier = nn.Linear(num_features, num_classes, bias=bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        if bias:
            nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_features(features, labels, self.num_features)
        labels = labels.long()
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < -1 or hi >= self.num_classes:
                raise ValueError(f"labels: expected values in [0, {self.num_classes}) or -1, got [{lo}, {hi}]")
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.float()
            if self.normalize:
                x = F.normalize(x, dim=1)
            lab = labels >= 0
            if not bool(lab.any()):
                return x.sum() * 0.0 + sum(p.sum() for p in self.parameters()) * 0.0
            logits = self.classifier(x[lab])
            return F.cross_entropy(logits, labels[lab], label_smoothing=self.label_smoothing)


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al.): for each anchor the farthest
    positive and the closest negative in the batch,
    ``mean(relu(d(a,p) - d(a,n) + margin))`` over anchors that have both.
    Euclidean distances (on L2-normalised features when ``normalize``);
    label ``-1`` samples are ignored.  No valid anchor gives a connected zero."""

    def __init__(self, margin: float = 0.3, normalize: bool = False) -> None:
        super().__init__()
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise ValueError(f"margin: expected a finite float >= 0, got {margin!r}")
        self.margin = float(margin)
        self.normalize = bool(normalize)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_features(features, labels)
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.float()
            if self.normalize:
                x = F.normalize(x, dim=1)
            keep = labels >= 0
            x, y = x[keep], labels[keep].long()
            if x.shape[0] < 2:
                return features.float().sum() * 0.0
            sq = (x * x).sum(1)
            d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())
            d = d2.clamp_min(1e-12).sqrt()
            same = y[:, None] == y[None, :]
            eye = torch.eye(y.shape[0], dtype=torch.bool, device=y.device)
            pos = same & ~eye
            neg = ~same
            valid = pos.any(1) & neg.any(1)
            if not bool(valid.any()):
                return features.float().sum() * 0.0
            d_ap = torch.where(pos, d, torch.full_like(d, float("-inf"))).max(1).values
            d_an = torch.where(neg, d, torch.full_like(d, float("inf"))).min(1).values
            return F.relu(d_ap[valid] - d_an[valid] + self.margin).mean()
