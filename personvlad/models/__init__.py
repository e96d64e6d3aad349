"""personvlad.models — the 3D PersonVLAD network (issue 6).

- :class:`ModelConfig` / :func:`build_model` (presets ``"paper"``, ``"tiny"``) /
  :class:`PersonVLADNet`;
- :func:`load_c3d_weights`: import C3D Sports-1M conv weights (safe loading);
- :func:`init_centers_from`: k-means initialisation of the VLAD centers;
- :func:`model_state` / :func:`model_from_state` / :func:`load_model`: checkpoints
  carrying the config.
"""
from .backbone import C3DBackbone, feature_shape, min_input_size
from .c3d import LoadReport, UnsafePickleError, load_c3d_weights, read_weight_file
from .config import (C3D_MEAN, C3D_STD, HEADS, IMAGENET_MEAN, IMAGENET_STD, PART_MODES, PRESETS,
                     ModelConfig, preset_config)
from .heads import PoolHead, VLADHead
from .init import collect_descriptors, init_centers_from
from .net import PersonVLADNet, build_model, load_model, model_from_state, model_state
from .parts import LearnedParts, fixed_part_maps

__all__ = [
    "ModelConfig", "PRESETS", "HEADS", "PART_MODES", "preset_config", "build_model", "PersonVLADNet",
    "C3DBackbone", "VLADHead", "PoolHead", "LearnedParts", "fixed_part_maps", "feature_shape",
    "min_input_size", "load_c3d_weights", "read_weight_file", "LoadReport", "UnsafePickleError",
    "init_centers_from", "collect_descriptors", "model_state", "model_from_state", "load_model",
    "IMAGENET_MEAN", "IMAGENET_STD", "C3D_MEAN", "C3D_STD",
]
