"""Frame decoding and clip assembly with bad-frame tolerance.

``read_clip`` decodes the frames of one clip, resizes them to ``(H, W)`` and
returns a uint8 tensor ``(3, T, H, W)``.  A missing, truncated or corrupt
frame never raises: it is counted in a :class:`FrameStats` and replaced by the
nearest good frame of the tracklet (by index distance; earlier wins ties).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger("personvlad.data")

# Columns of FrameStats.counts
_READ, _BAD, _DEAD = 0, 1, 2
MAX_WORKER_SLOTS = 256


def parse_size(size) -> Tuple[int, int]:
    """``(H, W)`` from a pair or a ``"HxW"`` string, validated."""
    if isinstance(size, str):
        parts = size.lower().replace("*", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size: expected 'HxW' such as '64x32'; got {size!r}")
        size = (int(parts[0]), int(parts[1]))
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size: expected (H, W) or 'HxW'; got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size: expected positive (H, W); got {(h, w)}")
    return h, w


class FrameStats:
    """Counts of frames read and frames skipped, safe across DataLoader workers.

    The counts live in a shared-memory tensor with one row per process (row 0
    for the main process, row 1+i for worker i), so workers never race and the
    main process sees the totals.
    """

    def __init__(self, shared: bool = True):
        self.counts = torch.zeros(MAX_WORKER_SLOTS + 1, 3, dtype=torch.int64)
        if shared:  # visible to DataLoader worker processes
            self.counts.share_memory_()
        self._logged = torch.zeros(3, dtype=torch.int64)
        self.examples: Dict[str, str] = {}  # filled in the process that saw them

    def _row(self) -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + (info.id % MAX_WORKER_SLOTS)

    def __getstate__(self):
        st = dict(self.__dict__)
        st.pop("_np", None)
        return st

    def add(self, read: int = 0, bad: int = 0, dead: int = 0) -> None:
        np_counts = self.__dict__.get("_np")
        if np_counts is None:  # a numpy view of the shared tensor: cheap increments
            np_counts = self._np = self.counts.numpy()
        r = self._row()
        np_counts[r, _READ] += read
        np_counts[r, _BAD] += bad
        np_counts[r, _DEAD] += dead

    def note_bad(self, path: str, why: str) -> None:
        if len(self.examples) < 8 and path not in self.examples:
            self.examples[path] = why
            log.debug("unreadable frame %s: %s", path, why)

    def totals(self) -> Dict[str, int]:
        t = self.counts.sum(0)
        return {"frames": int(t[_READ]), "bad_frames": int(t[_BAD]), "unreadable_clips": int(t[_DEAD])}

    @property
    def bad_frames(self) -> int:
        return int(self.counts[:, _BAD].sum())

    def reset(self) -> None:
        self.counts.zero_()
        self._logged.zero_()

    def log_summary(self, epoch=None, logger: Optional[logging.Logger] = None) -> Optional[str]:
        """Log ONE warning line about the bad frames seen since the last call
        (nothing when there were none).  Returns the line."""
        t = self.counts.sum(0)
        d = t - self._logged
        self._logged = t.clone()
        if int(d[_BAD]) == 0 and int(d[_DEAD]) == 0:
            return None
        where = f"epoch {epoch}: " if epoch is not None else ""
        ex = f"; e.g. {next(iter(self.examples))}" if self.examples else ""
        line = (f"{where}{int(d[_BAD])} of {int(d[_READ])} frames unreadable (missing/corrupt/truncated), "
                f"each replaced by the nearest good frame; {int(d[_DEAD])} clip(s) had no good frame "
                f"(filled with zeros){ex}")
        (logger or log).warning(line)
        return line


def decode_frame(path: str, size: Tuple[int, int]) -> np.ndarray:
    """Decode one image to uint8 RGB ``(H, W, 3)`` resized to ``size`` (bilinear).

    JPEGs use libjpeg's DCT-domain downscaling (``draft``) when the target is at
    most half the stored size.  Raises on a missing/corrupt/truncated file.
    """
    from PIL import Image

    h, w = size
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (w, h))
        im = im.convert("RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError)


def _try_decode(path: str, size, stats: Optional[FrameStats]):
    try:
        return decode_frame(path, size)
    except _DECODE_ERRORS as e:  # PIL.UnidentifiedImageError is an OSError
        if stats is not None:
            stats.note_bad(path, f"{type(e).__name__}: {e}")
        return None


def read_frames(frame_paths: Sequence[str], indices: Sequence[int], size, stats: Optional[FrameStats] = None
                ) -> np.ndarray:
    """Decoded frames ``(T, H, W, 3)`` uint8 for ``indices`` into ``frame_paths``.

    Bad frames are replaced by the nearest good frame of the tracklet and
    counted; if the tracklet has no good frame at all the clip is zeros.
    """
    h, w = parse_size(size)
    n = len(frame_paths)
    out = np.zeros((len(indices), h, w, 3), dtype=np.uint8)
    if n == 0:
        if stats is not None:
            stats.add(dead=1)
        return out
    cache: Dict[int, Optional[np.ndarray]] = {}

    def get(i):
        if i not in cache:
            cache[i] = _try_decode(frame_paths[i], (h, w), stats)
        return cache[i]

    bad = 0
    dead = False
    for j, i in enumerate(indices):
        i = int(i)
        if not 0 <= i < n:
            raise ValueError(f"indices: expected frame indices in [0, {n}); got {i}")
        img = get(i)
        if img is None:
            bad += 1
            for dist in range(1, n):
                for k in (i - dist, i + dist):
                    if 0 <= k < n:
                        img = get(k)
                        if img is not None:
                            break
                if img is not None:
                    break
            if img is None:
                dead = True
                continue
        out[j] = img
    if stats is not None:
        stats.add(read=len(indices), bad=bad, dead=int(dead))
    return out


def read_clip(frame_paths: Sequence[str], indices: Sequence[int], size=(64, 32), flip: bool = False,
              stats: Optional[FrameStats] = None) -> torch.Tensor:
    """uint8 clip ``(3, T, H, W)`` of ``frame_paths[indices]`` resized to ``size``,
    horizontally flipped when ``flip``."""
    arr = read_frames(frame_paths, indices, size, stats)
    if flip:
        arr = arr[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(3, 0, 1, 2)))
