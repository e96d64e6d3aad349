"""``PersonVLADNet``: input normalisation -> C3D backbone -> part maps -> head."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .backbone import C3DBackbone, feature_shape, min_input_size
from .config import ModelConfig, preset_config
from .heads import PoolHead, VLADHead
from .parts import fixed_part_maps

__all__ = ["PersonVLADNet", "build_model", "model_state", "model_from_state", "load_model"]

CONFIG_KEY = "model_config"
STATE_KEY = "model"


class PersonVLADNet(nn.Module):
    """3D PersonVLAD network (or its global-pooling baseline), from a :class:`ModelConfig`.

    ``forward(clips)`` with float clips (N, 3, T, H, W) in [0, 1] (uint8 clips
    are accepted and divided by 255, in the model's dtype) returns (N, output_dim) L2-normalised
    descriptors; ``forward(clips, return_parts=True)`` returns
    ``(descriptors, parts)`` with parts (N, B, T', H', W'): the part maps used
    (learned sigmoid maps, the fixed stripe/grid masks, or an empty B=0 tensor
    for ``parts="none"``).
    """

    def __init__(self, config: Optional[ModelConfig] = None) -> None:
        super().__init__()
        if config is None:
            config = ModelConfig()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config: expected a ModelConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.backbone = C3DBackbone(config.widths, batch_norm=config.batch_norm)
        D = config.feature_dim
        learned = config.parts == "learned"
        if config.head == "vlad":
            self.head: nn.Module = VLADHead(D, config.num_clusters, config.num_parts if learned else 0,
                                            config.alpha, config.backend)
        else:
            self.head = PoolHead(config.head, D, config.part_count, config.embed_dim, learned)
        self.register_buffer("input_mean", torch.tensor(config.mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(config.std).view(1, 3, 1, 1, 1), persistent=False)

    # ------------------------------------------------------------------
    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def num_parts(self) -> int:
        """B of the part maps (0 for ``parts="none"``)."""
        return self.config.part_count

    @staticmethod
    def feature_shape(clip_len: int, height: int, width: int) -> Tuple[int, int, int]:
        """(T', H', W') of the feature map for a (T, H, W) clip."""
        return feature_shape(clip_len, height, width)

    def example_input(self, batch: int = 1, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Random float clips in [0, 1] of the config's nominal size."""
        c = self.config
        dev = device if device is not None else self.input_mean.device
        return torch.rand(batch, 3, c.clip_len, c.height, c.width, generator=generator).to(dev)

    def center_parameters(self) -> List[nn.Parameter]:
        """VLAD centers, assign_weight, assign_bias (empty for avg/max heads)."""
        return list(self.head.center_parameters())

    # ------------------------------------------------------------------
    def normalize_input(self, clips: torch.Tensor) -> torch.Tensor:
        if not isinstance(clips, torch.Tensor):
            raise ValueError(f"clips: expected a tensor (N, 3, T, H, W), got {type(clips).__name__}")
        if clips.dim() != 5 or clips.shape[1] != 3:
            raise ValueError(f"clips: expected shape (N, 3, T, H, W), got {tuple(clips.shape)}")
        mt, mh, mw = min_input_size()
        T, H, W = clips.shape[2:]
        if T < mt or H < mh or W < mw:
            raise ValueError(f"clips: expected T >= {mt}, H >= {mh}, W >= {mw} (to survive the pools), "
                             f"got (T, H, W) = ({T}, {H}, {W})")
        if clips.dtype == torch.uint8:
            # To the model's dtype (the normalisation buffers follow .double()/.half()/...):
            # divided in at least float32 (float64 for a float64 model), then rounded once.
            dtype = self.input_mean.dtype
            clips = clips.to(torch.promote_types(dtype, torch.float32)).div(255.0).to(dtype)
        elif not clips.is_floating_point():
            raise ValueError(f"clips: expected a floating-point (values in [0, 1]) or uint8 tensor, got {clips.dtype}")
        return (clips - self.input_mean.to(clips.dtype)) / self.input_std.to(clips.dtype)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """(N, D, T', H', W') backbone feature map (after input normalisation)."""
        return self.backbone(self.normalize_input(clips))

    def part_maps(self, feats: torch.Tensor) -> Optional[torch.Tensor]:
        """(N, B, T', H', W') part maps for a feature map, or None (``parts="none"``)."""
        c = self.config
        if c.parts == "learned":
            return self.head.part_maps(feats)
        if c.parts in ("stripe", "grid"):
            return fixed_part_maps(c.parts, tuple(feats.shape[2:]), stripes=c.stripes, grid=c.grid,
                                   batch=feats.shape[0], device=feats.device, dtype=feats.dtype)
        return None

    def forward(self, clips: torch.Tensor, return_parts: bool = False):
        feats = self.features(clips)
        parts = self.part_maps(feats)
        desc = self.head(feats, parts)
        if return_parts:
            if parts is None:
                parts = feats.new_empty(feats.shape[0], 0, *feats.shape[2:])
            return desc, parts
        return desc

    def extra_repr(self) -> str:
        c = self.config
        return f"preset={c.preset!r}, head={c.head!r}, parts={c.parts!r}, output_dim={self.output_dim}"


def build_model(preset: str = "paper", **overrides: Any) -> PersonVLADNet:
    """Build a :class:`PersonVLADNet` from a preset (``"paper"`` or ``"tiny"``)
    with any :class:`ModelConfig` field overridden, e.g.
    ``build_model("tiny", head="avg", parts="stripe")``.  Unknown fields raise
    ``ValueError``."""
    return PersonVLADNet(preset_config(preset, **overrides))


# ----------------------------------------------------------------------
# Checkpoints: {"model_config": plain dict, "model": state_dict}
# ----------------------------------------------------------------------
def model_state(model: PersonVLADNet) -> Dict[str, Any]:
    """``{"model_config": config dict, "model": state_dict}``: a checkpoint
    (or the model part of one) that ``torch.load(weights_only=True)`` reads."""
    return {CONFIG_KEY: model.config.to_dict(), STATE_KEY: model.state_dict()}


def model_from_state(state: Dict[str, Any], map_location: Union[str, torch.device, None] = None,
                     strict: bool = True) -> PersonVLADNet:
    """Rebuild the model saved by :func:`model_state` (or any dict with the
    ``"model_config"`` and ``"model"`` keys)."""
    if not isinstance(state, dict) or CONFIG_KEY not in state or STATE_KEY not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state: expected a dict with keys {CONFIG_KEY!r} and {STATE_KEY!r}, got {keys}")
    model = PersonVLADNet(ModelConfig.from_dict(dict(state[CONFIG_KEY])))
    if map_location is not None:
        model.to(map_location)
    model.load_state_dict(state[STATE_KEY], strict=strict)
    return model


def load_model(path: Union[str, os.PathLike], map_location: Union[str, torch.device, None] = "cpu",
               strict: bool = True) -> PersonVLADNet:
    """Load a checkpoint file holding :func:`model_state` keys (safe: ``weights_only=True``)."""
    state = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    return model_from_state(state, map_location=map_location, strict=strict)
