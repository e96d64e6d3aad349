"""personvlad.eval: re-id evaluation (CMC/mAP protocols, distances, Table II
modes, metric learning, retrieval index, pictures).

Light to import: only numpy is loaded here; torch/scipy/matplotlib/faiss are
imported by the functions that need them.
"""
from .protocols import PROTOCOLS, evaluate, per_query_stats  # noqa: F401
from .distance import compute_distmat  # noqa: F401

__all__ = ["evaluate", "compute_distmat", "per_query_stats", "PROTOCOLS"]
