"""Work, traffic and hardware ceilings: how close a measured time is to the GPU's peak.

The benchmarks (``bench/``) record, beside each measured time, what the work
*had* to cost, so ``personvlad bench report`` can print the achieved TFLOP/s
and GB/s and the fraction of the roofline bound:

- :func:`op_cost` — the ``person_vlad`` op's algorithmic cost at a shape:
  ``gemm_flops`` (the two products of the forward, ``W F`` and ``A' Fᵀ``, and
  the four of the backward, each counted once: recomputation inside a fused
  kernel is not useful work, as in MFU), ``vector_flops`` (an approximate count
  of the element-wise work: logits, softmax, part accumulation, residual and
  the two normalisations) and ``bytes`` (compulsory DRAM traffic: every input
  read once, every output written once; in the backward also the saved output,
  the norms and the incoming gradient).  It is the same for every
  implementation of the op, so an unfused baseline's "achieved TFLOP/s" is the
  useful work it did per second, not what it executed.
- :func:`model_flops` — FLOPs of a model per clip, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` on the meta device (no
  memory, no compute; the paper model: 81.0 GFLOP per 16x180x90 clip).
- :func:`device_peaks` — datasheet peaks (dense tensor-core TFLOP/s per
  dtype, FP32 CUDA-core TFLOP/s, DRAM GB/s) for the GPUs a user is likely to
  run on, matched on ``torch.cuda.get_device_name()``; ``PERSONVLAD_DEVICE_PEAKS``
  (``"gbps=3350,fp32=67,tf32=495,bf16=989,fp16=989"``) sets them for any other
  device.  Datasheet peaks assume boost clocks; a power- or clock-limited
  card reaches less.  A MIG slice matches nothing (its share is not known).
- :func:`roofline` — the time no implementation can beat on that device:
  ``max(gemm_flops / matmul peak, vector_flops / FP32 peak, bytes / bandwidth)``,
  and which of the three bounds it.  ``bound_s / measured`` is the fraction of
  the roofline reached (1.0 = at the ceiling).

The matmul peak depends on how the products are computed (``precision``):
``"ieee"`` — FP32 on CUDA cores (cuBLAS without TF32, Triton's ``ieee`` dots,
the fp32 baselines); ``"tf32"``; ``"tf32x3"`` — three TF32 products per fp32
product (Triton's split, a third of the TF32 rate); half dtypes use their
tensor-core peak.  GPUs without tensor cores (Pascal) fall back to FP32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "DevicePeaks",
    "PEAKS_ENV",
    "device_peaks",
    "matmul_peak_tflops",
    "op_cost",
    "model_flops",
    "roofline",
    "model_work_info",
]

PEAKS_ENV = "PERSONVLAD_DEVICE_PEAKS"


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """Peaks of one device: DRAM ``gbps`` (GB/s, 1e9), ``fp32`` CUDA-core
    TFLOP/s, dense tensor-core TFLOP/s for ``tf32`` / ``bf16`` / ``fp16``
    (None: no tensor-core path for that dtype), and where they come from."""
    name: str
    gbps: float
    fp32: float
    tf32: Optional[float] = None
    bf16: Optional[float] = None
    fp16: Optional[float] = None
    source: str = "datasheet"

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# Datasheet figures (dense, i.e. without 2:4 sparsity; boost clock).  Order
# matters: the first pattern that matches the lower-cased device name wins, so
# the specific variants come before the generic ones.
_TABLE: Tuple[Tuple[str, DevicePeaks], ...] = tuple((pat, DevicePeaks(name=n, **kw)) for pat, n, kw in (
    (r"gh200", "GH200 (96 GB HBM3)", dict(gbps=4000, fp32=67, tf32=494.7, bf16=989.4, fp16=989.4)),
    (r"h200 nvl", "H200 NVL", dict(gbps=4800, fp32=60, tf32=417.5, bf16=835.5, fp16=835.5)),
    (r"h200", "H200 SXM", dict(gbps=4800, fp32=67, tf32=494.7, bf16=989.4, fp16=989.4)),
    (r"h100 nvl", "H100 NVL", dict(gbps=3900, fp32=60, tf32=417.5, bf16=835.5, fp16=835.5)),
    (r"h100.*pcie", "H100 PCIe", dict(gbps=2000, fp32=51.2, tf32=378, bf16=756, fp16=756)),
    (r"h100", "H100 SXM", dict(gbps=3350, fp32=67, tf32=494.7, bf16=989.4, fp16=989.4)),
    (r"a100.*sxm.*80", "A100 SXM 80GB", dict(gbps=2039, fp32=19.5, tf32=156, bf16=312, fp16=312)),
    (r"a100.*80", "A100 PCIe 80GB", dict(gbps=1935, fp32=19.5, tf32=156, bf16=312, fp16=312)),
    (r"a100", "A100 40GB", dict(gbps=1555, fp32=19.5, tf32=156, bf16=312, fp16=312)),
    (r"l40s", "L40S", dict(gbps=864, fp32=91.6, tf32=183, bf16=362, fp16=362)),
    (r"\bl4\b", "L4", dict(gbps=300, fp32=30.3, tf32=60, bf16=121, fp16=121)),
    (r"\ba10\b", "A10", dict(gbps=600, fp32=31.2, tf32=62.5, bf16=125, fp16=125)),
    (r"rtx 4090", "GeForce RTX 4090", dict(gbps=1008, fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2)),
    (r"rtx 3090", "GeForce RTX 3090", dict(gbps=936, fp32=35.6, tf32=35.6, bf16=71, fp16=71)),
    (r"v100.*pcie", "V100 PCIe", dict(gbps=900, fp32=14, fp16=112)),
    (r"v100", "V100 SXM2", dict(gbps=900, fp32=15.7, fp16=125)),
    (r"\bt4\b", "T4", dict(gbps=320, fp32=8.1, fp16=65)),
    (r"titan xp", "TITAN Xp", dict(gbps=547.7, fp32=12.1)),
    (r"gtx titan x", "GeForce GTX TITAN X (Maxwell)", dict(gbps=336.5, fp32=6.7)),
    (r"titan x", "TITAN X (Pascal)", dict(gbps=480, fp32=11.0)),
))

_ENV_KEYS = ("gbps", "fp32", "tf32", "bf16", "fp16")


def _from_env(text: str, name: str) -> DevicePeaks:
    vals: Dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in _ENV_KEYS:
            raise ValueError(f"{PEAKS_ENV}: expected comma-separated key=value with keys {list(_ENV_KEYS)}, "
                             f"got {item!r}")
        try:
            v = float(val)
        except ValueError:
            raise ValueError(f"{PEAKS_ENV}: {key} expected a number, got {val.strip()!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{PEAKS_ENV}: {key} expected a positive number, got {v}")
        vals[key] = v
    for need in ("gbps", "fp32"):
        if need not in vals:
            raise ValueError(f"{PEAKS_ENV}: expected at least gbps= and fp32=, {need} is missing in {text!r}")
    return DevicePeaks(name=name, source=f"${PEAKS_ENV}", **vals)


def device_peaks(device: Union[None, str, torch.device] = None) -> Optional[DevicePeaks]:
    """The peaks of ``device``: a device name (``"NVIDIA H100 80GB HBM3"``), a
    CUDA ``torch.device``, or None for the current CUDA device.  ``$PERSONVLAD_DEVICE_PEAKS``,
    when set, wins.  None when nothing is known (CPUs, MIG slices, GPUs not in
    the table)."""
    if isinstance(device, str):
        try:
            device = torch.device(device)  # "cuda", "cuda:1", "cpu"; a device *name* is not a spec
        except RuntimeError:
            pass
    if isinstance(device, str):
        name = device
    elif device is None or isinstance(device, torch.device):
        if device is not None and device.type != "cuda":
            name = device.type
        elif torch.cuda.is_available():
            name = torch.cuda.get_device_name(device)
        else:
            name = "cpu"
    else:
        raise ValueError(f"device: expected a device name, a torch.device or None, got {type(device).__name__}")
    env = os.environ.get(PEAKS_ENV, "").strip()
    if env:
        return _from_env(env, name)
    low = name.lower()
    if low == "cpu" or re.search(r"\bmig\b", low):
        return None
    for pat, peaks in _TABLE:
        if re.search(pat, low):
            return peaks
    return None


_PRECISIONS = ("ieee", "tf32", "tf32x3")


def matmul_peak_tflops(peaks: DevicePeaks, dtype: torch.dtype, precision: str = "ieee") -> float:
    """The matmul ceiling (TFLOP/s) for inputs of ``dtype`` computed at
    ``precision`` (fp32 only: "ieee", "tf32" or "tf32x3"; half dtypes use
    their tensor cores whatever it says)."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision: expected one of {_PRECISIONS}, got {precision!r}")
    if dtype in (torch.bfloat16, torch.float16):
        v = peaks.bf16 if dtype == torch.bfloat16 else peaks.fp16
        return float(v) if v else float(peaks.fp32)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    if dtype == torch.float32 and precision != "ieee" and peaks.tf32:
        return float(peaks.tf32) / (3.0 if precision == "tf32x3" else 1.0)
    return float(peaks.fp32) / (2.0 if dtype == torch.float64 else 1.0)  # fp64: a floor, not a datasheet figure


def _dtype(d: Union[str, torch.dtype], name: str) -> torch.dtype:
    if isinstance(d, str):
        d = getattr(torch, d.replace("torch.", ""), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(f"{name}: expected a floating torch dtype (or its name), got {d!r}")
    return d


def op_cost(N: int, C: int, P: int, K: int, B: Optional[int], *, dtype: Union[str, torch.dtype] = torch.float32,
            param_dtype: Union[str, torch.dtype] = torch.float32, mode: str = "fwd",
            normalize: bool = True) -> Dict[str, int]:
    """Algorithmic cost of ``person_vlad`` on features (N, C, P), parts (N, B, P)
    (``B=None``: no parts), K clusters: ``{"gemm_flops", "vector_flops", "bytes"}``
    for ``mode`` "fwd" (forward) or "fwdbwd" (forward + backward, gradients of
    every input).  ``dtype``: features/parts/output; ``param_dtype``: weight,
    bias, centers."""
    for nm, v in (("N", N), ("C", C), ("P", P), ("K", K)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{nm}: expected an int >= 0, got {v!r}")
    if B is not None and (not isinstance(B, int) or isinstance(B, bool) or B < 1):
        raise ValueError(f"B: expected an int >= 1 or None (no parts), got {B!r}")
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode: expected 'fwd' or 'fwdbwd', got {mode!r}")
    es = _dtype(dtype, "dtype").itemsize
    ps = _dtype(param_dtype, "param_dtype").itemsize
    nb = 1 if B is None else B
    nkcp = N * K * C * P
    nbkp = N * nb * K * P
    nkc = N * K * C
    # logit (+ part scale) and bias 2, max 1, subtract 1, exp 1, sum 1, scale 1,
    # A' accumulate 2 (1 without parts), s accumulate 1
    fwd_elem = (10 if B is not None else 9) * nbkp
    # residual 2; per norm: square-accumulate 2 + scale 1 (intra and L2)
    fwd_vec = fwd_elem + (8 if normalize else 2) * nkc
    in_bytes = N * C * P * es + (0 if B is None else N * nb * P * es) + (K * C + K + K * C) * ps
    out_bytes = nkc * es
    if mode == "fwd":
        return dict(gemm_flops=4 * nkcp, vector_flops=fwd_vec, bytes=in_bytes + out_bytes)
    # backward: dA' = dV F, dF += A'^T dV, dF += W^T dG, dW = dG F^T (4 products of
    # 2NKCP each); its element-wise work counted as twice the forward's
    bwd_vec = 2 * fwd_vec
    norms_bytes = N * (K + 1) * 4 if normalize else 0
    bwd_bytes = (in_bytes + out_bytes + norms_bytes + out_bytes  # inputs, saved output + norms, grad of output
                 + in_bytes)  # gradients of every input, same sizes
    return dict(gemm_flops=12 * nkcp, vector_flops=fwd_vec + bwd_vec,
                bytes=in_bytes + out_bytes + norms_bytes + bwd_bytes)


def model_flops(model_or_preset: Union[str, torch.nn.Module, Any], mode: str = "fwd",
                clip_shape: Optional[Sequence[int]] = None) -> int:
    """FLOPs per clip of a PersonVLAD model (a preset name, a
    :class:`personvlad.models.ModelConfig` or a model, which is not touched: a
    fresh one is built from its ``config`` on the meta device), forward or
    forward + backward, counted by ``FlopCounterMode`` (matmuls and
    convolutions; element-wise work is not counted)."""
    from .models import PersonVLADNet, build_model

    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode: expected 'fwd' or 'fwdbwd', got {mode!r}")
    src = model_or_preset
    if isinstance(src, torch.nn.Module):
        if not hasattr(src, "config"):
            raise ValueError(f"model_or_preset: expected a PersonVLAD model (with .config), got {type(src).__name__}")
        src = src.config
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(src) if isinstance(src, str) else PersonVLADNet(src)
    cfg = model.config
    shape = tuple(clip_shape) if clip_shape is not None else (3, cfg.clip_len, cfg.height, cfg.width)
    if len(shape) != 4:
        raise ValueError(f"clip_shape: expected (3, T, H, W), got {shape}")
    x = torch.empty((1,) + shape, device="meta")
    counter = FlopCounterMode(display=False)
    if mode == "fwd":
        model.eval()
        with counter, torch.no_grad():
            model(x)
    else:
        model.train()
        with counter:
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()
    return int(counter.get_total_flops())


def roofline(gemm_flops: float, bytes_: float, peaks: DevicePeaks, dtype: Union[str, torch.dtype],
             precision: Union[str, Dict[str, float]] = "ieee", vector_flops: float = 0.0) -> Dict[str, Any]:
    """The roofline bound on ``peaks``: ``{"bound_s", "bound_by" ("matmul",
    "vector" or "memory"), "peak_matmul_tflops", "peak_vector_tflops",
    "peak_gbps", ...}``.  ``precision``: one for every product, or a mapping
    precision -> share of ``gemm_flops`` (shares summing to 1) when the
    products differ (Triton's fp32 logit GEMM stays "ieee")."""
    dt = _dtype(dtype, "dtype")
    shares = {precision: 1.0} if isinstance(precision, str) else dict(precision)
    if not shares or abs(sum(shares.values()) - 1.0) > 1e-6 or min(shares.values()) < 0:
        raise ValueError(f"precision: expected a precision or a mapping of precision -> share summing to 1, "
                         f"got {precision!r}")
    mm_s = sum(share * gemm_flops / (matmul_peak_tflops(peaks, dt, p) * 1e12) for p, share in shares.items())
    mm = gemm_flops / mm_s / 1e12 if mm_s > 0 else matmul_peak_tflops(peaks, dt, next(iter(shares)))
    times = {"matmul": mm_s, "vector": vector_flops / (peaks.fp32 * 1e12), "memory": bytes_ / (peaks.gbps * 1e9)}
    by = max(times, key=times.get)
    return dict(bound_s=times[by], bound_by=by, peak_matmul_tflops=mm, peak_vector_tflops=float(peaks.fp32),
                peak_gbps=float(peaks.gbps), precision=shares, peaks_name=peaks.name, peaks_source=peaks.source)


@functools.lru_cache(maxsize=16)
def _preset_flops(preset: str, mode: str) -> int:
    return model_flops(preset, mode)


def model_work_info(preset: str, mode: str, clips: int, dtype: Union[str, torch.dtype],
                    device: Union[None, str, torch.device] = None) -> Dict[str, Any]:
    """``extra_info`` for a model benchmark: ``flops`` per round (``clips`` x
    :func:`model_flops` of the preset), ``flops_per_clip`` and, on a CUDA device
    with known peaks, ``roofline_s`` / ``bound_by`` / ``peak_matmul_tflops``
    (compute only: the convolutions' and matmuls' FLOPs at the ``dtype``'s
    peak; fp32 convolutions count at TF32 when cuDNN allows it, PyTorch's
    default).  ``mode``: "fwd" (inference) or "fwdbwd" (a training step)."""
    per_clip = _preset_flops(preset, mode)
    info: Dict[str, Any] = dict(flops=per_clip * int(clips), flops_per_clip=per_clip)
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        peaks = device_peaks(dev)
        if peaks is not None:
            dt = _dtype(dtype, "dtype")
            prec = "tf32" if (dt == torch.float32 and torch.backends.cudnn.allow_tf32) else "ieee"
            rl = roofline(info["flops"], 0.0, peaks, dt, prec)
            info.update(roofline_s=rl["bound_s"], bound_by=rl["bound_by"], peak_matmul_tflops=rl["peak_matmul_tflops"],
                        peaks_name=rl["peaks_name"], peaks_source=rl["peaks_source"])
    return info
