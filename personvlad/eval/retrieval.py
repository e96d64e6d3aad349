"""Gallery retrieval index: inner product over L2-normalised descriptors.

Index file format (one ``.npz`` file, whatever its name, e.g. ``gallery.index``):

* ``feats`` ``(N, D)`` float32, the L2-normalised gallery descriptors;
* ``pids`` / ``camids`` ``(N,)`` int64 (``-1`` when unknown);
* ``first_frame`` ``(N,)`` str (optional; a frame of each tracklet, for pictures);
* ``meta``: JSON string ``{"format": "personvlad-index", "version": 1,
  "type": "flat"|"ivf", "nlist": int|null, "nprobe": int|null, "dim": D, ...}``;
* ``faiss_index`` ``uint8`` (optional): the faiss index, serialised with
  ``faiss.serialize_index``, present when faiss was importable at build time.

So the file loads with or without faiss: without faiss (or without a stored
faiss index) the search is an exact numpy search over ``feats``
(scores = inner products = cosine similarities; ties broken by gallery
index).  With faiss, ``type="flat"`` is ``IndexFlatIP`` (exact) and
``type="ivf"`` is ``IndexIVFFlat`` (approximate; ``nprobe`` of the ``nlist``
cells are visited).
"""
from __future__ import annotations

import io
import json
import os
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np

from .protocols import check_positive_int

INDEX_TYPES = ("flat", "ivf")
_FORMAT = "personvlad-index"


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except Exception:
        return False
    return True


def _l2n(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def exact_search(gallery: np.ndarray, queries: np.ndarray, topk: int, chunk: int = 1024
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (descending; ties by gallery index)."""
    from .protocols import stable_argsort_rows

    k = min(int(topk), gallery.shape[0])
    scores_out = np.empty((queries.shape[0], k), dtype=np.float32)
    idx_out = np.empty((queries.shape[0], k), dtype=np.int64)
    for s in range(0, queries.shape[0], chunk):
        sc = queries[s:s + chunk] @ gallery.T
        order = stable_argsort_rows(-sc)[:, :k]
        idx_out[s:s + chunk] = order
        scores_out[s:s + chunk] = np.take_along_axis(sc, order, axis=1)
    return scores_out, idx_out


class GalleryIndex:
    """Searchable gallery.  Build with :meth:`build`, persist with :meth:`save` / :meth:`load`."""

    def __init__(self, feats: np.ndarray, pids: np.ndarray, camids: np.ndarray,
                 first_frame: Optional[np.ndarray], meta: dict, faiss_index=None):
        self.feats = feats
        self.pids = pids
        self.camids = camids
        self.first_frame = first_frame
        self.meta = meta
        self.faiss_index = faiss_index

    def __len__(self) -> int:
        return self.feats.shape[0]

    @property
    def dim(self) -> int:
        return self.feats.shape[1]

    @property
    def backend(self) -> str:
        return "faiss" if self.faiss_index is not None else "exact"

    # -- construction --------------------------------------------------------
    @classmethod
    def build(cls, feats, pids=None, camids=None, first_frame=None, index_type: str = "flat",
              nlist: Optional[int] = None, nprobe: Optional[int] = None, use_faiss: Optional[bool] = None,
              extra_meta: Optional[dict] = None) -> "GalleryIndex":
        """Index ``feats (N, D)`` (L2-normalised here).

        ``use_faiss``: ``None`` = use faiss when importable; ``True`` = require
        it; ``False`` = exact search only.  ``nlist`` (ivf) defaults to
        ``min(round(sqrt(N)), N // 39)`` (at least 1); ``nprobe`` defaults to
        ``max(1, nlist // 8)``.
        """
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type: expected one of {INDEX_TYPES}, got {index_type!r}")
        f = np.asarray(feats)
        if f.ndim != 2 or f.shape[0] < 1 or f.dtype.kind != "f":
            raise ValueError(f"feats: expected a non-empty float (N, D) array, got shape {f.shape} dtype {f.dtype}")
        n = f.shape[0]
        f = _l2n(f)

        def ids(a, name):
            if a is None:
                return np.full(n, -1, dtype=np.int64)
            a = np.asarray(a)
            if a.shape != (n,):
                raise ValueError(f"{name}: expected shape ({n},) (one per feats row), got {a.shape}")
            return a.astype(np.int64)

        pids, camids = ids(pids, "pids"), ids(camids, "camids")
        if first_frame is not None:
            first_frame = np.asarray(first_frame).astype(str)
            if first_frame.shape != (n,):
                raise ValueError(f"first_frame: expected shape ({n},), got {first_frame.shape}")
        if index_type == "ivf":
            if nlist is None:  # ~sqrt(N) cells, and >= 39 points per cell as faiss's k-means wants
                nlist = int(max(1, min(round(np.sqrt(n)), n // 39)))
            if not (isinstance(nlist, (int, np.integer)) and 1 <= nlist <= n):
                raise ValueError(f"nlist: expected an int in [1, {n}] (number of gallery entries), got {nlist!r}")
            if nprobe is None:
                nprobe = max(1, int(nlist) // 8)
            if not (isinstance(nprobe, (int, np.integer)) and 1 <= nprobe <= nlist):
                raise ValueError(f"nprobe: expected an int in [1, {nlist}], got {nprobe!r}")
        meta = {"format": _FORMAT, "version": 1, "type": index_type,
                "nlist": int(nlist) if index_type == "ivf" else None,
                "nprobe": int(nprobe) if index_type == "ivf" else None,
                "dim": int(f.shape[1]), "size": int(n), "score": "inner_product (cosine)"}
        meta.update(extra_meta or {})
        if use_faiss is None:
            use_faiss = faiss_available()
        elif use_faiss and not faiss_available():
            raise ValueError("use_faiss: faiss is not importable (pip install faiss-cpu)")
        index = cls(f, pids, camids, first_frame, meta)
        if use_faiss:
            index.faiss_index = index._build_faiss()
        elif index_type == "ivf":
            warnings.warn("faiss not available: the ivf index falls back to exact search", stacklevel=2)
        return index

    def _build_faiss(self):
        import faiss

        d = self.dim
        if self.meta["type"] == "flat":
            idx = faiss.IndexFlatIP(d)
        else:
            quantizer = faiss.IndexFlatIP(d)
            idx = faiss.IndexIVFFlat(quantizer, d, int(self.meta["nlist"]), faiss.METRIC_INNER_PRODUCT)
            idx.train(self.feats)
            idx.nprobe = int(self.meta["nprobe"])
        idx.add(self.feats)
        return idx

    # -- persistence ---------------------------------------------------------
    def save(self, path: str) -> str:
        """Write the index to exactly ``path`` (npz format, any extension)."""
        arrays = {"feats": self.feats, "pids": self.pids, "camids": self.camids,
                  "meta": np.array(json.dumps(self.meta))}
        if self.first_frame is not None:
            arrays["first_frame"] = self.first_frame
        if self.faiss_index is not None:
            import faiss

            arrays["faiss_index"] = np.asarray(faiss.serialize_index(self.faiss_index), dtype=np.uint8)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        if os.path.isdir(path):
            raise ValueError(f"path: {path} is a directory; expected an index file name")
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(buf.getvalue())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str, use_faiss: Optional[bool] = None) -> "GalleryIndex":
        """Load an index file; ``use_faiss`` as in :meth:`build` (``None``: when importable)."""
        if not os.path.isfile(path):
            raise ValueError(f"index: file not found: {path}")
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
            feats, pids, camids = z["feats"], z["pids"], z["camids"]
        except Exception as exc:
            raise ValueError(f"index: {path} is not a personvlad index file ({exc})") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"index: {path} is not a personvlad index file (meta.format={meta.get('format')!r})")
        first = z["first_frame"] if "first_frame" in z.files else None
        index = cls(np.ascontiguousarray(feats, dtype=np.float32), pids, camids, first, meta)
        if use_faiss is None:
            use_faiss = faiss_available()
        elif use_faiss and not faiss_available():
            raise ValueError("use_faiss: faiss is not importable (pip install faiss-cpu)")
        if use_faiss:
            if "faiss_index" in z.files:
                import faiss

                index.faiss_index = faiss.deserialize_index(np.ascontiguousarray(z["faiss_index"]))
                if meta["type"] == "ivf":
                    index.faiss_index.nprobe = int(meta["nprobe"])
            else:
                index.faiss_index = index._build_faiss()
        return index

    # -- search --------------------------------------------------------------
    def search(self, queries, topk: int = 10, nprobe: Optional[int] = None, exact: bool = False
               ) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``topk`` gallery entries for each query (descending score).

        ``queries``: ``(M, D)`` or ``(D,)`` (L2-normalised here).  Returns
        ``(scores (M, k), indices (M, k))``, ``k = min(topk, len(self))``.
        ``exact=True`` forces the exact numpy search even with faiss.
        """
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries: expected shape (M, {self.dim}) or ({self.dim},), got {np.shape(queries)}")
        check_positive_int("topk", topk)
        if nprobe is not None:
            check_positive_int("nprobe", nprobe, " (IVF lists to visit)")
        q = _l2n(q)
        k = min(int(topk), len(self))
        if self.faiss_index is None or exact:
            return exact_search(self.feats, q, k)
        if nprobe is None or self.meta["type"] != "ivf":
            scores, idx = self.faiss_index.search(q, k)
        else:  # this call only: the index keeps its own nprobe for later searches
            saved = self.faiss_index.nprobe
            self.faiss_index.nprobe = int(nprobe)
            try:
                scores, idx = self.faiss_index.search(q, k)
            finally:
                self.faiss_index.nprobe = saved
        return scores.astype(np.float32), idx.astype(np.int64)


def build_index_from_features(features_path: str, split: str = "gallery", index_type: str = "flat",
                              nlist: Optional[int] = None, nprobe: Optional[int] = None,
                              use_faiss: Optional[bool] = None) -> GalleryIndex:
    """Index the ``{split}_feats`` of a feature file (with its pids/camids/first_frame)."""
    from .modes import FeatureFile

    ff = FeatureFile(features_path)
    ff.require(f"{split}_feats", "the split to index")
    first = ff[f"{split}_first_frame"] if f"{split}_first_frame" in ff else None
    pids = ff[f"{split}_pids"] if f"{split}_pids" in ff else None
    camids = ff[f"{split}_camids"] if f"{split}_camids" in ff else None
    extra = {"source": os.path.abspath(features_path), "split": split}
    # how the gallery was described, so that a query given as frames is
    # described the same way (personvlad search --query)
    if "meta" in ff:
        try:
            fmeta = json.loads(str(ff["meta"]))
        except ValueError:
            fmeta = {}
        for key in ("clip_len", "stride"):
            if isinstance(fmeta, dict) and isinstance(fmeta.get(key), int) and fmeta[key] >= 1:
                extra[key] = fmeta[key]
    return GalleryIndex.build(ff[f"{split}_feats"], pids, camids, first, index_type=index_type, nlist=nlist,
                              nprobe=nprobe, use_faiss=use_faiss, extra_meta=extra)


_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def _natural_key(s: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def list_frames(query: Sequence[str]) -> list:
    """Frame paths of a query given as a tracklet directory or a list of frame files.

    A directory's images are sorted numerically (``f2.jpg`` before ``f10.jpg``).
    """
    paths = [str(p) for p in query]
    if len(paths) == 1 and os.path.isdir(paths[0]):
        d = paths[0]
        frames = sorted((os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith(_IMAGE_EXTS)),
                        key=lambda p: _natural_key(os.path.basename(p)))
        if not frames:
            raise ValueError(f"query: directory {d} has no image files ({', '.join(_IMAGE_EXTS)})")
        return frames
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"query: frame file not found: {p}")
    return paths


def describe_query_frames(checkpoint: str, frame_paths: Sequence[str], clip_len: Optional[int] = None,
                          stride: int = 8) -> np.ndarray:
    """Descriptor of a tracklet's frames via ``personvlad.engine.extract.describe_frames``
    (``clip_len`` None: the model's)."""
    try:
        from personvlad.engine.extract import describe_frames
    except ImportError as exc:
        raise RuntimeError("searching from frames needs personvlad.engine.extract.describe_frames "
                           f"(not available: {exc}); use --query-features instead") from None
    desc = describe_frames(checkpoint, list(frame_paths), clip_len=clip_len, stride=stride)
    if hasattr(desc, "detach"):
        desc = desc.detach().cpu().numpy()
    desc = np.asarray(desc, dtype=np.float32)
    if desc.ndim == 2 and desc.shape[0] == 1:
        desc = desc[0]
    if desc.ndim != 1:
        raise ValueError(f"describe_frames returned shape {desc.shape}; expected (D,) or (1, D)")
    return desc
