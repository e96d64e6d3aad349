"""Pictures (matplotlib, Agg backend, PNG): CMC curves (paper Fig. 9), part maps
(Fig. 8), feature-response maps (Fig. 5) and ranked gallery lists.

Every function writes ``out_png`` and returns its path.  Image grids are laid
out without margins so the PNG size is exact and predictable:

* :func:`plot_part_maps`: ``(T*W*scale, (1+B)*H*scale)`` pixels (width, height)
  -- a row of frames, then one row per part;
* :func:`plot_feature_response`: ``(T*W*scale, 2*H*scale)``;
* :func:`plot_ranked_list`: ``((1+k)*panel_w + gap, panel_h)``;
* :func:`plot_cmc`: ``size`` (default 640x480).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .protocols import _to_numpy  # torch tensors (any float dtype) or array-likes


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _prepare_out(out_png: str) -> str:
    """The path the figure is written to: ``out_png``, with ``.png`` added
    where it has no extension (as matplotlib would), its folder created."""
    out_png = os.fspath(out_png)
    if not os.path.splitext(out_png)[1]:
        out_png += ".png"
    d = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(d, exist_ok=True)
    return out_png


def frames_to_thwc(frames, name: str = "frames") -> np.ndarray:
    """uint8 ``(T, H, W, 3)`` from ``(T, H, W, 3)`` or ``(T, 3, H, W)`` (uint8, or float in [0, 1])."""
    f = _to_numpy(frames, name)
    if f.ndim != 4:
        raise ValueError(f"{name}: expected (T, H, W, 3) or (T, 3, H, W), got shape {f.shape}")
    if f.shape[-1] == 3:
        out = f
    elif f.shape[1] == 3:
        out = f.transpose(0, 2, 3, 1)
    else:
        raise ValueError(f"{name}: expected (T, H, W, 3) or (T, 3, H, W), got shape {f.shape}")
    if out.dtype == np.uint8:
        return np.ascontiguousarray(out)
    if out.dtype.kind == "f":
        return np.ascontiguousarray((np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    raise ValueError(f"{name}: expected uint8 (or float in [0, 1]) frames, got dtype {out.dtype}")


def upsample_maps(maps: np.ndarray, size: Tuple[int, int, int]) -> np.ndarray:
    """Trilinear upsampling of ``(B, T', H', W')`` maps to ``(B, T, H, W)``."""
    import torch

    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))[None]  # (1, B, T', H', W')
    up = torch.nn.functional.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear",
                                         align_corners=False)
    return up[0].numpy()


def _grid(rows: int, cols: int, panel_w: int, panel_h: int, dpi: int = 100):
    plt = _plt()
    fig = plt.figure(figsize=(cols * panel_w / dpi, rows * panel_h / dpi), dpi=dpi)
    axes = []
    for r in range(rows):
        row = []
        for c in range(cols):
            ax = fig.add_axes((c / cols, 1 - (r + 1) / rows, 1 / cols, 1 / rows))
            ax.set_axis_off()
            row.append(ax)
        axes.append(row)
    return fig, axes


def _save(fig, out_png: str, dpi: int = 100) -> str:
    plt = _plt()
    out_png = _prepare_out(out_png)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def _select_frames(t: int, max_frames: Optional[int]) -> np.ndarray:
    if max_frames is None or t <= max_frames:
        return np.arange(t)
    return np.unique(np.linspace(0, t - 1, int(max_frames)).round().astype(int))


def plot_part_maps(frames, parts, out_png: str, alpha: float = 0.5, scale: int = 2,
                   max_frames: Optional[int] = 8, cmap: str = "jet") -> str:
    """Part maps overlaid on the frames (paper Fig. 8).

    Args:
        frames: uint8 ``(T, H, W, 3)`` or ``(T, 3, H, W)`` (numpy or torch).
        parts: ``(B, T', H', W')`` float maps (a leading batch dim of 1 is
            dropped), upsampled (trilinear) to ``(T, H, W)``; each part is
            scaled by its maximum over the clip for display.
        max_frames: show at most this many frames (evenly spaced).
    Output: one row of frames, then one row per part.
    """
    f = frames_to_thwc(frames)
    p = _to_numpy(parts, "parts").astype(np.float32)
    if p.ndim == 5 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 4:
        raise ValueError(f"parts: expected (B, T', H', W'), got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("parts: contains NaN or inf")
    if not (isinstance(scale, (int, np.integer)) and scale >= 1):
        raise ValueError(f"scale: expected a positive int, got {scale!r}")
    t, h, w, _ = f.shape
    b = p.shape[0]
    up = upsample_maps(p, (t, h, w))
    up = up - up.min(axis=(1, 2, 3), keepdims=True)
    up = up / np.maximum(up.max(axis=(1, 2, 3), keepdims=True), 1e-12)
    sel = _select_frames(t, max_frames)
    fig, axes = _grid(1 + b, len(sel), w * scale, h * scale)
    for c, ti in enumerate(sel):
        axes[0][c].imshow(f[ti], interpolation="bilinear", aspect="auto")
        axes[0][c].text(2, 2, f"t={ti}", color="white", fontsize=7, va="top",
                        bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
        for r in range(b):
            ax = axes[1 + r][c]
            ax.imshow(f[ti], interpolation="bilinear", aspect="auto")
            ax.imshow(up[r, ti], cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear", aspect="auto")
            if c == 0:
                ax.text(2, 2, f"part {r + 1}", color="white", fontsize=7, va="top",
                        bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
    return _save(fig, out_png)


def feature_response(feature_map) -> np.ndarray:
    """Channel energy ``sqrt(sum_c F_c^2)`` of ``(C, T', H', W')`` -> ``(T', H', W')`` scaled to [0, 1]."""
    fm = _to_numpy(feature_map, "feature_map").astype(np.float32)
    if fm.ndim == 5 and fm.shape[0] == 1:
        fm = fm[0]
    if fm.ndim != 4:
        raise ValueError(f"feature_map: expected (C, T', H', W'), got shape {fm.shape}")
    if not np.isfinite(fm).all():
        raise ValueError("feature_map: contains NaN or inf")
    e = np.sqrt((fm.astype(np.float64) ** 2).sum(0))
    e = e - e.min()
    return (e / max(e.max(), 1e-12)).astype(np.float32)


def plot_feature_response(frames, feature_map, out_png: str, alpha: float = 0.5, scale: int = 2,
                          max_frames: Optional[int] = 8, cmap: str = "jet") -> str:
    """Feature-response maps (paper Fig. 5): channel energy of a feature map over the frames.

    Args:
        frames: uint8 ``(T, H, W, 3)`` or ``(T, 3, H, W)``.
        feature_map: ``(C, T', H', W')`` (e.g. ``model.features(clip)[0]``); its
            channel energy is upsampled (trilinear) to the frames.
    Output: a row of frames and a row of frames with the response overlaid.
    """
    f = frames_to_thwc(frames)
    if not (isinstance(scale, (int, np.integer)) and scale >= 1):
        raise ValueError(f"scale: expected a positive int, got {scale!r}")
    e = feature_response(feature_map)
    t, h, w, _ = f.shape
    up = np.clip(upsample_maps(e[None], (t, h, w))[0], 0.0, 1.0)
    sel = _select_frames(t, max_frames)
    fig, axes = _grid(2, len(sel), w * scale, h * scale)
    for c, ti in enumerate(sel):
        axes[0][c].imshow(f[ti], interpolation="bilinear", aspect="auto")
        axes[1][c].imshow(f[ti], interpolation="bilinear", aspect="auto")
        axes[1][c].imshow(up[ti], cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear",
                          aspect="auto")
    return _save(fig, out_png)


def _load_image(path: str, size: Tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if not os.path.isfile(path):
        raise ValueError(f"frame file not found: {path}")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))


def plot_ranked_list(query_frame_path: str, gallery_frame_paths: Sequence[str], correct_flags: Sequence[bool],
                     out_png: str, panel_size: Tuple[int, int] = (64, 128), border: int = 4, gap: int = 16,
                     scores: Optional[Sequence[float]] = None, labels: Optional[Sequence[str]] = None) -> str:
    """A query and its ranked gallery list; green border = correct, red = incorrect.

    Args:
        query_frame_path: a frame of the query tracklet (``query_first_frame``).
        gallery_frame_paths: frames of the ranked gallery tracklets, best first
            (``gallery_first_frame[indices]``).
        correct_flags: one bool per gallery entry.
        panel_size: ``(width, height)`` of each picture in pixels.
        scores / labels: optional text under each gallery picture.
    """
    k = len(gallery_frame_paths)
    flags = [bool(x) for x in correct_flags]
    if k < 1:
        raise ValueError("gallery_frame_paths: expected at least one gallery frame")
    if len(flags) != k:
        raise ValueError(f"correct_flags: expected {k} flags (one per gallery frame), got {len(flags)}")
    for name, seq in (("scores", scores), ("labels", labels)):
        if seq is not None and len(seq) != k:
            raise ValueError(f"{name}: expected {k} values (one per gallery frame), got {len(seq)}")
    pw, ph = int(panel_size[0]), int(panel_size[1])
    if pw < 2 * border + 1 or ph < 2 * border + 1:
        raise ValueError(f"panel_size: expected panels larger than 2*border, got {panel_size}")
    inner = (pw - 2 * border, ph - 2 * border)

    def framed(path, color):
        img = np.empty((ph, pw, 3), dtype=np.uint8)
        img[:] = color
        img[border:ph - border, border:pw - border] = _load_image(path, inner)
        return img

    plt = _plt()
    dpi = 100
    total_w = (1 + k) * pw + gap
    fig = plt.figure(figsize=(total_w / dpi, ph / dpi), dpi=dpi)
    fig.patch.set_facecolor("white")
    green, red, blue = (0, 170, 0), (220, 0, 0), (40, 90, 220)
    panels = [(0, framed(query_frame_path, blue), "query")]
    for i, (p, ok) in enumerate(zip(gallery_frame_paths, flags)):
        text = f"{i + 1}"
        if scores is not None:
            text += f" {float(scores[i]):.2f}"
        if labels is not None:
            text += f" {labels[i]}"
        panels.append((pw + gap + i * pw, framed(p, green if ok else red), text))
    for x0, img, text in panels:
        ax = fig.add_axes((x0 / total_w, 0.0, pw / total_w, 1.0))
        ax.set_axis_off()
        ax.imshow(img, interpolation="nearest", aspect="auto")
        ax.text(pw / 2, ph - border - 1, text, color="white", fontsize=6, ha="center", va="bottom",
                bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
    return _save(fig, out_png, dpi)


CurveInput = Union[Mapping[str, Sequence[float]], Sequence[Tuple[str, Sequence[float]]]]


def plot_cmc(curves: CurveInput, out_png: str, max_rank: Optional[int] = None, title: Optional[str] = None,
             size: Tuple[int, int] = (640, 480), dpi: int = 100) -> str:
    """CMC curves (paper Fig. 9): ``curves`` maps a label to a CMC (fractions, rank 1 first)."""
    items = list(curves.items()) if isinstance(curves, Mapping) else list(curves)
    if not items:
        raise ValueError("curves: expected at least one (label, cmc) curve")
    plt = _plt()
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_axes((0.1, 0.12, 0.86, 0.8))
    for label, cmc in items:
        c = np.asarray(cmc, dtype=np.float64).reshape(-1)
        if c.size == 0 or not np.isfinite(c).all():
            raise ValueError(f"curves: curve {label!r} is empty or not finite")
        r = c.size if max_rank is None else min(int(max_rank), c.size)
        ax.plot(np.arange(1, r + 1), 100.0 * c[:r], marker="o" if r <= 30 else None, markersize=3,
                label=f"{label} (R1 {100.0 * c[0]:.1f}%)")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, out_png, dpi)


def load_cmc_curves(inputs: Sequence[str], protocol: str = "standard", mode: str = "all/all",
                    labels: Optional[Sequence[str]] = None, metric: str = "euclidean",
                    max_rank: int = 50) -> Dict[str, list]:
    """CMC curves from result JSONs (``personvlad evaluate --json``) or feature files (evaluated here)."""
    from .modes import evaluate_splits

    if labels is not None and len(labels) != len(inputs):
        raise ValueError(f"labels: expected {len(inputs)} labels (one per input), got {len(labels)}")
    out: Dict[str, list] = {}
    for i, path in enumerate(inputs):
        label = labels[i] if labels is not None else os.path.splitext(os.path.basename(path))[0]
        if path.endswith(".json"):
            with open(path) as fh:
                rep = json.load(fh)
            try:
                cmc = rep["results"][protocol][mode]["cmc"]
            except (KeyError, TypeError):
                raise ValueError(f"inputs: {path} has no results[{protocol!r}][{mode!r}]['cmc'] "
                                 "(a `personvlad evaluate --json` report with that protocol/mode)") from None
        else:
            rep = evaluate_splits([path], protocols=[protocol], metric=metric,
                                  modes=None if mode == "all/all" else [mode], max_rank=max_rank)
            cmc = rep["results"][protocol][mode]["cmc"]
        out[label] = cmc
    return out
