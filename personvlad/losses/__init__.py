"""personvlad.losses — OIM (SPEC §4) and comparison losses."""
from __future__ import annotations

from .metric import BatchHardTripletLoss, SoftmaxCELoss
from .oim import OIMLoss

__all__ = ["OIMLoss", "SoftmaxCELoss", "BatchHardTripletLoss", "build_loss"]


def build_loss(name: str, num_features: int, num_labeled: int, **kwargs):
    """``"oim"`` -> OIMLoss(num_features, num_labeled, queue_size, temperature, momentum, num_sampled,
    skip_unwritten);
    ``"softmax"`` -> SoftmaxCELoss(num_features, num_labeled, ...); ``"triplet"`` -> BatchHardTripletLoss(margin, ...).
    Keyword arguments not used by the chosen loss are ignored."""
    import inspect

    table = {"oim": OIMLoss, "softmax": SoftmaxCELoss, "triplet": BatchHardTripletLoss}
    if name not in table:
        raise ValueError(f"name: expected one of {sorted(table)}, got {name!r}")
    cls = table[name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    kw = {k: v for k, v in kwargs.items() if k in accepted}
    if name == "triplet":
        return cls(**kw)
    if name == "softmax":
        return cls(num_features, num_labeled, **kw)
    return cls(num_features, num_labeled, **kw)
