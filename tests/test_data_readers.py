"""Readers for the official layouts of MARS, iLIDS-VID and PRID-2011 on small generated trees."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from personvlad.data import ILIDSVID, MARS, PRID2011, build_dataset, natural_sorted


def _img(path, value=0, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 4, 3), value % 256, np.uint8)).save(path, format=fmt)


def _frame_numbers(paths):
    """The frame number encoded as the last integer of each file name."""
    import re
    return [int(re.findall(r"\d+", os.path.basename(p))[-1]) for p in paths]


# ----------------------------------------------------------------------------- MARS


def _mars_tree(root, lexical_names=False):
    """bbox_train: pid 3 (cams 1, 2), pid 7 (cam 1); bbox_test: pid -1, 0, 5 (cams 1, 2), 9 (cams 1, 3)."""
    def names(pid, cam, trk, n):
        ps = "00-1" if pid == -1 else f"{pid:04d}"
        fr = [f"F{f}" if lexical_names else f"F{f:03d}" for f in range(1, n + 1)]
        if lexical_names:
            fr = sorted(fr)  # F1, F10, F11, F12, F2, ... : the listing is lexical, not numeric
        return [f"{ps}C{cam}T{trk:04d}{x}.jpg" for x in fr]

    def write(home, tracks, txt, mat, key):
        all_names, rows = [], []
        for pid, cam, trk, n in tracks:
            nm = names(pid, cam, trk, n)
            rows.append([len(all_names) + 1, len(all_names) + n, pid, cam])
            all_names += nm
            for x in nm:
                _img(os.path.join(root, home, x[:4], x), value=len(all_names))
        os.makedirs(os.path.join(root, "info"), exist_ok=True)
        with open(os.path.join(root, "info", txt), "w") as f:
            f.write("\n".join(all_names) + "\n")
        savemat(os.path.join(root, "info", mat), {key: np.asarray(rows, dtype=np.float64)})

    write("bbox_train", [(3, 1, 1, 12), (3, 2, 1, 5), (7, 1, 1, 6), (7, 1, 2, 4)],
          "train_name.txt", "tracks_train_info.mat", "track_train_info")
    test = [(-1, 1, 1, 3), (0, 2, 1, 4), (5, 1, 1, 12), (5, 2, 1, 5), (9, 1, 1, 5), (9, 3, 1, 7), (9, 3, 2, 2)]
    write("bbox_test", test, "test_name.txt", "tracks_test_info.mat", "track_test_info")
    savemat(os.path.join(root, "info", "query_IDX.mat"), {"query_IDX": np.asarray([[3.0, 5.0]])})
    return root


def test_mars_reader(tmp_path):
    d = MARS(_mars_tree(str(tmp_path)))
    assert d.num_train_pids == 2
    assert sorted({t[1] for t in d.train}) == [0, 1]  # 3 -> 0, 7 -> 1
    assert [(len(p), pid, cam) for p, pid, cam in d.train] == [(12, 0, 0), (5, 0, 1), (6, 1, 0), (4, 1, 0)]
    assert [(len(p), pid, cam) for p, pid, cam in d.query] == [(12, 5, 0), (5, 9, 0)]
    assert [(pid, cam) for _, pid, cam in d.gallery] == [(-1, 0), (0, 1), (5, 1), (9, 2), (9, 2)]
    p0 = d.train[0][0][0]
    assert p0 == os.path.join(str(tmp_path), "bbox_train", "0003", "0003C1T0001F001.jpg")
    assert all(os.path.isfile(p) for t in d.train + d.query + d.gallery for p in t[0])
    assert isinstance(d.train[0][0], tuple)
    assert _frame_numbers(d.query[0][0]) == list(range(1, 13))


def test_mars_numeric_frame_order(tmp_path):
    d = MARS(_mars_tree(str(tmp_path), lexical_names=True), check_frames=True)
    for paths, _, _ in d.train + d.query + d.gallery:
        assert _frame_numbers(paths) == list(range(1, len(paths) + 1))


@pytest.mark.parametrize("victim", ["train_name.txt", "tracks_test_info.mat", "query_IDX.mat"])
def test_mars_missing_info_file(tmp_path, victim):
    root = _mars_tree(str(tmp_path))
    os.remove(os.path.join(root, "info", victim))
    with pytest.raises(FileNotFoundError, match=victim):
        MARS(root)


def test_mars_malformed_files(tmp_path):
    root = _mars_tree(str(tmp_path))
    info = os.path.join(root, "info")
    savemat(os.path.join(info, "query_IDX.mat"), {"query_IDX": np.asarray([[3.0, 99.0]])})
    with pytest.raises(ValueError, match=r"query_IDX.*\[1, 7\]"):
        MARS(root)
    savemat(os.path.join(info, "query_IDX.mat"), {"wrong_key": np.asarray([[3.0]])})
    with pytest.raises(ValueError, match="query_IDX"):
        MARS(root)
    savemat(os.path.join(info, "query_IDX.mat"), {"query_IDX": np.asarray([[3.0]])})
    savemat(os.path.join(info, "tracks_train_info.mat"), {"track_train_info": np.ones((3, 3))})
    with pytest.raises(ValueError, match=r"tracks_train_info.mat.*\(n, 4\)"):
        MARS(root)
    savemat(os.path.join(info, "tracks_train_info.mat"), {"track_train_info": np.asarray([[1.0, 999, 3, 1]])})
    with pytest.raises(ValueError, match="start <= end"):
        MARS(root)
    with open(os.path.join(info, "tracks_train_info.mat"), "wb") as f:
        f.write(b"not a mat file")
    with pytest.raises(ValueError, match="tracks_train_info.mat"):
        MARS(root)
    with pytest.raises(FileNotFoundError, match="nope"):
        MARS(os.path.join(root, "nope"))


def test_mars_queries_follow_query_idx_order(tmp_path):
    """query[k] is test track query_IDX[k] (track_test_info[query_IDX], as
    the benchmark's code indexes it), not the test tracks' order."""
    root = _mars_tree(str(tmp_path))
    savemat(os.path.join(root, "info", "query_IDX.mat"), {"query_IDX": np.asarray([[5.0, 3.0]])})
    d = MARS(root)
    assert [(len(p), pid, cam) for p, pid, cam in d.query] == [(5, 9, 0), (12, 5, 0)]
    assert [(pid, cam) for _, pid, cam in d.gallery] == [(-1, 0), (0, 1), (5, 1), (9, 2), (9, 2)]
    # the MATLAB kit's gallery: every test track, the queries included, in test order
    kit = MARS(root, kit_gallery=True)
    assert kit.query == d.query
    assert [(pid, cam) for _, pid, cam in kit.gallery] == [(-1, 0), (0, 1), (5, 0), (5, 1), (9, 0), (9, 2), (9, 2)]
    assert kit.gallery[2] == d.query[1] and kit.gallery[4] == d.query[0]


def test_mars_name_list_not_text(tmp_path):
    root = _mars_tree(str(tmp_path))
    with open(os.path.join(root, "info", "test_name.txt"), "wb") as f:
        f.write(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=r"test_name.txt.*one MARS frame name per line"):
        MARS(root)


def test_mars_check_frames_names_missing_frame(tmp_path):
    root = _mars_tree(str(tmp_path))
    os.remove(os.path.join(root, "bbox_test", "0009", "0009C3T0001F003.jpg"))
    MARS(root)  # frames are not stat-ed by default (the loaders skip missing frames)
    with pytest.raises(FileNotFoundError, match="0009C3T0001F003.jpg"):
        MARS(root, check_frames=True)


# ----------------------------------------------------------------------------- iLIDS-VID


ILIDS_PERSONS = ["person001", "person002", "person004", "person010", "person011", "person100"]


def _ilids_tree(root, ls_set, empty=None):
    seq = os.path.join(root, "i-LIDS-VID", "sequences")
    for ci, cam in enumerate(("cam1", "cam2")):
        for k, p in enumerate(ILIDS_PERSONS):
            d = os.path.join(seq, cam, p)
            os.makedirs(d, exist_ok=True)
            if empty == (cam, p):
                continue
            for f in range(1, 13):  # f1.png .. f12.png: lexical order != numeric order
                _img(os.path.join(d, f"{cam}_{p}_{f}.png"), value=10 * k + f)
    sp = os.path.join(root, "train-test people splits")
    os.makedirs(sp, exist_ok=True)
    savemat(os.path.join(sp, "train_test_splits_ilidsvid.mat"), {"ls_set": np.asarray(ls_set, np.float64)})
    return root


def test_ilidsvid_reader(tmp_path):
    ls = [[2, 5, 6, 1, 3, 4], [1, 2, 3, 4, 5, 6]]
    root = _ilids_tree(str(tmp_path), ls)
    d = ILIDSVID(root, split_id=0)
    # first half of the row = test persons (indices 2, 5, 6 -> person002, person011, person100)
    assert [t[1] for t in d.query] == [2, 11, 100] and {t[2] for t in d.query} == {0}
    assert [t[1] for t in d.gallery] == [2, 11, 100] and {t[2] for t in d.gallery} == {1}
    # train = person001, person004, person010 in both cameras, relabelled 0..2
    assert [(t[1], t[2]) for t in d.train] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert d.num_train_pids == 3
    assert "person004" in d.train[2][0][0]
    for paths, _, _ in d.train + d.query + d.gallery:
        assert _frame_numbers(paths) == list(range(1, 13))
    d1 = ILIDSVID(root, split_id=1)
    assert [t[1] for t in d1.query] == [1, 2, 4]
    swapped = ILIDSVID(root, split_id=0, train_first=True)
    assert [t[1] for t in swapped.query] == [1, 4, 10]


def test_ilidsvid_ignores_directories_not_named_person(tmp_path, caplog):
    """Stray folders sort among the persons (".ipynb_checkpoints" first,
    "person001_old" after person001) and would shift every ls_set index."""
    ls = [[2, 5, 6, 1, 3, 4]]
    root = _ilids_tree(str(tmp_path), ls)
    want = ILIDSVID(root, split_id=0)
    for cam in ("cam1", "cam2"):
        for stray in (".ipynb_checkpoints", "person001_old", "backup"):
            os.makedirs(os.path.join(root, "i-LIDS-VID", "sequences", cam, stray), exist_ok=True)
    with caplog.at_level(logging.WARNING):
        got = ILIDSVID(root, split_id=0)
    for split in ("train", "query", "gallery"):
        assert getattr(got, split) == getattr(want, split), split
    assert any("not named personNNN" in r.getMessage() and "person001_old" in r.getMessage()
               for r in caplog.records)


def test_ilidsvid_errors(tmp_path, caplog):
    root = _ilids_tree(str(tmp_path / "a"), [[2, 5, 6, 1, 3, 4]], empty=("cam2", "person011"))
    with caplog.at_level(logging.WARNING):
        d = ILIDSVID(root)
    assert [t[1] for t in d.gallery] == [2, 100]  # the empty tracklet is dropped ...
    assert any("empty" in r.getMessage() for r in caplog.records)  # ... with a warning
    with pytest.raises(ValueError, match="split_id"):
        ILIDSVID(root, split_id=1)
    root = _ilids_tree(str(tmp_path / "b"), [[2, 5, 6, 1, 3, 7]])
    with pytest.raises(ValueError, match=r"ls_set.*\[1, 6\]"):
        ILIDSVID(root)
    root = _ilids_tree(str(tmp_path / "c"), [[2, 5, 6, 1, 3]])
    with pytest.raises(ValueError, match="ls_set"):
        ILIDSVID(root)
    os.remove(os.path.join(root, ILIDSVID.SPLIT_REL))
    with pytest.raises(FileNotFoundError, match="train_test_splits_ilidsvid.mat"):
        ILIDSVID(root)
    # a row that is not a permutation: person001 in both test and train, or twice in the test half
    for k, row in enumerate(([1, 2, 3, 1, 5, 6], [1, 1, 3, 4, 5, 6])):
        root = _ilids_tree(str(tmp_path / f"dup{k}"), [row])
        with pytest.raises(ValueError, match=r"train_test_splits_ilidsvid.mat.*each person once.*\[1\]"):
            ILIDSVID(root)


# ----------------------------------------------------------------------------- PRID-2011


def _prid_tree(root, splits, lengths=None, raw_json=None):
    lengths = lengths or {}
    ms = os.path.join(root, "prid_2011", "multi_shot")
    for cam, persons in (("cam_a", list(range(1, 7)) + [250]), ("cam_b", list(range(1, 7)) + [201, 300])):
        for p in persons:
            d = os.path.join(ms, cam, f"person_{p:04d}")
            os.makedirs(d, exist_ok=True)
            for f in range(1, lengths.get((cam, p), 30) + 1):
                _img(os.path.join(d, f"{f:04d}.png" if f % 2 else f"{f}.png"), value=f)
    with open(os.path.join(root, "splits_prid2011.json"), "w") as f:
        f.write(raw_json if raw_json is not None else json.dumps(splits))
    return root


def test_prid_reader(tmp_path):
    splits = [{"train": ["person_0001", "person_0003", "person_0005"], "test": ["person_0002", "person_0004"]},
              {"train": [2, 4], "test": [1, 3, 6]}]
    root = _prid_tree(str(tmp_path), splits, lengths={("cam_b", 5): 12, ("cam_a", 4): 26})
    # The default keeps everyone the split names (as torchreid and fast-reid do).
    d = PRID2011(root, split_id=0)
    assert d.num_train_pids == 3 and [t[1] for t in d.query] == [2, 4] and [t[1] for t in d.gallery] == [2, 4]
    assert sorted(len(t[0]) for t in d.query + d.gallery) == [26, 30, 30, 30]
    d = PRID2011(root, split_id=0, min_frames=27)  # person 5 (12 frames in cam_b) and 4 (26 in cam_a) dropped
    assert [(t[1], t[2]) for t in d.train] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(t[1], t[2]) for t in d.query] == [(2, 0)] and [(t[1], t[2]) for t in d.gallery] == [(2, 1)]
    assert "person_0003" in d.train[2][0][0]
    for paths, _, _ in d.train + d.query + d.gallery:
        assert _frame_numbers(paths) == list(range(1, 31))
    d = PRID2011(root, split_id=0, min_frames=5)
    assert d.num_train_pids == 3 and [t[1] for t in d.query] == [2, 4]
    d = PRID2011(root, split_id=1, min_frames=27)
    assert [t[1] for t in d.query] == [1, 3, 6] and d.num_train_pids == 1  # person 4 is short in cam_a
    assert PRID2011(root, split_id=1).num_train_pids == 2


def test_prid_errors(tmp_path):
    root = _prid_tree(str(tmp_path / "a"), [{"train": [1, 2], "test": [201]}])
    with pytest.raises(ValueError, match="201"):
        PRID2011(root)  # person 201 is not one of the 200 seen by both cameras
    root = _prid_tree(str(tmp_path / "b"), None, raw_json="{not json")
    with pytest.raises(ValueError, match="splits_prid2011.json"):
        PRID2011(root)
    root = _prid_tree(str(tmp_path / "c"), [{"train": [1]}])
    with pytest.raises(ValueError, match="test"):
        PRID2011(root)
    root = _prid_tree(str(tmp_path / "d"), [{"train": [1, 2], "test": [3]}])
    with pytest.raises(ValueError, match="split_id"):
        PRID2011(root, split_id=3)
    with pytest.raises(ValueError, match="min_frames"):
        PRID2011(root, min_frames=0)
    os.remove(os.path.join(root, "splits_prid2011.json"))
    with pytest.raises(FileNotFoundError, match="splits_prid2011.json"):
        PRID2011(root)


def test_prid_ignores_directories_not_named_person(tmp_path, caplog):
    """A stray "copy_of_person_0003" or "person_0002_old" is not a person:
    before, the last number of any directory name picked the person, and
    which of two directories won depended on os.listdir's order."""
    splits = [{"train": [1, 3, 5], "test": [2, 4]}]
    root = _prid_tree(str(tmp_path), splits)
    want = PRID2011(root)
    for cam in ("cam_a", "cam_b"):
        for stray in ("copy_of_person_0003", "person_0002_old", "backup"):
            os.makedirs(os.path.join(root, "prid_2011", "multi_shot", cam, stray), exist_ok=True)
    with caplog.at_level(logging.WARNING):
        got = PRID2011(root)
    for split in ("train", "query", "gallery"):
        assert getattr(got, split) == getattr(want, split), split
    assert any("not named person_NNNN" in r.getMessage() and "copy_of_person_0003" in r.getMessage()
               for r in caplog.records)
    os.makedirs(os.path.join(root, "prid_2011", "multi_shot", "cam_a", "person_03"))
    with pytest.raises(ValueError, match=r"cam_a: two directories for person 3"):
        PRID2011(root)


def test_build_dataset_and_sorting(tmp_path):
    root = _mars_tree(str(tmp_path))
    assert len(build_dataset("mars", root).query) == 2
    assert len(build_dataset("MARS", root).train) == 4
    with pytest.raises(ValueError, match="name"):
        build_dataset("market", root)
    with pytest.raises(ValueError, match="split_id"):
        build_dataset("mars", root, split_id=2)
    assert natural_sorted(["f10.png", "f2.png", "f1.png"]) == ["f1.png", "f2.png", "f10.png"]


def test_mars_corrupt_jpeg_is_skipped_by_the_loader(tmp_path):
    from personvlad.data import build_test_loader

    root = _mars_tree(str(tmp_path))
    with open(os.path.join(root, "bbox_test", "0005", "0005C1T0001F004.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    d = MARS(root)  # the reader does not decode frames
    dl = build_test_loader(d.query, clip_len=4, size=(8, 4), stride=4, batch_size=8, workers=0)
    x = torch_cat([c for c, _ in dl])
    assert x.shape == (3 + 1, 3, 4, 8, 4)  # 12 frames -> 3 clips, 5 frames -> 1 clip (full clips only)
    assert dl.stats.totals()["bad_frames"] == 1


def torch_cat(xs):
    import torch
    return torch.cat(xs)


def test_mars_rows_must_match_frame_names(tmp_path):
    root = _mars_tree(str(tmp_path))
    info = os.path.join(root, "info", "tracks_train_info.mat")
    savemat(info, {"track_train_info": np.asarray([[1.0, 12, 3, 2]])})  # the frames are from camera 1
    with pytest.raises(ValueError, match=r"pid 3, camera 2.*0003C1T0001F001.jpg"):
        MARS(root)
    savemat(info, {"track_train_info": np.asarray([[10.0, 14, 3, 1]])})  # spans two tracklets of pid 3
    with pytest.raises(ValueError, match="camera 1"):
        MARS(root)
