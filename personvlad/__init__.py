"""personvlad — video person re-identification with 3D PersonVLAD.

The fused op lives in :mod:`personvlad.ops` (``person_vlad``), the drop-in
layer in :mod:`personvlad.nn` (``PersonVLAD``).  Heavier subpackages (models,
data, eval, losses, engine) are imported on demand.
"""
__version__ = "0.1.0"

from .ops import available_backends, person_vlad  # noqa: E402,F401
from .nn import PersonVLAD  # noqa: E402,F401

__all__ = ["person_vlad", "available_backends", "PersonVLAD", "__version__"]
