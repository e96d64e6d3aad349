"""Evaluation of feature files: protocols x metrics x Table II modes x splits.

Feature file (``personvlad extract``; see notes/INTERFACES.md): an ``.npz``
with, for ``split`` in ``query``/``gallery`` (and optionally ``train``):
``{split}_feats (n, D)`` tracklet activations (mean of the clip descriptors,
L2-normalised), ``{split}_pids (n,)``, ``{split}_camids (n,)``,
``{split}_clip_feats (total_clips, D)``, ``{split}_clip_counts (n,)``,
``{split}_first_frame (n,)`` and ``meta`` (a JSON string).

Table II of the paper compares probe/gallery representations:

* ``all``: the tracklet activation -- mean of *all* clip descriptors of the
  tracklet, then L2-normalised (the ``{split}_feats`` array);
* ``random``: the descriptor of *one random clip* of the tracklet (taken
  from ``{split}_clip_feats``, L2-normalised).

Modes are named ``"<probe>/<gallery>"``: ``all/all``, ``all/random``,
``random/all``, ``random/random``.  A mode with a random side is evaluated
``repeats`` times (default 10, seeds ``seed .. seed+repeats-1``) and averaged.
With several feature files (the repeated train/test splits of iLIDS-VID and
PRID-2011) every number is reported as mean +- std over the files.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from .distance import compute_distmat
from .protocols import PROTOCOLS, check_positive_int, evaluate

MODES = ("all/all", "all/random", "random/all", "random/random")
METRICS = ("euclidean", "cosine", "xqda", "kissme")
REPORT_RANKS = (1, 5, 10, 20)


class FeatureFile:
    """A loaded, validated feature file (arrays are loaded lazily from the npz)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise ValueError(f"features: file not found: {path}")
        self.path = path
        try:
            self._npz = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"features: {path} is not a readable .npz file ({exc})") from None
        self.keys = set(self._npz.files)
        self._cache: Dict[str, np.ndarray] = {}
        for split in ("query", "gallery"):
            for k in ("feats", "pids", "camids"):
                self.require(f"{split}_{k}")
        for split in ("query", "gallery"):
            n = self[f"{split}_feats"].shape[0]
            if self[f"{split}_feats"].ndim != 2:
                raise ValueError(f"features: {path}: {split}_feats must be (n, D), got shape "
                                 f"{self[f'{split}_feats'].shape}")
            for k in ("pids", "camids"):
                if self[f"{split}_{k}"].shape != (n,):
                    raise ValueError(f"features: {path}: {split}_{k} must have shape ({n},), got "
                                     f"{self[f'{split}_{k}'].shape}")
        if self["query_feats"].shape[1] != self["gallery_feats"].shape[1]:
            raise ValueError(f"features: {path}: query_feats and gallery_feats dimensions differ "
                             f"({self['query_feats'].shape[1]} vs {self['gallery_feats'].shape[1]})")

    def require(self, key: str, why: str = "") -> None:
        if key not in self.keys:
            extra = f" ({why})" if why else ""
            raise ValueError(f"features: {self.path} has no key '{key}'{extra}; keys present: "
                             f"{sorted(self.keys)}")

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self.require(key)
            self._cache[key] = self._npz[key]
        return self._cache[key]

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    @property
    def meta(self) -> dict:
        if "meta" not in self.keys:
            return {}
        try:
            return json.loads(str(self["meta"]))
        except ValueError:
            return {"raw": str(self["meta"])}

    def clip_layout(self, split: str):
        """(clip_feats, offsets, counts) of a split, validated."""
        why = "needed for the random-clip modes (--modes)"
        self.require(f"{split}_clip_feats", why)
        self.require(f"{split}_clip_counts", why)
        clips = self[f"{split}_clip_feats"]
        counts = self[f"{split}_clip_counts"].astype(np.int64)
        n = self[f"{split}_feats"].shape[0]
        if counts.shape != (n,):
            raise ValueError(f"features: {self.path}: {split}_clip_counts must have shape ({n},), got {counts.shape}")
        if (counts < 1).any():
            raise ValueError(f"features: {self.path}: {split}_clip_counts has tracklets with no clip")
        if clips.ndim != 2 or clips.shape[0] != counts.sum():
            raise ValueError(f"features: {self.path}: {split}_clip_feats must have sum({split}_clip_counts)="
                             f"{int(counts.sum())} rows, got shape {clips.shape}")
        offsets = np.cumsum(counts) - counts
        return clips, offsets, counts

    def close(self):
        self._npz.close()


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def tracklet_activation(clip_feats: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean of each tracklet's clip descriptors, then L2 normalisation."""
    counts = np.asarray(counts, dtype=np.int64)
    seg = np.repeat(np.arange(counts.shape[0]), counts)
    sums = np.zeros((counts.shape[0], clip_feats.shape[1]), dtype=np.float64)
    np.add.at(sums, seg, clip_feats)
    return _l2n(sums / counts[:, None])


def random_clip_features(ff: FeatureFile, split: str, rng: np.random.Generator) -> np.ndarray:
    """One random clip descriptor per tracklet (L2-normalised)."""
    clips, offsets, counts = ff.clip_layout(split)
    pick = offsets + (rng.random(counts.shape[0]) * counts).astype(np.int64)
    return _l2n(clips[pick])


def _parse_modes(modes) -> List[str]:
    if modes is None or modes is False:
        return ["all/all"]
    if modes is True:
        return list(MODES)
    out = list(modes)
    for m in out:
        if m not in MODES:
            raise ValueError(f"modes: expected items in {MODES}, got {m!r}")
    return out


def _fit_metric(ff: FeatureFile, metric: str, metric_kwargs: Optional[dict]):
    from .metric_learning import build_metric

    why = f"--metric {metric} is fitted on the training split"
    ff.require("train_feats", why)
    ff.require("train_pids", why)
    learner = build_metric(metric, **(metric_kwargs or {}))
    return learner.fit(ff["train_feats"], ff["train_pids"])


def evaluate_feature_file(path_or_ff, protocols: Sequence[str] = ("standard",), metric: str = "euclidean",
                          modes=None, repeats: int = 10, seed: int = 0, max_rank: int = 50,
                          metric_kwargs: Optional[dict] = None, device: Optional[str] = None) -> dict:
    """Evaluate one feature file.

    Returns ``{protocol: {mode: {"cmc": list, "mAP": float, "repeats": int}}}``
    (CMC and mAP as fractions; random modes averaged over ``repeats`` draws).
    """
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"protocols: expected items in {PROTOCOLS}, got {p!r}")
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    check_positive_int("repeats", repeats)
    mode_list = _parse_modes(modes)
    ff = path_or_ff if isinstance(path_or_ff, FeatureFile) else FeatureFile(path_or_ff)
    learner = _fit_metric(ff, metric, metric_kwargs) if metric in ("xqda", "kissme") else None

    def dist(q, g):
        if learner is not None:
            return learner.distance(q, g)
        return compute_distmat(q, g, metric=metric, device=device)

    qp, gp = ff["query_pids"], ff["gallery_pids"]
    qc, gc = ff["query_camids"], ff["gallery_camids"]
    q_all, g_all = ff["query_feats"], ff["gallery_feats"]
    out: Dict[str, Dict[str, dict]] = {p: {} for p in protocols}
    for mode in mode_list:
        probe, gallery = mode.split("/")
        reps = 1 if mode == "all/all" else int(repeats)
        acc = {p: ([], []) for p in protocols}
        for r in range(reps):
            rng = np.random.default_rng(seed + r)
            q = q_all if probe == "all" else random_clip_features(ff, "query", rng)
            g = g_all if gallery == "all" else random_clip_features(ff, "gallery", rng)
            dm = dist(q, g)
            for p in protocols:
                cmc, mAP = evaluate(dm, qp, gp, qc, gc, max_rank=max_rank, protocol=p)
                acc[p][0].append(cmc)
                acc[p][1].append(mAP)
        for p in protocols:
            out[p][mode] = {"cmc": np.mean(acc[p][0], axis=0).tolist(),
                            "mAP": float(np.mean(acc[p][1])), "repeats": reps}
    return out


def query_counts(path_or_ff) -> dict:
    """Sizes of a feature file's query/gallery and how many queries each protocol scores.

    ``standard``: queries with a gallery entry of the same id from another
    camera (the others are skipped); ``mars``: every query is scored (those
    with no good entry count as 0).
    """
    ff = path_or_ff if isinstance(path_or_ff, FeatureFile) else FeatureFile(path_or_ff)
    qp, qc = ff["query_pids"].astype(np.int64), ff["query_camids"].astype(np.int64)
    gp, gc = ff["gallery_pids"].astype(np.int64), ff["gallery_camids"].astype(np.int64)

    def count(keys, table):
        u, c = np.unique(table, axis=0, return_counts=True)
        if u.ndim == 1:
            pos = np.searchsorted(u, keys)
            pos = np.minimum(pos, len(u) - 1)
            return np.where(u[pos] == keys, c[pos], 0)
        lookup = {tuple(k): n for k, n in zip(u.tolist(), c.tolist())}
        return np.array([lookup.get(tuple(k), 0) for k in keys.tolist()])

    same_id = count(qp, gp)
    same_id_cam = count(np.stack([qp, qc], 1), np.stack([gp, gc], 1))
    return {"num_query": int(qp.shape[0]), "num_gallery": int(gp.shape[0]),
            "num_scored_standard": int(((same_id - same_id_cam) > 0).sum()), "num_scored_mars": int(qp.shape[0])}


def _summary(cmc: np.ndarray, maps: np.ndarray) -> dict:
    d = {"mAP": float(maps.mean()), "mAP_std": float(maps.std())}
    for r in REPORT_RANKS:
        if r <= cmc.shape[1]:
            d[f"rank{r}"] = float(cmc[:, r - 1].mean())
            d[f"rank{r}_std"] = float(cmc[:, r - 1].std())
    d["cmc"] = cmc.mean(0).tolist()
    d["cmc_std"] = cmc.std(0).tolist()
    return d


def evaluate_splits(paths: Sequence[str], protocols: Sequence[str] = ("standard",), metric: str = "euclidean",
                    modes=None, repeats: int = 10, seed: int = 0, max_rank: int = 50,
                    metric_kwargs: Optional[dict] = None, device: Optional[str] = None) -> dict:
    """Evaluate one or several feature files (repeated splits) and aggregate.

    Returns a JSON-ready dict::

        {"features": [...], "metric": ..., "max_rank": ..., "repeats": ...,
         "modes": [...], "protocols": [...],
         "results": {protocol: {mode: {"mAP", "mAP_std", "rank1", "rank1_std", ...,
                                       "cmc", "cmc_std", "per_split": [{"mAP", "rank1", ...}]}}}}

    Means/stds are over the files (std is the population std, 0 for one file).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("paths: expected at least one feature file")
    mode_list = _parse_modes(modes)
    per_file = [evaluate_feature_file(p, protocols=protocols, metric=metric, modes=mode_list, repeats=repeats,
                                      seed=seed, max_rank=max_rank, metric_kwargs=metric_kwargs, device=device)
                for p in paths]
    counts = [{"file": p, **query_counts(p)} for p in paths]
    results: Dict[str, Dict[str, dict]] = {}
    for p in protocols:
        results[p] = {}
        for mode in mode_list:
            cmc = np.array([f[p][mode]["cmc"] for f in per_file])
            maps = np.array([f[p][mode]["mAP"] for f in per_file])
            s = _summary(cmc, maps)
            s["per_split"] = [{"file": path, "mAP": float(maps[i]),
                               **{f"rank{r}": float(cmc[i, r - 1]) for r in REPORT_RANKS if r <= cmc.shape[1]}}
                              for i, path in enumerate(paths)]
            results[p][mode] = s
    return {"features": paths, "metric": metric, "max_rank": int(max_rank), "repeats": int(repeats),
            "seed": int(seed), "modes": mode_list, "protocols": list(protocols), "counts": counts,
            "results": results}


def format_table(report: dict) -> str:
    """Terminal table of an :func:`evaluate_splits` report (percentages)."""
    multi = len(report["features"]) > 1
    ranks = [r for r in REPORT_RANKS if r <= report["max_rank"]]
    head = ["protocol", "probe/gallery", "mAP"] + [f"R{r}" for r in ranks]
    rows = []
    for p, by_mode in report["results"].items():
        for mode, s in by_mode.items():
            def cell(key):
                v = 100.0 * s[key]
                return f"{v:.1f} ± {100.0 * s[key + '_std']:.1f}" if multi else f"{v:.1f}"
            rows.append([p, mode, cell("mAP")] + [cell(f"rank{r}") for r in ranks])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    sep = "-" * len(line(head))
    counts = report.get("counts") or []
    sizes = ""
    if counts:
        c0 = counts[0]
        sizes = (f"\nquery {c0['num_query']}  gallery {c0['num_gallery']}  standard scores "
                 f"{c0['num_scored_standard']} queries (with a cross-camera match), mars all {c0['num_scored_mars']}"
                 + ("  [first split]" if len(counts) > 1 else ""))
    title = (f"metric={report['metric']}  files={len(report['features'])}"
             + (" (mean ± std over splits)" if multi else "")
             + (f"  random modes: mean of {report['repeats']} draws" if any(m != "all/all" for m in report["modes"]) else ""))
    return "\n".join([title + sizes, sep, line(head), sep] + [line(r) for r in rows] + [sep])


def write_json(report: dict, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)

