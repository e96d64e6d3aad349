"""personvlad.eval: re-id evaluation.

- :func:`evaluate` (SPEC §3: ``"standard"`` and ``"mars"`` protocols, CMC + mAP),
  :func:`compute_distmat` (euclidean / sqeuclidean / cosine, chunked, torch);
- :mod:`.modes`: feature files, Table II probe/gallery modes, repeated splits
  (:func:`evaluate_splits`, :func:`format_table`);
- :mod:`.metric_learning`: :class:`XQDA`, :class:`KISSME`;
- :mod:`.retrieval`: :class:`GalleryIndex` (faiss when installed, exact otherwise);
- :mod:`.visualize`: :func:`plot_cmc`, :func:`plot_part_maps`,
  :func:`plot_feature_response`, :func:`plot_ranked_list`;
- :mod:`.cli`: ``personvlad evaluate | index build | search | visualize``.

Light to import: only numpy is loaded here; the other names are imported on
first access (torch/scipy/matplotlib/faiss load only when needed).
"""
import importlib

from .protocols import PROTOCOLS, evaluate, per_query_stats  # noqa: F401
from .distance import compute_distmat  # noqa: F401

_LAZY = {
    "FeatureFile": "modes", "evaluate_feature_file": "modes", "evaluate_splits": "modes",
    "format_table": "modes", "tracklet_activation": "modes", "MODES": "modes",
    "XQDA": "metric_learning", "KISSME": "metric_learning", "build_metric": "metric_learning",
    "GalleryIndex": "retrieval", "build_index_from_features": "retrieval",
    "plot_cmc": "visualize", "plot_part_maps": "visualize", "plot_feature_response": "visualize",
    "plot_ranked_list": "visualize", "load_cmc_curves": "visualize",
}

__all__ = ["evaluate", "compute_distmat", "per_query_stats", "PROTOCOLS", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
