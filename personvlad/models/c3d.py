"""Import C3D Sports-1M conv weights into the backbone, safely.

Two community file layouts are understood (nothing is downloaded; pass a path):

- ``"c3d"``: a dict with keys ``conv1.weight, conv1.bias, conv2.*, conv3a.*,
  conv3b.*, conv4a.*, conv4b.*, conv5a.*, conv5b.*`` (plus ``fc6-8``, unused),
  either a plain ``pickle`` of tensors / numpy arrays or a ``torch.save`` file;
- ``"features"``: a ``.pth`` state dict of an ``nn.Sequential`` named
  ``features`` whose convs are ``features.{0,3,6,8,11,13,16,18}.*``.

(Our own names ``conv1a ... conv5b``, optionally under ``backbone.``, also
work.)  Prefixes ``module.`` are stripped and ``{"state_dict": ...}`` /
``{"model": ...}`` wrappers are opened.

Safety: zip / legacy ``torch.save`` files are read with
``torch.load(weights_only=True)``; plain pickles are read with a restricted
unpickler that only resolves what a dict of tensors / numpy arrays needs
(``collections.OrderedDict``, numpy's array reconstruction and dtypes, torch's
tensor rebuild, whose storage bytes are themselves read with
``torch.load(weights_only=True)``).  Any other global (``os.system``,
``builtins.eval``, ``subprocess.*``...) raises :class:`UnsafePickleError`
before anything is called.

Channel mismatch: the public C3D files have 512 channels in conv4/conv5 where
the paper's network has 256 (and the ``tiny`` preset is narrower still).
``adapt="slice"`` (default) keeps the first ``out`` filters and the first
``in`` input channels of each source kernel (and the first ``out`` biases):
the network keeps the sub-network of the first filters of every layer, which
stays consistent because the input channels of layer *l+1* are sliced exactly
like the output filters of layer *l*.  ``adapt="skip"`` leaves every
mismatched layer at its initialisation; ``adapt="error"`` raises.  Kernel-size
mismatches and targets larger than the source are always skipped (or raise
with ``adapt="error"``).  Loading is non-strict: the report says what was
loaded, adapted, skipped, missing and unused.
"""
from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .backbone import CONV_NAMES

__all__ = ["load_c3d_weights", "read_weight_file", "LoadReport", "UnsafePickleError", "LAYOUTS"]

_OURS = [name for name, _ in CONV_NAMES]  # conv1a, conv2a, conv3a, ..., conv5b
LAYOUTS: Dict[str, Dict[str, str]] = {
    "c3d": dict(zip(["conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b"], _OURS)),
    "features": dict(zip([f"features.{i}" for i in (0, 3, 6, 8, 11, 13, 16, 18)], _OURS)),
    "personvlad": {n: n for n in _OURS},
}
ADAPT_MODES = ("slice", "skip", "error")


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for something other than tensors / arrays / dicts."""


# ----------------------------------------------------------------------
# Restricted unpickler for plain pickles
# ----------------------------------------------------------------------
def _storage_from_bytes(b: bytes):
    # torch.storage._load_from_bytes without trusting the embedded pickle.
    return torch.load(io.BytesIO(b), weights_only=True)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"pickle: refused _codecs.encode({type(obj).__name__}, {encoding!r})")
    return codecs.encode(obj, encoding, errors)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    if backward_hooks:
        raise UnsafePickleError("pickle: refused a tensor with backward hooks")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    if backward_hooks:
        raise UnsafePickleError("pickle: refused a parameter with backward hooks")
    return data


def _np_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct, scalar  # numpy >= 2
        from numpy._core.numeric import _frombuffer
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore
        from numpy.core.numeric import _frombuffer  # type: ignore
    return _reconstruct, scalar, _frombuffer


_RECON, _SCALAR, _NP_FROMBUFFER = _np_reconstruct()


def _frombuffer(buf, dtype, shape, order):
    # numpy's pickle-protocol-5 array reconstruction (out-of-band buffers).
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"pickle: refused a numpy buffer of dtype {dtype!r}")
    return _NP_FROMBUFFER(buf, dtype, shape, order)
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECON,
    ("numpy._core.multiarray", "_reconstruct"): _RECON,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise UnsafePickleError(
                f"pickle: refused global {module}.{name}: only dicts of tensors / numpy arrays are "
                "accepted (the file may be malicious, or not a weight file)")
        return fn

    def persistent_load(self, pid):
        raise UnsafePickleError(f"pickle: refused persistent id {pid!r} in a plain pickle")


def _safe_torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{path}: refused by torch.load(weights_only=True): {e}") from e


def read_weight_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a weight file safely and return its top-level dict (see module doc)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such weight file: {path}")
    if zipfile.is_zipfile(path) or tarfile.is_tarfile(path):
        obj = _safe_torch_load(path)
    else:
        with open(path, "rb") as f:
            try:
                obj = _RestrictedUnpickler(f).load()
            except UnsafePickleError as e:
                raise UnsafePickleError(f"{path}: {e}") from None
            except Exception as e:
                raise ValueError(f"path: {path} is not a readable pickle / torch weight file ({e})") from e
        magic = getattr(torch.serialization, "MAGIC_NUMBER", None)
        if isinstance(obj, int) and obj == magic:  # legacy (non-zip) torch.save format
            obj = _safe_torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"path: {path}: expected a dict of weights, got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------
@dataclass
class LoadReport:
    """What :func:`load_c3d_weights` did.  Names are the model's parameter
    names (``backbone.conv1a.weight``...), sources the file's keys."""

    path: str
    layout: str
    adapt: str
    loaded: List[str] = field(default_factory=list)
    adapted: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)  # (name, src, dst)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)
    missing: List[str] = field(default_factory=list)  # conv params the file lacks
    unused: List[str] = field(default_factory=list)  # file keys not used (fc6-8...)

    @property
    def num_loaded(self) -> int:
        """Parameters written (exact + adapted)."""
        return len(self.loaded) + len(self.adapted)

    def __str__(self) -> str:
        lines = [f"C3D weights from {self.path} (layout {self.layout!r}, adapt={self.adapt!r}): "
                 f"{len(self.loaded)} loaded, {len(self.adapted)} adapted, {len(self.skipped)} skipped, "
                 f"{len(self.missing)} missing, {len(self.unused)} unused"]
        lines += [f"  loaded   {n}" for n in self.loaded]
        lines += [f"  adapted  {n}: {tuple(s)} -> {tuple(d)}" for n, s, d in self.adapted]
        lines += [f"  skipped  {n}: {r}" for n, r in self.skipped]
        lines += [f"  missing  {n}" for n in self.missing]
        if self.unused:
            lines.append(f"  unused   {', '.join(self.unused)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------
def _unwrap(sd: Dict[str, Any]) -> Dict[str, Any]:
    for key in ("state_dict", "model", "net"):
        if isinstance(sd.get(key), dict) and not any(k.endswith(".weight") for k in sd):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        k = str(k)
        while k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("backbone."):
            k = k[len("backbone."):]
        out[k] = v
    return out


def _detect_layout(keys) -> str:
    scores = {name: sum(f"{src}.weight" in keys for src in m) for name, m in LAYOUTS.items()}
    best = max(scores, key=scores.get)
    if scores[best] == 0:
        sample = sorted(keys)[:8]
        raise ValueError(
            "path: no C3D conv weights found: expected keys conv1.weight ... conv5b.weight or "
            f"features.{{0,3,6,8,11,13,16,18}}.weight, got {sample}{' ...' if len(keys) > 8 else ''}")
    return best


def _as_tensor(v: Any) -> Optional[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, np.ndarray) and v.dtype.kind in "fiu":
        return torch.from_numpy(np.ascontiguousarray(v))
    return None


def load_c3d_weights(model: nn.Module, path: Union[str, os.PathLike], adapt: str = "slice",
                     input_order: str = "rgb", verbose: bool = False) -> LoadReport:
    """Copy C3D conv1..conv5b weights from ``path`` into ``model``'s backbone.

    ``model``: a :class:`~personvlad.models.PersonVLADNet` (or a bare
    :class:`~personvlad.models.C3DBackbone`).  ``adapt``: ``"slice"`` (keep the
    first out/in channels when the file's layer is wider: 512 -> 256 in
    conv4/5), ``"skip"`` (leave mismatched layers untouched) or ``"error"``.
    ``input_order="bgr"`` reverses conv1's input channels (for files trained
    on BGR frames) so the model keeps taking RGB clips.  Only conv layers are
    touched; non-strict.  Returns a :class:`LoadReport` (``print`` it).

    Note: the Sports-1M weights expect 0..255 pixels minus the mean clip; build
    the model with ``mean=C3D_MEAN, std=C3D_STD`` to feed them that range.
    """
    if adapt not in ADAPT_MODES:
        raise ValueError(f"adapt: expected one of {ADAPT_MODES}, got {adapt!r}")
    if input_order not in ("rgb", "bgr"):
        raise ValueError(f"input_order: expected 'rgb' or 'bgr', got {input_order!r}")
    backbone = getattr(model, "backbone", model)
    if not all(hasattr(backbone, n) for n in _OURS):
        raise ValueError(f"model: expected a PersonVLADNet or C3DBackbone (with {_OURS}), got {type(model).__name__}")
    prefix = "backbone." if backbone is not model else ""
    sd = _unwrap(read_weight_file(path))
    layout = _detect_layout(set(sd))
    mapping = LAYOUTS[layout]
    report = LoadReport(path=os.fspath(path), layout=layout, adapt=adapt)
    used = set()
    with torch.no_grad():
        for src, dst in mapping.items():
            conv = getattr(backbone, dst)
            for kind in ("weight", "bias"):
                name = f"{prefix}{dst}.{kind}"
                target = getattr(conv, kind)
                key = f"{src}.{kind}"
                if key not in sd:
                    if target is not None:
                        report.missing.append(name)
                    continue
                used.add(key)
                value = _as_tensor(sd[key])
                if value is None:
                    report.skipped.append((name, f"{key} is not a numeric tensor/array ({type(sd[key]).__name__})"))
                    continue
                if target is None:
                    report.skipped.append((name, f"target conv has no {kind} (batch_norm=True)"))
                    continue
                if kind == "weight" and dst == "conv1a" and input_order == "bgr" and value.dim() == 5:
                    value = value.flip(1)
                src_shape, dst_shape = tuple(value.shape), tuple(target.shape)
                if src_shape == dst_shape:
                    target.copy_(value.to(target))
                    report.loaded.append(name)
                    continue
                why = None
                if len(src_shape) != len(dst_shape):
                    why = f"rank mismatch: file {src_shape}, model {dst_shape}"
                elif src_shape[2:] != dst_shape[2:]:
                    why = f"kernel size mismatch: file {src_shape}, model {dst_shape}"
                elif any(d > s for s, d in zip(src_shape, dst_shape)):
                    why = f"model layer is wider than the file's: file {src_shape}, model {dst_shape}"
                elif adapt == "skip":
                    why = f"shape mismatch (adapt='skip'): file {src_shape}, model {dst_shape}"
                if why is not None or adapt == "error":
                    why = why or f"shape mismatch: file {src_shape}, model {dst_shape}"
                    if adapt == "error":
                        raise ValueError(f"{name}: {why}")
                    report.skipped.append((name, why))
                    continue
                sl = tuple(slice(0, d) for d in dst_shape)
                target.copy_(value[sl].to(target))
                report.adapted.append((name, src_shape, dst_shape))
    report.unused = sorted(k for k in sd if k not in used)
    if verbose:
        print(report)
    return report
