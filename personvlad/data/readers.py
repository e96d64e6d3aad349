"""Readers for the official on-disk layouts of MARS, iLIDS-VID and PRID-2011 (SPEC §5).

Every reader exposes ``train``, ``query`` and ``gallery``: lists of
``(frame_paths: tuple[str, ...], pid: int, camid: int)`` with frames in
numeric order, train ids relabelled ``0..num_train_pids-1``, query/gallery ids
as the dataset has them and 0-based camera ids.  A missing or malformed file
raises ``FileNotFoundError`` / ``ValueError`` naming the path and what was
expected; an empty tracklet is dropped with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

Tracklet = Tuple[Tuple[str, ...], int, int]

_NUM_RE = re.compile(r"(\d+)")
_ILIDS_PERSON_RE = re.compile(r"person\d+")
_PRID_PERSON_RE = re.compile(r"person_(\d+)")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def natural_key(name: str):
    """Sort key comparing the integers in ``name`` numerically: ``f2.png < f10.png``."""
    parts = _NUM_RE.split(os.path.basename(name))
    return tuple((0, int(p), "") if i % 2 else (1, 0, p.lower()) for i, p in enumerate(parts) if p != "")


def natural_sorted(names):
    return sorted(names, key=lambda n: (natural_key(n), n))


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: expected a directory ({what}), not found")


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: expected a file ({what}), not found")


def load_mat_array(path: str, key: str, what: str) -> np.ndarray:
    """``scipy.io.loadmat(path)[key]`` as a numeric array, with clear errors."""
    from scipy.io import loadmat

    _require_file(path, what)
    try:
        mat = loadmat(path)
    except Exception as e:  # scipy raises several types for a bad file
        raise ValueError(f"{path}: expected a MATLAB .mat file with key {key!r} ({what}); could not read it: {e}") from e
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: expected key {key!r} ({what}); found keys {keys}")
    arr = np.asarray(mat[key])
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{path}: key {key!r} must be a numeric array ({what}); got dtype {arr.dtype}")
    return arr


def _as_int(arr: np.ndarray, path: str, what: str) -> np.ndarray:
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{path}: expected integer values ({what}); found non-integral numbers")
    return arr.astype(np.int64)


def _read_lines(path: str, what: str) -> List[str]:
    _require_file(path, what)
    try:
        with open(path, "r", encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: expected UTF-8 text ({what}): {e}") from e


def _person_dirs(cam_dir: str, pattern: "re.Pattern", dataset: str, expected: str) -> List[str]:
    """The sub-directories of ``cam_dir`` whose names fullmatch ``pattern``,
    sorted numerically.  Any other directory (".ipynb_checkpoints",
    "backup", "person001_old") is left out with a warning: it would shift
    the split files' indices, or stand in for a person."""
    subdirs = [d for d in os.listdir(cam_dir) if os.path.isdir(os.path.join(cam_dir, d))]
    other = sorted(d for d in subdirs if not pattern.fullmatch(d))
    if other:
        log.warning("%s: %s: ignoring %d directorie(s) not named %s: %s", dataset, cam_dir, len(other), expected,
                    other[:5])
    return natural_sorted([d for d in subdirs if pattern.fullmatch(d)])


def list_images(directory: str) -> List[str]:
    """Image files in ``directory`` in numeric order (never raw glob order)."""
    names = [n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTS)]
    return [os.path.join(directory, n) for n in natural_sorted(names)]


def relabel(tracklets: Sequence[Tracklet]) -> Tuple[List[Tracklet], Dict[int, int]]:
    """Relabel pids to ``0..n-1`` in increasing order of the original id."""
    pids = sorted({t[1] for t in tracklets})
    mapping = {p: i for i, p in enumerate(pids)}
    return [(t[0], mapping[t[1]], t[2]) for t in tracklets], mapping


class VideoDataset:
    """Base: ``train``, ``query``, ``gallery`` and a few counts."""

    name = "video"

    def __init__(self, train: List[Tracklet], query: List[Tracklet], gallery: List[Tracklet]):
        self.train = train
        self.query = query
        self.gallery = gallery
        self.num_train_pids = len({t[1] for t in train})
        self.num_train_cams = len({t[2] for t in train})

    def summary(self) -> str:
        rows = []
        for split in ("train", "query", "gallery"):
            ts = getattr(self, split)
            nfr = sum(len(t[0]) for t in ts)
            rows.append(f"  {split:8s} ids {len({t[1] for t in ts}):5d}  tracklets {len(ts):6d}  frames {nfr:8d}")
        return f"{self.name}:\n" + "\n".join(rows)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train={len(self.train)}, query={len(self.query)}, "
                f"gallery={len(self.gallery)}, num_train_pids={self.num_train_pids})")


def _drop_empty(tracklets: List[Tracklet], where: str) -> List[Tracklet]:
    out = [t for t in tracklets if len(t[0]) > 0]
    if len(out) != len(tracklets):
        log.warning("%s: dropped %d empty tracklet(s)", where, len(tracklets) - len(out))
    return out


# ----------------------------------------------------------------------------- MARS


class MARS(VideoDataset):
    """MARS (Zheng et al., ECCV 2016), official layout::

        root/bbox_train/<pid4>/<name>.jpg   root/bbox_test/<pid4>/<name>.jpg
        root/info/train_name.txt            root/info/test_name.txt
        root/info/tracks_train_info.mat  (key track_train_info, rows [start, end, pid, camid])
        root/info/tracks_test_info.mat   (key track_test_info)
        root/info/query_IDX.mat          (key query_IDX, 1-based rows of track_test_info)

    ``start``/``end`` are 1-based inclusive indices into the name list; camid
    in the .mat is 1-based (made 0-based here).  Query = test tracks at
    ``query_IDX`` (in its order), gallery = the other test tracks, as the
    Python ports build them; ``kit_gallery=True``: every test track, the
    queries included, as the MATLAB kit (``test_mars.m``) ranks them -- a
    query's own track is same id and camera, junk under both protocols.
    Junk (-1) and distractor (0) ids are kept.  Frame names look like
    ``0001C1T0001F001.jpg``.  ``check_frames=True`` also stats every frame
    file (slow on MARS itself).
    """

    name = "mars"

    def __init__(self, root: str, check_frames: bool = False, kit_gallery: bool = False):
        self.root = root = os.fspath(root)
        _require_dir(root, "MARS root with bbox_train/, bbox_test/, info/")
        info = os.path.join(root, "info")
        _require_dir(info, "MARS info/ directory with train_name.txt, test_name.txt and the .mat files")
        for d in ("bbox_train", "bbox_test"):
            _require_dir(os.path.join(root, d), f"MARS frame directory {d}/<pid>/")
        train_names = _read_lines(os.path.join(info, "train_name.txt"), "one MARS frame name per line")
        test_names = _read_lines(os.path.join(info, "test_name.txt"), "one MARS frame name per line")
        p = os.path.join(info, "tracks_train_info.mat")
        tr_info = self._tracks(p, "track_train_info")
        p = os.path.join(info, "tracks_test_info.mat")
        te_info = self._tracks(p, "track_test_info")
        qpath = os.path.join(info, "query_IDX.mat")
        q = _as_int(load_mat_array(qpath, "query_IDX", "1-based indices of query rows in track_test_info").ravel(),
                    qpath, "query_IDX")
        if q.size == 0 or q.min() < 1 or q.max() > len(te_info):
            raise ValueError(f"{qpath}: query_IDX must be 1-based indices in [1, {len(te_info)}]; "
                             f"got range [{q.min() if q.size else None}, {q.max() if q.size else None}]")
        if len(np.unique(q)) != len(q):
            raise ValueError(f"{qpath}: query_IDX has duplicate indices")

        train = self._process(train_names, tr_info, "bbox_train", os.path.join(info, "tracks_train_info.mat"))
        test = self._process(test_names, te_info, "bbox_test", os.path.join(info, "tracks_test_info.mat"))
        qset = set((q - 1).tolist())
        # the queries in query_IDX's order (track_test_info[query_IDX], as the
        # benchmark's own code indexes them); the gallery in test-track order
        query = [test[i] for i in (q - 1).tolist() if test[i] is not None]
        gallery = [t for i, t in enumerate(test) if (kit_gallery or i not in qset) and t is not None]
        train = [t for t in train if t is not None]
        n_empty = sum(t is None for t in test)
        if n_empty:
            log.warning("MARS test: dropped %d empty tracklet(s)", n_empty)
        train, self.train_pid_map = relabel(_drop_empty(train, "MARS train"))
        if check_frames:
            for ts in (train, query, gallery):
                for paths, _, _ in ts:
                    for fp in paths:
                        _require_file(fp, "MARS frame listed in info/*_name.txt")
        super().__init__(train, query, gallery)

    @staticmethod
    def _tracks(path: str, key: str) -> np.ndarray:
        arr = load_mat_array(path, key, "rows [start, end, pid, camid]")
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ValueError(f"{path}: key {key!r} must have shape (n, 4) [start, end, pid, camid]; got {arr.shape}")
        return _as_int(arr, path, key)

    def _process(self, names: List[str], info: np.ndarray, home: str, info_path: str):
        out = []
        n = len(names)
        for row, (start, end, pid, camid) in enumerate(info.tolist()):
            if end == start - 1:  # an empty tracklet
                out.append(None)
                continue
            if not (1 <= start <= end <= n):
                raise ValueError(f"{info_path}: row {row}: expected 1 <= start <= end <= {n} (number of names); "
                                 f"got start={start}, end={end}")
            if camid < 1:
                raise ValueError(f"{info_path}: row {row}: expected a 1-based camera id >= 1; got {camid}")
            tnames = natural_sorted(names[start - 1:end])
            for nm in tnames:
                if len(nm) < 6 or not nm.lower().endswith(IMAGE_EXTS):
                    raise ValueError(f"{info_path}: row {row}: frame name {nm!r} is not a MARS image name "
                                     "like 0001C1T0001F001.jpg")
                if nm[4] == "C" and nm[5].isdigit():  # MARS names carry pid and camera: check them
                    try:
                        npid = -1 if nm[:4] == "00-1" else int(nm[:4])  # junk frames live in 00-1/
                    except ValueError:
                        npid = None
                    if npid != pid or int(nm[5]) != camid:
                        raise ValueError(f"{info_path}: row {row}: expected frames of pid {pid}, camera {camid} "
                                         f"(1-based) between names {start} and {end}; got {nm!r}")
            paths = tuple(os.path.join(self.root, home, nm[:4], nm) for nm in tnames)
            out.append((paths, int(pid), int(camid) - 1))
        return out


# ----------------------------------------------------------------------------- iLIDS-VID


class ILIDSVID(VideoDataset):
    """iLIDS-VID (Wang et al., ECCV 2014), official layout::

        root/i-LIDS-VID/sequences/cam1/personNNN/*.png   (and cam2)
        root/train-test people splits/train_test_splits_ilidsvid.mat   (key ls_set)

    ``ls_set`` is (10, 300): one row per split, a permutation of 1-based
    indices into the sorted person-directory list.  Convention (the one of
    deep-person-reid and the code following Wang et al. ECCV'14): the FIRST
    half of a row are the TEST persons, the second half the TRAIN persons;
    ``train_first=True`` swaps that.  Query = cam1 tracklets of the test
    persons, gallery = their cam2 tracklets (camid 0 / 1).  Query/gallery
    pids are the numbers in the directory names (personNNN -> NNN).
    """

    name = "ilidsvid"
    SPLIT_REL = os.path.join("train-test people splits", "train_test_splits_ilidsvid.mat")

    def __init__(self, root: str, split_id: int = 0, train_first: bool = False):
        self.root = root = os.fspath(root)
        _require_dir(root, "iLIDS-VID root with i-LIDS-VID/sequences and 'train-test people splits'")
        seq = os.path.join(root, "i-LIDS-VID", "sequences")
        cams = [os.path.join(seq, "cam1"), os.path.join(seq, "cam2")]
        for c in cams:
            _require_dir(c, "iLIDS-VID camera directory with personNNN/ sub-directories")
        split_path = os.path.join(root, self.SPLIT_REL)
        ls = _as_int(load_mat_array(split_path, "ls_set", "(num_splits, num_persons) 1-based person indices"),
                     split_path, "ls_set")
        if ls.ndim != 2 or ls.shape[1] < 2 or ls.shape[1] % 2:
            raise ValueError(f"{split_path}: ls_set must be 2-D (num_splits, even number of persons); got {ls.shape}")
        if not 0 <= split_id < ls.shape[0]:
            raise ValueError(f"split_id: expected 0 <= split_id < {ls.shape[0]} (splits in {split_path}); got {split_id}")
        # ls_set indexes the sorted personNNN directories: anything else there
        # (".ipynb_checkpoints", "backup") would shift every index, so it is
        # left out, and said
        persons = [_person_dirs(c, _ILIDS_PERSON_RE, "iLIDS-VID", "personNNN") for c in cams]
        if persons[0] != persons[1]:
            only = sorted(set(persons[0]) ^ set(persons[1]))[:5]
            raise ValueError(f"{seq}: expected the same person directories in cam1 and cam2; differing: {only}")
        persons = persons[0]
        row = ls[split_id]
        if row.min() < 1 or row.max() > len(persons):
            raise ValueError(f"{split_path}: ls_set values must be 1-based indices in [1, {len(persons)}] "
                             f"(person directories found); got range [{row.min()}, {row.max()}]")
        vals, counts = np.unique(row, return_counts=True)
        if (counts > 1).any():  # a person in both halves, or twice in one
            raise ValueError(f"{split_path}: ls_set row {split_id} must list each person once (a permutation of "
                             f"person indices); repeated: {vals[counts > 1][:5].tolist()}")
        half = ls.shape[1] // 2
        first, second = sorted((row[:half] - 1).tolist()), sorted((row[half:] - 1).tolist())
        train_idx, test_idx = (first, second) if train_first else (second, first)
        self.split_id = split_id

        def pid_of(d):
            m = _NUM_RE.findall(d)
            if not m:
                raise ValueError(f"{seq}: person directory {d!r} has no number (expected personNNN)")
            return int(m[-1])

        def tracks(idx, cam_ids):
            out = []
            for i in idx:
                d = persons[i]
                for cid in cam_ids:
                    out.append((tuple(list_images(os.path.join(cams[cid], d))), pid_of(d), cid))
            return out

        train = _drop_empty(tracks(train_idx, (0, 1)), "iLIDS-VID train")
        query = _drop_empty(tracks(test_idx, (0,)), "iLIDS-VID query")
        gallery = _drop_empty(tracks(test_idx, (1,)), "iLIDS-VID gallery")
        train, self.train_pid_map = relabel(train)
        super().__init__(train, query, gallery)


# ----------------------------------------------------------------------------- PRID-2011


class PRID2011(VideoDataset):
    """PRID-2011 (Hirzer et al., SCIA 2011), official layout::

        root/prid_2011/multi_shot/cam_a/person_NNNN/*.png   (and cam_b)
        root/splits_prid2011.json

    ``splits_prid2011.json`` is a JSON list of ``{"train": [...], "test": [...]}``
    dicts (one per split, 10 in the standard file).  Entries are person
    directory names (``"person_0001"``, as in the file deep-person-reid uses)
    or person numbers (``1`` for ``person_0001``).  Only persons appearing in
    both cameras are usable: the first ``num_shared=200`` (person_0001 ..
    person_0200); a split naming another person is an error.  Query = cam_a,
    gallery = cam_b.

    The split file decides who is used, as in torchreid and fast-reid (no
    length filter): the standard file already holds the 178 persons the
    literature keeps (89 train / 89 test per split), which is what a ">= 27
    frames in both cameras" filter over persons 1-200 gives.  ``min_frames``
    adds such a filter for other split files: a person with a tracklet of
    fewer frames in either camera is dropped (logged once).  The default, 1,
    drops nobody who has frames; an empty tracklet is always dropped, with a
    warning.
    """

    name = "prid"

    def __init__(self, root: str, split_id: int = 0, min_frames: int = 1, num_shared: int = 200):
        self.root = root = os.fspath(root)
        if min_frames < 1:
            raise ValueError(f"min_frames: expected >= 1; got {min_frames}")
        _require_dir(root, "PRID-2011 root with prid_2011/multi_shot and splits_prid2011.json")
        ms = os.path.join(root, "prid_2011", "multi_shot")
        cams = [os.path.join(ms, "cam_a"), os.path.join(ms, "cam_b")]
        for c in cams:
            _require_dir(c, "PRID-2011 camera directory with person_NNNN/ sub-directories")
        split_path = os.path.join(root, "splits_prid2011.json")
        _require_file(split_path, 'JSON list of {"train": [...], "test": [...]} splits')
        try:
            with open(split_path, "r", encoding="utf-8") as f:
                splits = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{split_path}: expected JSON (a list of {{'train': [...], 'test': [...]}}): {e}") from e
        if not isinstance(splits, list) or not splits or not all(
                isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("test"), list)
                for s in splits):
            raise ValueError(f"{split_path}: expected a non-empty JSON list of {{'train': [...], 'test': [...]}} dicts")
        if not 0 <= split_id < len(splits):
            raise ValueError(f"split_id: expected 0 <= split_id < {len(splits)} (splits in {split_path}); got {split_id}")
        self.split_id = split_id
        self.min_frames = min_frames

        def norm(e):
            if isinstance(e, bool):
                raise ValueError(f"{split_path}: split entry {e!r} is not a person name or number")
            if isinstance(e, (int, float)) and int(e) == e:
                num = int(e)
            elif isinstance(e, str) and _NUM_RE.search(e):
                num = int(_NUM_RE.findall(e)[-1])
            else:
                raise ValueError(f"{split_path}: split entry {e!r} is not a person name (person_NNNN) or number")
            if not 1 <= num <= num_shared:
                raise ValueError(f"{split_path}: person {e!r} is outside the {num_shared} persons seen by both "
                                 f"cameras (expected 1..{num_shared})")
            return num

        split = splits[split_id]
        train_nums = sorted({norm(e) for e in split["train"]})
        test_nums = sorted({norm(e) for e in split["test"]})
        if set(train_nums) & set(test_nums):
            raise ValueError(f"{split_path}: split {split_id} has persons in both train and test: "
                             f"{sorted(set(train_nums) & set(test_nums))[:5]}")
        # person_NNNN directories only: a stray "copy_of_person_0003" or
        # "person_0002_old" must not stand in for a person (which of two
        # directories won depended on os.listdir's order)
        dirs = []
        for c in cams:
            found: Dict[int, str] = {}
            for d in _person_dirs(c, _PRID_PERSON_RE, "PRID-2011", "person_NNNN"):
                num = int(_PRID_PERSON_RE.fullmatch(d).group(1))
                if num in found:
                    raise ValueError(f"{c}: two directories for person {num}: {found[num]!r} and {d!r}")
                found[num] = d
            dirs.append(found)

        short: List[str] = []

        def tracks(nums):
            out = []
            for num in nums:
                per = []
                for cid in (0, 1):
                    if num not in dirs[cid]:
                        raise FileNotFoundError(f"{cams[cid]}/person_{num:04d}: expected the directory of person "
                                                f"{num} named in {split_path}")
                    frames = tuple(list_images(os.path.join(cams[cid], dirs[cid][num])))
                    per.append((frames, num, cid))
                if any(len(p[0]) == 0 for p in per):
                    log.warning("PRID-2011: person %d has an empty tracklet; dropped", num)
                    continue
                if any(len(p[0]) < min_frames for p in per):
                    short.append(num)
                    continue
                out.extend(per)
            return out

        train = tracks(train_nums)
        test = tracks(test_nums)
        if short:
            log.info("PRID-2011: %d person(s) with a tracklet shorter than min_frames=%d dropped",
                     len(short), min_frames)
        train, self.train_pid_map = relabel(train)
        query = [t for t in test if t[2] == 0]
        gallery = [t for t in test if t[2] == 1]
        super().__init__(train, query, gallery)


DATASETS = {"mars": MARS, "ilidsvid": ILIDSVID, "prid": PRID2011}


def build_dataset(name: str, root: str, split_id: int = 0, **kwargs) -> VideoDataset:
    """``name`` in {"mars", "ilidsvid", "prid"} (aliases: "ilids", "ilids-vid", "prid2011", "prid-2011")."""
    key = str(name).lower().replace("_", "").replace("-", "")
    key = {"ilids": "ilidsvid", "prid2011": "prid"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"name: expected one of {sorted(DATASETS)}; got {name!r}")
    if key == "mars":
        if split_id != 0:
            raise ValueError(f"split_id: MARS has a single split (0); got {split_id}")
        return MARS(root, **kwargs)
    return DATASETS[key](root, split_id=split_id, **kwargs)
