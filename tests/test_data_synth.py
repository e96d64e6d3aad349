"""The synthetic MARS-layout generator: format, determinism, and that identity is recoverable."""
import argparse
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from personvlad.data import MARS, build_test_loader
from personvlad.data import cli as data_cli
from personvlad.data.synth import INCOMPLETE, PRESETS, ensure_generated, generate

MICRO = dict(train_ids=3, test_ids=3, num_cams=2, cams_per_id=(2, 2), tracklets_per_cam=(1, 1), frames=(2, 4),
             junk=1, distractors=1)
NAME_RE = re.compile(r"^(\d{4}|00-1)C(\d)T(\d{4})F(\d{3,})\.jpg$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("synth") / "tiny"), preset="tiny", seed=0, workers=2)


def _digest(root):
    h = hashlib.sha256()
    for dp, dn, fn in sorted(os.walk(root)):
        dn.sort()
        for f in sorted(fn):
            h.update(os.path.relpath(os.path.join(dp, f), root).encode())
            h.update(open(os.path.join(dp, f), "rb").read())
    return h.hexdigest()


def test_tiny_is_read_by_mars(tiny):
    meta = json.load(open(os.path.join(tiny, "synth.json")))
    cfg = PRESETS["tiny"]
    d = MARS(tiny, check_frames=True)
    assert d.num_train_pids == cfg["train_ids"] == meta["train_ids"]
    assert sorted({t[1] for t in d.train}) == list(range(cfg["train_ids"]))  # relabelled
    assert len(d.train) == meta["train_tracklets"]
    assert len(d.query) + len(d.gallery) == meta["test_tracklets"] and len(d.query) == meta["queries"]
    assert sum(len(t[0]) for t in d.train + d.query + d.gallery) == meta["frames"]
    # original ids are not 0..n-1 (so relabelling is exercised), test ids keep theirs
    raw_train = loadmat(os.path.join(tiny, "info", "tracks_train_info.mat"))["track_train_info"]
    assert sorted(set(raw_train[:, 2].astype(int))) != list(range(cfg["train_ids"]))
    gal_pids = [t[1] for t in d.gallery]
    assert gal_pids.count(-1) == cfg["junk"] and gal_pids.count(0) == cfg["distractors"]
    assert len({p for p in gal_pids if p > 0}) == cfg["test_ids"]
    assert all(t[1] > 0 for t in d.query)
    assert {t[2] for t in d.train + d.query + d.gallery} <= set(range(cfg["num_cams"]))
    for paths, pid, cam in d.query:  # every query has a match in another camera in the gallery
        assert any(g[1] == pid and g[2] != cam for g in d.gallery)
    lo, hi = cfg["frames"]
    for paths, pid, cam in d.train + d.query + d.gallery:
        assert lo <= len(paths) <= hi
        names = [os.path.basename(p) for p in paths]
        m = [NAME_RE.match(n) for n in names]
        assert all(m) and [int(x.group(4)) for x in m] == list(range(1, len(paths) + 1))
        assert int(m[0].group(2)) == cam + 1
        assert os.path.basename(os.path.dirname(paths[0])) == names[0][:4]
    with Image.open(d.train[0][0][0]) as im:
        assert im.format == "JPEG" and im.size == (128, 256) and im.mode == "RGB"
    q = loadmat(os.path.join(tiny, "info", "query_IDX.mat"))["query_IDX"]
    assert q.shape == (1, meta["queries"]) and q.min() >= 1


def test_ensure_generated_redoes_an_interrupted_generation_and_refuses_other_data(tmp_path, monkeypatch):
    from personvlad.data import synth

    root = tmp_path / "set"
    # a generation killed after a few tracklets: info/ written, frames partial,
    # no synth.json -- the marker says so
    calls = []

    def dying(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    real = synth._write_job
    monkeypatch.setattr(synth, "_write_job", dying)
    with pytest.raises(KeyboardInterrupt):
        ensure_generated(str(root), preset=MICRO, seed=3)
    monkeypatch.setattr(synth, "_write_job", real)
    assert (root / "info").is_dir() and (root / INCOMPLETE).exists() and not (root / "synth.json").exists()
    assert ensure_generated(str(root), preset=MICRO, seed=3) is True  # redone
    assert not (root / INCOMPLETE).exists()
    assert _digest(root) == _digest(generate(str(tmp_path / "ref"), preset=MICRO, seed=3))
    assert ensure_generated(str(root), preset=MICRO, seed=3) is False  # complete: reused
    with pytest.raises(ValueError, match=r"out_dir: .* holds the synthetic set of preset 'custom' seed 3, "
                                         r"not 'custom' seed 4"):
        ensure_generated(str(root), preset=MICRO, seed=4)
    other = tmp_path / "mine"
    (other / "info").mkdir(parents=True)
    (other / "info" / "train_name.txt").write_text("x\n")
    with pytest.raises(ValueError, match=r"out_dir: .* is not empty and holds no complete synthetic set"):
        ensure_generated(str(other), preset=MICRO, seed=0)
    assert (other / "info" / "train_name.txt").read_text() == "x\n"  # not overwritten


def test_determinism(tmp_path):
    a = generate(str(tmp_path / "a"), preset=MICRO, seed=3)
    b = generate(str(tmp_path / "b"), preset=MICRO, seed=3, workers=2)
    c = generate(str(tmp_path / "c"), preset=MICRO, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    with pytest.raises(ValueError, match="preset"):
        generate(str(tmp_path / "d"), preset="huge")
    with pytest.raises(ValueError, match="seed"):
        generate(str(tmp_path / "d"), seed=-1)


def _rank1_cam_centred(root):
    """Rank-1 of nearest neighbour on mean colour thumbnails with each camera's
    mean removed (standard protocol: same id + same camera excluded)."""
    d = MARS(root)
    q, g = d.query, d.gallery

    def feats(tracks, size=(32, 16)):
        out = np.zeros((len(tracks), 3 * size[0] * size[1]))
        for x, ti in build_test_loader(tracks, clip_len=4, size=size, stride=4, batch_size=64, workers=0):
            np.add.at(out, ti.numpy(), x.float().mean(2).flatten(1).numpy())
        return out

    fq, fg = feats(q), feats(g)
    cams = np.array([t[2] for t in q + g])
    allf = np.concatenate([fq, fg])
    mu = {c: allf[cams == c].mean(0) for c in set(cams.tolist())}
    fq = fq - np.stack([mu[t[2]] for t in q])
    fg = fg - np.stack([mu[t[2]] for t in g])
    fq /= np.linalg.norm(fq, axis=1, keepdims=True)
    fg /= np.linalg.norm(fg, axis=1, keepdims=True)
    dist = -fq @ fg.T
    hits = 0
    for i, (_, pid, cam) in enumerate(q):
        order = [j for j in np.argsort(dist[i], kind="stable") if not (g[j][1] == pid and g[j][2] == cam)]
        hits += g[order[0]][1] == pid
    return hits / len(q)


def test_identity_is_recognisable_and_nuisances_matter(tmp_path):
    """Without nuisances (nuisance=0) a trivial pixel matcher re-identifies most
    people (appearance identifies them); with the default nuisances
    (misalignment, colour cast, occlusion, clutter) it does much worse."""
    cfg = dict(train_ids=2, test_ids=12, num_cams=3, cams_per_id=(2, 2), tracklets_per_cam=(1, 1), frames=(4, 6),
               junk=0, distractors=0)
    clean = _rank1_cam_centred(generate(str(tmp_path / "clean"), preset=dict(cfg, nuisance=0.0), seed=0))
    noisy = _rank1_cam_centred(generate(str(tmp_path / "noisy"), preset=dict(cfg, nuisance=1.0), seed=0))
    assert clean >= 0.6, clean
    assert noisy <= clean - 0.15, (clean, noisy)


def test_cli_synth_and_pack(tmp_path, tiny):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    data_cli.register(sub)
    args = parser.parse_args(["pack", "--dataset-root", tiny, "--out", str(tmp_path / "sh"), "--size", "32x16",
                              "--workers", "1", "--quiet"])
    assert args.func(args) == 0
    idx = np.load(str(tmp_path / "sh" / "index.npz"))
    assert json.loads(str(idx["meta"]))["size"] == [32, 16]
    assert os.path.getsize(str(tmp_path / "sh" / "frames.u8")) == json.loads(str(idx["meta"]))["num_frames"] * 32 * 16 * 3
    args = parser.parse_args(["synth", "--out", str(tmp_path / "s"), "--preset", "tiny", "--seed", "1", "--quiet"])
    assert args.func == data_cli._synth and args.preset == "tiny" and args.seed == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "--out", "x", "--preset", "huge"])


def test_preset_plans_match_counts():
    from personvlad.data.synth import _build_plan

    cfg, train, test, queries = _build_plan("mars-scale", 0)
    assert len({t["pid"] for t in train}) == 625 and len(train) == 8298
    assert len({t["pid"] for t in test if t["pid"] > 0}) == 636 and len(test) == 12180
    assert sum(t["pid"] == -1 for t in test) == cfg["junk"] and sum(t["pid"] == 0 for t in test) == cfg["distractors"]
    assert 1.0e6 < sum(t["frames"] for t in train + test) < 1.4e6  # MARS: ~1.19M frames
    assert all(test[r]["pid"] > 0 for r in queries) and len(set(queries)) == len(queries)
    for p in ("tiny", "small"):
        cfg, train, test, _ = _build_plan(p, 0)
        assert len({t["pid"] for t in train}) == cfg["train_ids"]
        lo, hi = cfg["frames"]
        assert all(lo <= t["frames"] <= hi for t in train + test)
