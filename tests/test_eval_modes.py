"""Table II modes, repeated splits, XQDA/KISSME and the `personvlad evaluate` CLI
on synthetic feature files."""
import argparse
import json

import numpy as np
import pytest

from personvlad.eval import compute_distmat, evaluate
from personvlad.eval.metric_learning import KISSME, XQDA, pair_covariances
from personvlad.eval.modes import (FeatureFile, evaluate_feature_file, evaluate_splits, format_table,
                                   random_clip_features, tracklet_activation)


def _l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_feature_file(path, seed=0, n_ids=30, dim=16, clip_noise=1.2, with_train=True, first_frames=None):
    """Synthetic `personvlad extract` output: each tracklet's clips = id centre + strong noise,
    so averaging all clips (the tracklet activation) beats a single random clip."""
    rng = np.random.default_rng(seed)
    centres = _l2n(rng.standard_normal((n_ids + 10, dim)))
    arrays = {}

    def split(name, pids, camids):
        counts = rng.integers(1, 6, len(pids))
        clips = np.concatenate([_l2n(centres[p] + clip_noise / np.sqrt(dim) * rng.standard_normal((c, dim)))
                                for p, c in zip(pids, counts)]).astype(np.float32)
        arrays[f"{name}_clip_feats"] = clips
        arrays[f"{name}_clip_counts"] = counts.astype(np.int64)
        arrays[f"{name}_feats"] = tracklet_activation(clips, counts)
        arrays[f"{name}_pids"] = np.asarray(pids, dtype=np.int64)
        arrays[f"{name}_camids"] = np.asarray(camids, dtype=np.int64)
        arrays[f"{name}_first_frame"] = np.array([f"{name}/{i}.jpg" for i in range(len(pids))])

    ids = np.arange(n_ids)
    split("query", ids, np.zeros(n_ids))
    # the last 3 ids are only seen by the query camera (no valid match under "standard"),
    # plus junk (-1) and distractor (0) entries
    gallery_ids = np.concatenate([ids[:-3], ids[: n_ids // 2], ids[-3:], [-1, -1, 0]])
    gallery_cams = np.concatenate([np.ones(n_ids - 3), np.zeros(n_ids // 2 + 3), [1, 1, 1]])
    split("gallery", gallery_ids, gallery_cams)
    if with_train:
        tids = np.repeat(np.arange(n_ids, n_ids + 10), 4)
        split("train", tids, np.tile([0, 1], len(tids) // 2))
    if first_frames is not None:
        arrays.update(first_frames)
    arrays["meta"] = np.array(json.dumps({"dataset": "synthetic", "seed": seed}))
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture
def feats(tmp_path):
    return make_feature_file(tmp_path / "feats.npz")


def test_all_all_equals_direct_evaluation(feats):
    ff = FeatureFile(feats)
    dm = compute_distmat(ff["query_feats"], ff["gallery_feats"])
    for protocol in ("standard", "mars"):
        cmc, mAP = evaluate(dm, ff["query_pids"], ff["gallery_pids"], ff["query_camids"], ff["gallery_camids"],
                            max_rank=20, protocol=protocol)
        res = evaluate_feature_file(feats, protocols=[protocol], max_rank=20)[protocol]["all/all"]
        assert np.allclose(res["cmc"], cmc) and res["mAP"] == pytest.approx(mAP) and res["repeats"] == 1


def test_tracklet_activation_is_mean_then_l2():
    clips = np.array([[1, 0], [0, 1], [3, 0]], dtype=np.float32)
    act = tracklet_activation(clips, np.array([2, 1]))
    assert np.allclose(act, [[np.sqrt(0.5), np.sqrt(0.5)], [1, 0]])


def test_random_modes_average_the_draws(feats):
    res = evaluate_feature_file(feats, protocols=["standard"], modes=["random/all"], repeats=3, seed=5,
                                max_rank=10)["standard"]["random/all"]
    ff = FeatureFile(feats)
    cmcs, maps = [], []
    for r in range(3):
        q = random_clip_features(ff, "query", np.random.default_rng(5 + r))
        # a random clip is one of the tracklet's clips
        clips, offsets, counts = ff.clip_layout("query")
        for i in range(0, len(counts), 7):
            own = _l2n(clips[offsets[i]:offsets[i] + counts[i]])
            assert np.isclose(own @ q[i], 1.0, atol=1e-5).any()
        c, m = evaluate(compute_distmat(q, ff["gallery_feats"]), ff["query_pids"], ff["gallery_pids"],
                        ff["query_camids"], ff["gallery_camids"], max_rank=10)
        cmcs.append(c)
        maps.append(m)
    assert res["repeats"] == 3
    assert np.allclose(res["cmc"], np.mean(cmcs, 0)) and res["mAP"] == pytest.approx(np.mean(maps))


def test_table2_all_beats_random(tmp_path):
    path = make_feature_file(tmp_path / "f.npz", n_ids=40, clip_noise=1.5)
    rep = evaluate_splits([path], protocols=["standard", "mars"], modes=True, repeats=4, max_rank=20)
    for protocol in ("standard", "mars"):
        r = rep["results"][protocol]
        assert set(r) == {"all/all", "all/random", "random/all", "random/random"}
        assert r["all/all"]["mAP"] > r["random/random"]["mAP"] + 0.05
        assert r["all/all"]["rank1"] >= r["random/random"]["rank1"]
    table = format_table(rep)
    assert "random/random" in table and "mars" in table


def test_repeated_splits_mean_and_std(tmp_path):
    paths = [make_feature_file(tmp_path / f"s{i}.npz", seed=i) for i in range(3)]
    rep = evaluate_splits(paths, protocols=["standard"], max_rank=10)
    one = [evaluate_feature_file(p, max_rank=10)["standard"]["all/all"] for p in paths]
    s = rep["results"]["standard"]["all/all"]
    maps = np.array([o["mAP"] for o in one])
    r1 = np.array([o["cmc"][0] for o in one])
    assert s["mAP"] == pytest.approx(maps.mean()) and s["mAP_std"] == pytest.approx(maps.std())
    assert s["rank1"] == pytest.approx(r1.mean()) and s["rank1_std"] == pytest.approx(r1.std())
    assert len(s["per_split"]) == 3 and "±" in format_table(rep)


def test_feature_file_errors(tmp_path):
    path = make_feature_file(tmp_path / "f.npz", with_train=False)
    with pytest.raises(ValueError, match="train_feats"):
        evaluate_feature_file(path, metric="xqda")
    with pytest.raises(ValueError, match="not found"):
        FeatureFile(str(tmp_path / "missing.npz"))
    z = dict(np.load(path))
    del z["gallery_pids"]
    np.savez(tmp_path / "broken.npz", **z)
    with pytest.raises(ValueError, match="gallery_pids"):
        FeatureFile(str(tmp_path / "broken.npz"))
    z = dict(np.load(path))
    z["query_clip_counts"] = z["query_clip_counts"] + 1
    np.savez(tmp_path / "badcounts.npz", **z)
    with pytest.raises(ValueError, match="query_clip_counts"):
        evaluate_feature_file(str(tmp_path / "badcounts.npz"), modes=True)
    with pytest.raises(ValueError, match="modes"):
        evaluate_feature_file(path, modes=["all/none"])


# ---------------------------------------------------------------------------
# metric learning
# ---------------------------------------------------------------------------
def _nuisance_data(rng, n_ids, per_id, dim=12, k=3):
    """Identity lives in k low-variance directions; the other directions are
    high-variance noise carrying no identity."""
    means = rng.standard_normal((n_ids, k))
    labels = np.repeat(np.arange(n_ids), per_id)
    x = np.empty((len(labels), dim))
    x[:, :k] = means[labels] + 0.15 * rng.standard_normal((len(labels), k))
    x[:, k:] = 2.0 * rng.standard_normal((len(labels), dim - k))
    return x, labels


def test_metric_learning_beats_euclidean_on_nuisance_directions():
    rng = np.random.default_rng(0)
    xt, yt = _nuisance_data(rng, 60, 6)
    xe, ye = _nuisance_data(rng, 80, 2)
    q, g, qp, gp = xe[::2], xe[1::2], ye[::2], ye[1::2]
    qc, gc = np.zeros(len(qp), int), np.ones(len(gp), int)
    euc = evaluate(compute_distmat(q, g), qp, gp, qc, gc, max_rank=10)[0][0]
    assert euc < 0.25
    for learner in (XQDA(), KISSME()):
        learner.fit(xt, yt)
        r1 = evaluate(learner.distance(q, g), qp, gp, qc, gc, max_rank=10)[0][0]
        assert r1 > 0.6 and r1 > euc + 0.4, (type(learner).__name__, r1, euc)


def test_pair_covariances_match_explicit_pairs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 3))
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    _, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    s_i, s_e = pair_covariances(x, inv, counts)
    same = [np.outer(x[i] - x[j], x[i] - x[j]) for i in range(9) for j in range(9) if i != j and y[i] == y[j]]
    diff = [np.outer(x[i] - x[j], x[i] - x[j]) for i in range(9) for j in range(9) if y[i] != y[j]]
    assert np.allclose(s_i, np.mean(same, 0)) and np.allclose(s_e, np.mean(diff, 0))


def test_xqda_and_kissme_properties():
    rng = np.random.default_rng(2)
    x, y = _nuisance_data(rng, 30, 4)
    xq = XQDA(reg=1e-3).fit(x, y)
    # default dimension = number of generalised eigenvalues > 1, and M is then PSD
    assert xq.proj_.shape[1] == int((xq.eigenvalues_ > 1).sum())
    assert np.linalg.eigvalsh(xq.kernel_).min() > -1e-9
    assert XQDA(dim=2).fit(x, y).proj_.shape == (12, 2)
    ks = KISSME().fit(x, y)
    assert np.linalg.eigvalsh(ks.kernel_).min() > -1e-9
    d = ks.distance(x[:5], x[:7])
    assert d.shape == (5, 7) and np.allclose(np.diag(d[:5, :5]), 0.0, atol=1e-8)


def test_pca_for_high_dimensional_descriptors():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((120, 400)).astype(np.float32)
    y = np.repeat(np.arange(30), 4)
    m = KISSME(pca_dim="auto").fit(x, y)
    assert m.pca_ is not None and m.pca_.components_.shape == (400, 119)  # min(256, n-1)
    assert m.transform(x[:3]).shape == (3, 119)
    m = XQDA(pca_dim=20).fit(x, y)
    assert m.pca_.components_.shape == (400, 20) and m.distance(x[:2], x[:4]).shape == (2, 4)
    assert KISSME(pca_dim=None).fit(x[:, :30], y).pca_ is None


def test_metric_learning_validation():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="labels"):
        XQDA().fit(x, [0, 1, 2])
    with pytest.raises(ValueError, match="labels"):
        KISSME().fit(x, [0, 1, 2, 3])  # no similar pair
    with pytest.raises(ValueError, match="features"):
        KISSME().fit(np.zeros(4), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="pca_dim"):
        XQDA(pca_dim="half")
    with pytest.raises(RuntimeError, match="fit"):
        KISSME().distance(x, x)
    # more dimensions than the samples span and no ridge: the covariances are
    # singular; KISSME used to invert them anyway and return noise
    rng = np.random.default_rng(0)
    low = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 10))  # rank 3 in 10-D
    labels = np.repeat(np.arange(6), 2)
    for learner in (KISSME(reg=0.0, pca_dim=None), XQDA(reg=0.0, pca_dim=None)):
        with pytest.raises(ValueError, match="reg: .* singular"):
            learner.fit(low, labels)
    KISSME(reg=1e-3, pca_dim=None).fit(low, labels)  # the ridge makes it well posed
    m = KISSME().fit(np.random.default_rng(0).standard_normal((6, 3)), [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="gf"):
        m.distance(np.zeros((2, 3)), np.zeros((2, 4)))


def test_feature_file_with_learned_metric(tmp_path):
    path = make_feature_file(tmp_path / "f.npz")
    rep = evaluate_splits([path], protocols=["standard"], metric="kissme", max_rank=10,
                          metric_kwargs={"pca_dim": None})
    assert 0.0 <= rep["results"]["standard"]["all/all"]["mAP"] <= 1.0 and rep["metric"] == "kissme"


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def _run_cli(argv):
    from personvlad.eval import cli

    parser = argparse.ArgumentParser(prog="personvlad")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_evaluate_end_to_end(tmp_path, capsys):
    paths = [make_feature_file(tmp_path / f"s{i}.npz", seed=i) for i in range(2)]
    out = tmp_path / "res" / "eval.json"
    rc = _run_cli(["evaluate", "--features", *paths, "--protocol", "both", "--modes", "--repeats", "2",
                   "--max-rank", "20", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "all/random" in text and "±" in text
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"standard", "mars"}
    assert len(rep["results"]["mars"]["random/random"]["cmc"]) == 20
    assert _run_cli(["evaluate", "--features", paths[0], "--metric", "xqda", "--pca-dim", "none"]) == 0
    assert "metric=xqda" in capsys.readouterr().out


def test_top_level_cli_dispatch(tmp_path, monkeypatch, capsys):
    import personvlad.cli as top

    monkeypatch.setattr(top, "COMMAND_MODULES", ["personvlad.eval.cli"])
    path = make_feature_file(tmp_path / "f.npz")
    assert top.main(["evaluate", "--features", path, "--metric", "cosine"]) == 0
    assert "all/all" in capsys.readouterr().out


def test_cli_evaluate_reports_missing_train_key(tmp_path, capsys):
    path = make_feature_file(tmp_path / "f.npz", with_train=False)
    assert _run_cli(["evaluate", "--features", path, "--metric", "kissme"]) == 2
    assert "train_feats" in capsys.readouterr().err


def test_query_counts_match_the_protocol(tmp_path):
    from personvlad.eval import per_query_stats
    from personvlad.eval.modes import query_counts

    path = make_feature_file(tmp_path / "f.npz")
    ff = FeatureFile(path)
    c = query_counts(ff)
    st = per_query_stats(compute_distmat(ff["query_feats"], ff["gallery_feats"]), ff["query_pids"],
                         ff["gallery_pids"], ff["query_camids"], ff["gallery_camids"], "standard")
    assert c["num_scored_standard"] == int((st["num_matches"] > 0).sum()) == 27 < c["num_query"] == 30
    assert c["num_gallery"] == ff["gallery_pids"].shape[0]


def test_package_exports_resolve():
    import personvlad.eval as ev

    for name in ev.__all__:
        assert getattr(ev, name) is not None, name
    with pytest.raises(AttributeError):
        ev.not_a_name
