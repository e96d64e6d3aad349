"""Engine: config, checkpoints (atomic, weights-only, RNG), training, resume, DDP, extraction."""
import glob
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from personvlad import ops
from personvlad.engine import checkpoint as ck
from personvlad.engine.config import TrainConfig
from personvlad.engine.trainer import StepSchedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli_module():
    try:
        from personvlad import cli

        if "personvlad.engine.cli" in cli.COMMAND_MODULES:
            return "personvlad.cli"
    except Exception:
        pass
    return "personvlad.engine.cli"


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def small_cfg(root, **sections):
    """The tiny preset at a reduced input (8x32x16), deterministic, CPU.

    The op backend is "reference" (pure PyTorch) unless a test says
    otherwise; the kill-and-resume test also runs with the C++ "cpu" backend
    (the CPU default).  That one used to drift in the last bits after a
    resume: its AVX-512 code, built with FMA contraction, gave different bits
    in some calls made from autograd's backward thread.  Since the extension
    is built with -ffp-contract=off it resumes bitwise too."""
    d = {
        "name": "test", "seed": 0, "deterministic": True, "device": "cpu",
        "model": {"preset": "tiny", "height": 32, "width": 16, "backend": "reference"},
        "data": {"dataset": "synthetic", "root": str(root), "num_ids": 4, "num_per_id": 2, "workers": 0,
                 "test_batch_size": 64},
        "loss": {"queue_size": 16},
        "schedule": {"kmeans_descriptors": 400, "kmeans_batches": 3, "step1_iters": 8, "step1_lr": 1e-3,
                     "step1_decay_every": 4, "step2_iters": 4},
        "log": {"log_every": 1, "ckpt_every": 2, "progress": False, "tensorboard": False},
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            d[k] = {**d.get(k, {}), **v}
        else:
            d[k] = v
    return TrainConfig.from_dict(d)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from personvlad.data.synth import generate

    root = tmp_path_factory.mktemp("synth") / "tiny"
    generate(str(root), preset="tiny", seed=0)
    return root


# ----------------------------------------------------------------- config
def test_config_defaults_are_the_paper_schedule():
    c = TrainConfig()
    s = c.schedule
    assert (s.step1_iters, s.step1_lr, s.step1_gamma, s.step1_decay_every) == (50_000, 0.003, 0.5, 1000)
    assert s.step1_freeze_centers and s.kmeans_init and s.step2_lr == 1e-4
    assert c.optim.name == "adam" and c.optim.eps == 1e-4
    assert c.data.num_ids * c.data.num_per_id == 15 and c.data.flip_p == 0.5
    m = c.model_config()
    assert (m.clip_len, m.height, m.width, m.num_clusters, m.num_parts) == (16, 180, 90, 64, 6)
    assert c.loss.name == "oim" and c.loss.temperature == 0.1 and c.loss.momentum == 0.5


def test_deterministic_on_cuda_needs_the_fused_epilogues(tmp_path):
    """torch.use_deterministic_algorithms has no deterministic CUDA MaxPool3d
    backward: deterministic CUDA training is refused up front, with the fix,
    unless the pools run as the fused epilogue (deterministic backward)."""
    from personvlad.engine.trainer import _check_device_config

    cfg = small_cfg(tmp_path)
    assert cfg.deterministic and not cfg.fuse_epilogues
    with pytest.raises(ValueError, match="fuse_epilogues: true"):
        _check_device_config(cfg, torch.device("cuda"))
    _check_device_config(cfg, torch.device("cpu"))
    _check_device_config(small_cfg(tmp_path, fuse_epilogues=True), torch.device("cuda"))
    _check_device_config(small_cfg(tmp_path, deterministic=False), torch.device("cuda"))


def test_config_yaml_roundtrip_and_overrides(tmp_path):
    c = TrainConfig().apply_overrides(["data.root=/x", "optim.grad_clip=5", "model.num_parts=4",
                                       "schedule.step2_lr=1e-5", "loss.num_sampled=100", "deterministic=true"])
    assert c.optim.grad_clip == 5.0 and isinstance(c.optim.grad_clip, float)
    assert c.model_config().num_parts == 4 and c.schedule.step2_lr == 1e-5
    assert c.loss.num_sampled == 100 and c.deterministic is True
    p = tmp_path / "c.yaml"
    c.save_yaml(str(p))
    assert TrainConfig.from_yaml(str(p)).to_dict() == c.to_dict()
    for bad, name in [("optim.grad_clip=abc", "optim.grad_clip"), ("model.foo=1", "foo"),
                      ("data.num_ids=1.5", "data.num_ids"), ("nope=1", "nope"), ("deterministic=1", "deterministic"),
                      ("loss.name=arc", "loss.name"), ("schedule.step1_lr=-1", "schedule.step1_lr"), ("novalue", "key=value")]:
        with pytest.raises(ValueError, match=name):
            TrainConfig().apply_overrides([bad])
    p.write_text("data: {num_ids: 'five'}\n")
    with pytest.raises(ValueError, match="data.num_ids"):
        TrainConfig.from_yaml(str(p))


def test_shipped_configs_load():
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    names = {os.path.basename(p)[:-5] for p in paths}
    expected = {"synthetic-tiny", "synthetic-mars", "mars", "ilidsvid", "prid", "gp-avg", "gp-max", "stripe", "grid"}
    expected |= {f"parts-b{b}" for b in range(1, 9)}
    assert expected <= names, sorted(expected - names)
    for p in paths:
        c = TrainConfig.from_yaml(p)
        mc = c.model_config()
        if os.path.basename(p).startswith("parts-b"):
            assert mc.parts == "learned" and mc.num_parts == int(os.path.basename(p)[7:-5])
    assert TrainConfig.from_yaml(os.path.join(REPO, "configs", "ilidsvid.yaml")).init_from
    assert TrainConfig.from_yaml(os.path.join(REPO, "configs", "gp-avg.yaml")).model_config().head == "avg"


def test_shipped_configs_resolve_by_name(tmp_path, monkeypatch):
    """The configs ship as personvlad.configs: `--config mars` (or the
    README's configs/mars.yaml run outside a checkout) finds them; a path
    that exists wins; any other missing path is an error listing the names."""
    from personvlad.engine.config import resolve_config, shipped_configs

    shipped = shipped_configs()
    assert set(shipped) == {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))}
    for name in shipped:
        with open(shipped[name], "rb") as a, open(os.path.join(REPO, "configs", name + ".yaml"), "rb") as b:
            assert a.read() == b.read(), name
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert resolve_config("mars") == shipped["mars"] == resolve_config("mars.yaml")
    assert resolve_config(os.path.join("configs", "prid.yaml")) == shipped["prid"]
    mine = tmp_path / "mars.yaml"
    mine.write_text("name: mine\n")
    assert resolve_config(str(mine)) == str(mine)  # an existing file is taken as given
    for bad in ("marz", os.path.join("elsewhere", "mars.yaml")):
        with pytest.raises(FileNotFoundError, match=r"expected a YAML training config file or the name of a "
                                                    r"shipped config \(gp-avg, .*synthetic-tiny\)"):
            resolve_config(bad)


def test_step_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1.0)
    s = StepSchedule(opt, 0.003, 0.5, 1000)
    lrs = []
    for _ in range(2500):
        lrs.append(opt.param_groups[0]["lr"])
        s.step()
    assert lrs[0] == lrs[999] == 0.003 and lrs[1000] == 0.0015 and lrs[2001] == 0.00075
    s2 = StepSchedule(opt, 1.0)
    s2.load_state_dict(s.state_dict())
    assert s2.lr() == s.lr() == opt.param_groups[0]["lr"]


# ----------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_weights_only_and_rng(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    rng = ck.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    state = {"model": {"w": torch.randn(3)}, "iteration": 7, "step": 1, "rng": rng, "config": {"a": [1, 2.5, "x", None]}}
    path = str(tmp_path / "c.pt")
    ck.save_checkpoint(state, path)
    raw = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert raw["format"] == ck.FORMAT and raw["iteration"] == 7
    got = ck.load_checkpoint(path)
    ck.restore_rng(got["rng"])
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(ValueError, match="state"):
        ck.save_checkpoint([1], path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ck.load_checkpoint(str(tmp_path / "missing.pt"))


def test_find_latest_skips_a_corrupt_latest(tmp_path):
    ck.save_checkpoint({"model": {}, "iteration": 4}, str(tmp_path / "latest.pt"))
    ck.keep_snapshot(str(tmp_path / "latest.pt"), 4, keep=2)
    ck.save_checkpoint({"model": {}, "iteration": 6}, str(tmp_path / "latest.pt"))
    ck.keep_snapshot(str(tmp_path / "latest.pt"), 6, keep=2)
    assert ck.find_latest(str(tmp_path)) == str(tmp_path / "latest.pt")
    (tmp_path / "junk").write_bytes(b"garbage, not a zip")  # a new file: latest.pt is a hard link of the snapshot
    os.replace(tmp_path / "junk", tmp_path / "latest.pt")
    assert ck.find_latest(str(tmp_path)) == str(tmp_path / "ckpt_00000006.pt")
    assert ck.load_checkpoint(str(tmp_path / "ckpt_00000004.pt"))["iteration"] == 4  # the hard link kept old data
    assert ck.find_latest(str(tmp_path / "empty")) is None


def test_keyed_dataset_seeds_the_cpu_generator_only(monkeypatch):
    """Each training item is drawn from the CPU generator seeded with its key;
    the process's CPU state is restored and the CUDA generators are never
    reseeded (torch.manual_seed would, so OIM's sampled negatives on CUDA
    followed the last item's seed)."""
    from personvlad.engine.trainer import _KeyedDataset

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: reseeded.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: reseeded.append(s))
    ds = _KeyedDataset([None] * 3)
    ds.ds = type("D", (), {"__getitem__": lambda self, i: torch.rand(4) + i, "__len__": lambda self: 3})()
    before = torch.get_rng_state()
    a, b = ds[(1, 1234)], ds[(1, 1234)]
    assert torch.equal(a, b) and torch.equal(a, torch.rand(4, generator=torch.Generator().manual_seed(1234)) + 1)
    assert torch.equal(torch.get_rng_state(), before) and reseeded == []


def test_resume_with_no_loadable_checkpoint_is_refused(synth_root, tmp_path):
    """Checkpoint files that do not load must not be overwritten by a fresh
    start: --resume says so (and so does a run without --resume)."""
    from personvlad.engine.trainer import train

    out = tmp_path / "run"
    out.mkdir()
    (out / "latest.pt").write_bytes(b"truncated")
    (out / "ckpt_00000004.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"out_dir: --resume found no loadable checkpoint among .*latest\.pt.*"
                                         r"ckpt_00000004\.pt"):
        train(small_cfg(synth_root), str(out), resume=True)
    with pytest.raises(ValueError, match=r"out_dir: .* already holds checkpoint files .*latest\.pt"):
        train(small_cfg(synth_root), str(out))
    assert (out / "latest.pt").read_bytes() == b"truncated"  # untouched


def test_cli_resume_takes_the_checkpoints_config_over_config_yaml(tmp_path, monkeypatch):
    """A truncated config.yaml (a crash while it was written by an older
    version) must not silently change the schedule of a resumed run: the
    checkpoint's config wins; config.yaml serves only before a checkpoint."""
    import argparse

    from personvlad.engine import cli as ecli
    from personvlad.engine import trainer as tr

    cfg = small_cfg(tmp_path / "data", schedule={"step1_iters": 8, "step2_iters": 4})
    out = tmp_path / "run"
    out.mkdir()
    text = cfg.to_yaml()
    (out / "config.yaml").write_text(text[: len(text) // 2].rsplit("\n", 1)[0] + "\n")  # cut at a line
    seen = []
    monkeypatch.setattr(tr, "train", lambda c, o, **kw: seen.append(c) or {
        "out_dir": o, "iterations": 0, "first_loss": None, "last_loss": None, "best": None, "metrics": {}})
    parser = argparse.ArgumentParser()
    ecli.register(parser.add_subparsers(dest="command"))

    def run():
        args = parser.parse_args(["train", "--out", str(out), "--resume", "--no-progress"])
        assert args.func(args) == 0
        return seen.pop()

    # before the first checkpoint: config.yaml is all there is
    assert run().schedule.step1_iters != 8  # the truncated file's defaults (why it must not win later)
    ck.save_checkpoint({"config": cfg.to_dict(), "iteration": 4, "model": {}}, str(out / "latest.pt"))
    got = run()
    assert got.to_dict() == cfg.to_dict()


_SAVE_SCRIPT = r"""
import sys, time
from personvlad.engine import checkpoint as ck
import torch
def hook(tmp, dst):
    print("WRITTEN", tmp, flush=True)
    time.sleep(60)
ck._before_replace = hook
ck.save_checkpoint({"model": {"w": torch.full((1000,), 2.0)}, "iteration": 2}, sys.argv[1])
"""


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    path = str(tmp_path / "latest.pt")
    ck.save_checkpoint({"model": {"w": torch.full((1000,), 1.0)}, "iteration": 1}, path)
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_SCRIPT, path], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stdout.readline()
        assert line.startswith("WRITTEN"), line
        tmp = line.split()[1]
        assert os.path.exists(tmp) and os.path.getsize(tmp) > 0  # new data fully written, not yet replaced
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    st = ck.load_checkpoint(path)
    assert st["iteration"] == 1 and torch.equal(st["model"]["w"], torch.full((1000,), 1.0))
    assert ck.find_latest(str(tmp_path)) == path


# ----------------------------------------------------------------- training
@pytest.fixture(scope="module")
def short_run(synth_root, tmp_path_factory):
    """A short real training run of the tiny model (reduced input) plus the
    untrained model's scores, shared by several tests."""
    from personvlad.engine.extract import evaluate_model
    from personvlad.engine.trainer import load_dataset, train
    from personvlad.models import PersonVLADNet

    # exactly configs/synthetic-tiny.yaml (240 iterations), in-process, no workers
    cfg = TrainConfig.from_yaml(os.path.join(REPO, "configs", "synthetic-tiny.yaml")).apply_overrides(
        [f"data.root={synth_root}", "data.workers=0", "log.progress=false", "log.tensorboard=false",
         "log.ckpt_every=0", "device=cpu"])
    torch.manual_seed(0)
    untrained = evaluate_model(PersonVLADNet(cfg.model_config()), load_dataset(cfg), workers=0)
    out = tmp_path_factory.mktemp("run") / "short"
    summary = train(cfg, str(out))
    return cfg, out, summary, untrained


def test_short_run_lowers_loss_and_beats_untrained(short_run):
    cfg, out, summary, untrained = short_run
    hist = summary["history"]
    assert summary["iterations"] == 240 and len(hist) == 24
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"], hist
    trained = summary["metrics"]
    assert trained["standard"]["rank1"] > untrained["standard"]["rank1"] + 0.1, (trained, untrained)
    assert trained["standard"]["mAP"] > untrained["standard"]["mAP"] + 0.05, (trained, untrained)
    for f in ("latest.pt", "best.pt", "train_log.csv", "eval_log.csv", "config.yaml"):
        assert (out / f).exists(), f
    st = ck.load_checkpoint(str(out / "latest.pt"))
    assert st["iteration"] == 240 and st["step"] == 2 and st["version"]
    assert set(st["loss"]) >= {"lut", "queue", "queue_ptr", "queue_filled"}
    assert {"python", "numpy", "torch", "cuda"} <= set(st["rng"])
    assert TrainConfig.from_dict(st["config"]).to_dict() == cfg.to_dict()
    best = ck.load_checkpoint(str(out / "best.pt"))
    assert best["best"]["value"] == st["best"]["value"] >= 0  # best.pt holds the best evaluation so far


def test_step1_freezes_centers_and_refuses_existing_out(short_run, synth_root, tmp_path):
    from personvlad.engine.trainer import _step_params, train
    from personvlad.losses import OIMLoss
    from personvlad.models import PersonVLADNet

    cfg = short_run[0]
    model = PersonVLADNet(cfg.model_config())
    crit = OIMLoss(model.output_dim, 4)
    p1 = _step_params(model, crit, 1, cfg)
    centers = {id(p) for p in model.center_parameters()}
    assert centers and not centers & {id(p) for p in p1}
    assert all(not p.requires_grad for p in model.center_parameters())
    p2 = _step_params(model, crit, 2, cfg)
    assert centers <= {id(p) for p in p2}
    with pytest.raises(ValueError, match="already holds checkpoint files"):
        train(cfg, str(short_run[1]))


def test_extract_feature_file(short_run, tmp_path):
    from personvlad.data.readers import MARS
    from personvlad.engine.extract import describe_frames, extract_features, load_model_from_checkpoint

    cfg, out, _, _ = short_run
    model = load_model_from_checkpoint(str(out / "latest.pt"))
    ds = MARS(cfg.data.root)
    npz = str(tmp_path / "f.npz")
    extract_features(model, ds, npz, include_train=True, batch_size=16, workers=0, progress=False,
                     meta={"dataset": "mars", "checkpoint": "latest.pt"})
    f = np.load(npz)
    D = model.output_dim
    for split, tr in (("query", ds.query), ("gallery", ds.gallery), ("train", ds.train)):
        n = len(tr)
        feats, clip_feats, counts = f[f"{split}_feats"], f[f"{split}_clip_feats"], f[f"{split}_clip_counts"]
        assert feats.shape == (n, D) and feats.dtype == np.float32
        assert f[f"{split}_pids"].dtype == np.int64 and f[f"{split}_camids"].dtype == np.int64
        assert f[f"{split}_pids"].tolist() == [t[1] for t in tr] and f[f"{split}_camids"].tolist() == [t[2] for t in tr]
        assert counts.dtype == np.int64 and counts.sum() == clip_feats.shape[0] and clip_feats.shape[1] == D
        assert f[f"{split}_first_frame"].tolist() == [t[0][0] for t in tr]
        # tracklet activation = mean of its clip descriptors, L2-normalised
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        i = int(np.argmax(counts))
        m = clip_feats[starts[i]:starts[i] + counts[i]].mean(0)
        np.testing.assert_allclose(feats[i], m / np.linalg.norm(m), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # clips every 8 frames: a tracklet of L >= T frames has (L - T) // 8 + 1 clips
    T = model.config.clip_len
    assert [int(c) for c in f["query_clip_counts"]] == \
        [1 if len(t[0]) <= T else (len(t[0]) - T) // 8 + 1 for t in ds.query]
    meta = json.loads(str(f["meta"]))
    assert meta["dataset"] == "mars" and meta["model_config"]["preset"] == "tiny"
    # describe_frames gives the same activation for one tracklet, from the checkpoint path
    v = describe_frames(str(out / "latest.pt"), ds.query[0][0], device="cpu")
    assert v.shape == (D,) and v.dtype == np.float32
    np.testing.assert_allclose(v, f["query_feats"][0], atol=1e-5)


def test_extract_cli(short_run, tmp_path):
    from personvlad.engine.cli import main

    cfg, out, _, _ = short_run
    npz = str(tmp_path / "cli.npz")
    rc = main(["extract", "--checkpoint", str(out / "best.pt"), "--dataset", "mars", "--root", cfg.data.root,
               "--out", npz, "--workers", "0", "--no-progress", "--device", "cpu"])
    assert rc == 0
    f = np.load(npz)
    assert f["query_feats"].shape[0] > 0 and "train_feats" not in f.files
    # the MATLAB kit's MARS gallery: the queries are gallery tracks too
    kit = str(tmp_path / "kit.npz")
    assert main(["extract", "--checkpoint", str(out / "best.pt"), "--dataset", "mars", "--root", cfg.data.root,
                 "--out", kit, "--workers", "0", "--no-progress", "--device", "cpu", "--mars-kit-gallery"]) == 0
    k = np.load(kit)
    nq, ng = f["query_feats"].shape[0], f["gallery_feats"].shape[0]
    assert k["gallery_feats"].shape[0] == ng + nq and json.loads(str(k["meta"]))["mars_kit_gallery"] is True
    np.testing.assert_array_equal(k["query_feats"], f["query_feats"])
    with pytest.raises(SystemExit, match="MARS only"):
        main(["extract", "--checkpoint", str(out / "best.pt"), "--dataset", "prid", "--root", cfg.data.root,
              "--out", kit, "--mars-kit-gallery"])
    # a bad output name is refused before any extraction; a directory is one too
    from personvlad.engine.extract import extract_features, extract_split, load_model_from_checkpoint

    model = load_model_from_checkpoint(str(out / "best.pt"))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    for bad in (str(tmp_path / "feats.txt"), str(tmp_path)):
        with pytest.raises(ValueError, match="out_path"):
            extract_features(model, None, bad)
    assert not calls
    with pytest.raises(ValueError, match="clip_len: expected None"):
        extract_split(model, [(("frame.jpg",), 0, 0)], clip_len=0)  # was: the model's clip length, silently


def _run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", _cli_module()] + args, env=_env(), cwd=REPO,
                          capture_output=True, text=True, **kw)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_kill_and_resume_matches_uninterrupted(synth_root, tmp_path, backend):
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not built here")
    cfg = small_cfg(synth_root, schedule={"step1_iters": 14, "step2_iters": 6},
                    loss={"num_sampled": 5}, optim={"grad_clip": 5.0}, model={"backend": backend})
    cfg_path = str(tmp_path / "cfg.yaml")
    cfg.save_yaml(cfg_path)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = _run_cli(["train", "--config", cfg_path, "--out", str(ref), "--no-progress"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, "-m", _cli_module(), "train", "--config", cfg_path, "--out", str(killed),
                             "--no-progress"], env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log_csv = killed / "train_log.csv"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if log_csv.exists() and len(log_csv.read_text().splitlines()) - 1 >= 9:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    st = ck.load_checkpoint(ck.find_latest(str(killed)))
    assert 0 < st["iteration"] < 20
    r = _run_cli(["train", "--out", str(killed), "--resume", "--no-progress"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    a = ck.load_checkpoint(str(ref / "latest.pt"))
    b = ck.load_checkpoint(str(killed / "latest.pt"))
    assert a["iteration"] == b["iteration"] == 20 and a["step"] == b["step"] == 2
    # the log has each iteration once, as the uninterrupted run's: rows the
    # killed run wrote after its last checkpoint were dropped on resume
    def rows(run):
        import csv

        with open(run / "train_log.csv", newline="") as f:
            return [(r["iteration"], r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]

    assert [r[0] for r in rows(killed)] == [str(i) for i in range(1, 21)]
    assert rows(killed) == rows(ref)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["loss"]:
        assert torch.equal(a["loss"][k], b["loss"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


# ----------------------------------------------------------------- DDP (gloo, 2 processes)
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict, out, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from personvlad.engine.trainer import train

    s = train(TrainConfig.from_dict(cfg_dict), out)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"loss": s["loss_checksum"], "model": s["model_checksum"], "world": s["world_size"],
                   "iterations": s["iterations"]}, f)


def _drain_worker(rank, world, port, result_dir):
    import weakref

    import torch.distributed as dist

    from personvlad.engine import distributed as dm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    refs = []
    for i in range(4):  # tensors made in Python, dropped by Python at once
        t = torch.full((3,), float(rank + i))
        refs.append(weakref.ref(t))
        dist.all_reduce(t)
        del t
    dist.barrier()
    ok = dm.drain_gloo()
    held = sum(r() is not None for r in refs)  # still held by a gloo worker thread
    dist.destroy_process_group()
    with open(os.path.join(result_dir, f"drain{rank}.json"), "w") as f:
        json.dump({"ok": ok, "held": held}, f)


def test_gloo_drain_releases_every_collective(tmp_path):
    """drain_gloo() returns True on both ranks (every gloo worker thread seen
    releasing a sentinel, same round count on both ranks, else the all-reduce
    would hang) and afterwards no tensor of an earlier collective is held."""
    import torch.multiprocessing as mp

    mp.spawn(_drain_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        assert json.loads((tmp_path / f"drain{r}.json").read_text()) == {"ok": True, "held": 0}


def test_cleanup_makes_the_caller_say_whether_to_drain():
    """The drain is a collective: a failure-path caller that forgot the
    argument would wait on ranks that may be gone, so there is no default."""
    import inspect

    from personvlad.engine import distributed as dm

    param = inspect.signature(dm.cleanup).parameters["drain"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        dm.cleanup(dm.DistInfo())
    dm.cleanup(dm.DistInfo(), drain=True)  # not set up here: nothing to tear down, no collective


def test_ddp_two_processes_gloo(synth_root, tmp_path):
    import torch.multiprocessing as mp

    cfg = small_cfg(synth_root, deterministic=False, schedule={"step1_iters": 3, "step2_iters": 2},
                    log={"ckpt_every": 0})
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), out, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2 and r0["iterations"] == 5
    assert r0["loss"] == r1["loss"]  # OIM table/queue identical on both ranks
    assert r0["model"] == r1["model"]  # DDP kept the weights in sync
    st = ck.load_checkpoint(os.path.join(out, "latest.pt"))
    assert st["world_size"] == 2 and len(st["rng_ranks"]) == 2
    # rank 0 alone wrote: one log header
    assert open(os.path.join(out, "train_log.csv")).read().count("iteration") == 1


# ----------------------------------------------------------------- timings and schedule projection
def test_run_timings_account_for_every_iteration_and_save(short_run):
    """The summary's timings: every iteration once (warm-up or steady, per
    step), one checkpoint time per latest.pt save, one evaluation time per
    evaluation, all positive and within the run's total."""
    cfg, _, summary, _ = short_run
    t = summary["timings"]
    s1, s2 = cfg.schedule.step1_iters, cfg.schedule.step2_iters
    for step, n in (("1", s1), ("2", s2)):
        w, st = t["warmup"][step], t["steady"][step]
        assert w["iterations"] == t["warmup_iterations"] == 10 and w["iterations"] + st["iterations"] == n
        assert w["seconds"] > 0 and st["seconds"] > 0
    assert len(t["checkpoint_s"]) == 2  # ckpt_every=0: end of step 1, end of run
    assert len(t["eval_s"]) == 2 and all(x > 0 for x in t["eval_s"])
    assert t["kmeans_s"] > 0 and t["setup_s"] > 0
    parts = (t["kmeans_s"] + t["setup_s"] + sum(t["checkpoint_s"]) + sum(t["eval_s"])
             + sum(t[k][s]["seconds"] for k in ("warmup", "steady") for s in ("1", "2")))
    assert parts <= t["total_s"]


def test_projection_of_a_run_onto_its_own_schedule_is_its_measured_time(short_run):
    """Projected onto the schedule it ran, a run's timings give back exactly
    what it measured: the steady rate x iterations + the warm-up excess is
    the measured iteration time; checkpoints and evaluations likewise."""
    from personvlad.engine.estimate import project_schedule

    cfg, _, summary, _ = short_run
    t = summary["timings"]
    p = project_schedule(t, cfg)
    it_s = sum(t[k][s]["seconds"] for k in ("warmup", "steady") for s in ("1", "2"))
    c = p["components"]
    assert c["iterations"] + c["warmup_excess"] == pytest.approx(it_s, rel=1e-9)
    assert c["checkpoints"] == pytest.approx(sum(t["checkpoint_s"]))
    assert c["evaluations"] == pytest.approx(sum(t["eval_s"])) and p["evaluations_included"]
    assert (c["kmeans"], c["setup"]) == (t["kmeans_s"], t["setup_s"])
    assert p["total_s"] == pytest.approx(sum(c.values())) and p["notes"] == []
    assert p["clips"] == 240 * 16 and p["checkpoints"] == 2 == p["evaluations"]


def test_projection_arithmetic_for_the_paper_schedule():
    """Hand-made timings onto the paper schedule (50K + 10K iterations of 15
    clips, checkpoints every 1000): exact components."""
    from personvlad.engine.estimate import format_projection, project_schedule

    cfg = TrainConfig()
    t = dict(warmup_iterations=10, kmeans_s=4.0, setup_s=2.0,
             warmup={"1": {"iterations": 10, "seconds": 3.0}, "2": {"iterations": 10, "seconds": 0.5}},
             steady={"1": {"iterations": 90, "seconds": 1.8}, "2": {"iterations": 30, "seconds": 0.75}},
             checkpoint_s=[0.1, 0.3], eval_s=[], total_s=20.0)
    p = project_schedule(t, cfg)
    assert p["s_per_iteration"] == {"1": pytest.approx(0.02), "2": pytest.approx(0.025)}
    assert p["clips_per_s"]["1"] == pytest.approx(15 / 0.02)
    c = p["components"]
    assert c["iterations"] == pytest.approx(50_000 * 0.02 + 10_000 * 0.025)
    assert c["warmup_excess"] == pytest.approx((3.0 - 10 * 0.02) + (0.5 - 10 * 0.025))
    assert p["checkpoints"] == 60 and c["checkpoints"] == pytest.approx(60 * 0.2)
    assert c["evaluations"] is None and not p["evaluations_included"] and p["evaluations"] == 2
    assert p["total_s"] == pytest.approx(2 + 4 + 1250 + 2.8 + 0.25 + 12)
    text = format_projection({"projection": p}, "paper")
    assert "50000 + 10000 iterations x 15 clips = 900,000 clips" in text and "= 21.2 min" in text
    # one step not measured: the other's rate, said in a note
    t2 = dict(t, steady={"1": {"iterations": 90, "seconds": 1.8}, "2": {"iterations": 0, "seconds": 0.0}})
    p2 = project_schedule(t2, cfg)
    assert p2["s_per_iteration"]["2"] == pytest.approx(0.02) and any("step 2" in n for n in p2["notes"])
    # a step measured at 0 s (a clock too coarse for it) prints without a rate (was a KeyError)
    p3 = project_schedule(dict(t, steady={"1": {"iterations": 90, "seconds": 1.8}, "2": {"iterations": 30,
                                                                                        "seconds": 0.0}}), cfg)
    assert "2" not in p3["clips_per_s"] and "step 2: 0.0 ms/iteration (clips/s not measured)" in format_projection(
        {"projection": p3})
    with pytest.raises(ValueError, match="no steady-state iteration"):
        project_schedule(dict(t, steady={"1": {"iterations": 0, "seconds": 0}, "2": {"iterations": 0, "seconds": 0}}),
                         cfg)
    with pytest.raises(ValueError, match="^timings"):
        project_schedule({}, cfg)
    with pytest.raises(ValueError, match="^config"):
        project_schedule(t, {})


def test_estimate_cli_projects_without_evaluating(synth_root, tmp_path, capsys):
    """``personvlad train --estimate N``: a probe in --out (kept), no
    evaluation, no best.pt, the projection printed; bad N is refused."""
    from personvlad.engine.cli import main

    cfg = small_cfg(synth_root)
    path = tmp_path / "cfg.yaml"
    cfg.save_yaml(str(path))
    out = tmp_path / "probe"
    rc = main(["train", "--config", str(path), "--out", str(out), "--estimate", "30", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "schedule test: 8 + 4 iterations x 8 clips = 96 clips" in text and "projected total:" in text
    proj = json.loads(text[text.index("{"):])
    assert proj["iterations"] == {"1": 8, "2": 4} and not proj["evaluations_included"]
    assert (out / "latest.pt").exists() and not (out / "best.pt").exists()
    st = ck.load_checkpoint(str(out / "latest.pt"))
    assert st["iteration"] == 32  # the probe: 30 split 8:4 -> 20 + 10, at least 12 per step
    rc = main(["train", "--config", str(path), "--out", str(tmp_path / "bad"), "--estimate", "5"])
    assert rc == 2 and "iters: expected an int >= 24" in capsys.readouterr().err
    # options that would be silently ignored, or a run of no iterations, are refused
    for extra, msg in ((["--estimate", "30", "--stop-after", "5"], "does not take --stop-after"),
                       (["--estimate-eval"], "--estimate-eval goes with --estimate"),
                       (["--stop-after", "0"], "--stop-after: expected >= 1")):
        rc = main(["train", "--config", str(path), "--out", str(tmp_path / "bad2")] + extra)
        assert rc == 2 and msg in capsys.readouterr().err, extra
    assert not (tmp_path / "bad2").exists()


def test_shard_data_path_trains_and_resumes_bitwise(synth_root, tmp_path):
    """data.shards: training clips from a `personvlad pack` store (no JPEG
    decoding).  A run stopped and resumed equals an uninterrupted one
    bitwise (batch i is the same either way); a store at the wrong size or a
    missing one is refused with the fix."""
    from personvlad.data import MARS
    from personvlad.data.shards import pack_dataset
    from personvlad.engine.trainer import train

    store = tmp_path / "shards"
    pack_dataset(MARS(str(synth_root)), str(store), size=(32, 16))
    over = dict(data={"shards": str(store), "workers": 2}, log={"log_every": 1, "ckpt_every": 0, "progress": False,
                                                                "tensorboard": False})
    full = train(small_cfg(synth_root, **over), str(tmp_path / "full"), evaluate=False)
    part = train(small_cfg(synth_root, **over), str(tmp_path / "split"), stop_after=5, evaluate=False)
    assert part["iterations"] == 5
    rest = train(small_cfg(synth_root, **over), str(tmp_path / "split"), resume=True, evaluate=False)
    assert rest["iterations"] == full["iterations"] == 12
    assert rest["model_checksum"] == full["model_checksum"] and rest["loss_checksum"] == full["loss_checksum"]
    assert [h["loss"] for h in part["history"] + rest["history"]] == [h["loss"] for h in full["history"]]
    # the JPEG path trains on other random draws: a different model
    jpeg = train(small_cfg(synth_root, log=over["log"]), str(tmp_path / "jpeg"), evaluate=False)
    assert jpeg["model_checksum"] != full["model_checksum"]

    with pytest.raises(ValueError, match=r"data.shards: .* holds 32x16 frames, the model takes 64x32; "
                                         r"pack it with `personvlad pack --size 64x32`"):
        bad = small_cfg(synth_root, data={"shards": str(store)})
        bad.model["height"], bad.model["width"] = 64, 32
        train(bad, str(tmp_path / "bad"), evaluate=False)
    with pytest.raises(ValueError, match="data.shards: .*index.npz: expected the shard index"):
        train(small_cfg(synth_root, data={"shards": str(tmp_path / "nowhere")}), str(tmp_path / "bad2"))
    # Another split of the same data set has the same counts (every iLIDS-VID
    # and PRID split does): here the same tracklets with the ids moved round
    # by one.  Its store must be refused, not train on the other split.
    import types

    from personvlad.engine.trainer import _open_shards

    cfg = small_cfg(synth_root, data={"shards": str(store)})
    ds = MARS(str(synth_root))
    assert _open_shards(ds, cfg, cfg.model_config()) is not None
    pids = [t[1] for t in ds.train]
    moved = types.SimpleNamespace(train=[(t[0], pids[(i + 1) % len(pids)], t[2]) for i, t in enumerate(ds.train)],
                                  num_train_pids=ds.num_train_pids)
    with pytest.raises(ValueError, match=r"data.shards: .* was packed from another data set or split: its "
                                         r"training tracklet \d+ is id \d+, \d+ frames from "):
        _open_shards(moved, cfg, cfg.model_config())


def test_compiled_model_trains_and_checkpoints_load_uncompiled(synth_root, tmp_path):
    """compile=default: the model (not the loss) is torch.compile'd in place;
    training runs, and the checkpoint loads into a plain model.  CUDA-graph
    modes are refused."""
    from personvlad.engine.trainer import train
    from personvlad.models import PersonVLADNet

    cfg = small_cfg(synth_root, compile="default", schedule={"step1_iters": 4, "step2_iters": 2})
    s = train(cfg, str(tmp_path / "c"), evaluate=False)
    assert s["iterations"] == 6 and all(math.isfinite(h["loss"]) for h in s["history"])
    st = ck.load_checkpoint(str(tmp_path / "c" / "latest.pt"))
    assert not any("_orig_mod" in k for k in st["model"])
    PersonVLADNet(cfg.model_config()).load_state_dict(st["model"])
    with pytest.raises(ValueError, match="compile"):
        small_cfg(synth_root, compile="reduce-overhead")


def test_non_finite_loss_is_caught_before_the_next_checkpoint(synth_root, tmp_path, monkeypatch):
    """The loss is read back only at log / checkpoint / evaluation points (no
    sync per iteration); a NaN from iteration 3 on is reported at the next
    of them (iteration 4 here), and no checkpoint of the broken model is
    written."""
    from personvlad.engine import trainer as tr

    orig = tr._TrainModule.forward
    calls = {"n": 0}

    def forward(self, clips, pids):
        calls["n"] += 1
        out = orig(self, clips, pids)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(tr._TrainModule, "forward", forward)
    cfg = small_cfg(synth_root, log={"log_every": 4, "ckpt_every": 2, "progress": False, "tensorboard": False},
                    schedule={"kmeans_init": False})
    with pytest.raises(FloatingPointError, match=r"loss became nan in iterations 1\.\.4; lower the lr"):
        tr.train(cfg, str(tmp_path / "nan"), evaluate=False)
    assert ck.load_checkpoint(str(tmp_path / "nan" / "latest.pt"))["iteration"] == 2


@pytest.mark.cuda
def test_training_step_makes_no_device_sync():
    """One training step as the trainer runs it (bf16 autocast, channels_last,
    OIM with host labels, fused Adam), after warm-up, under
    torch.cuda.set_sync_debug_mode("error"): any device-to-host sync raises."""
    from personvlad.engine.trainer import _step_params, _TrainModule, build_optimizer
    from personvlad.losses import OIMLoss
    from personvlad.models import build_model

    dev = torch.device("cuda")
    model = build_model("tiny").to(dev).to(memory_format=torch.channels_last_3d)
    cfg = TrainConfig()
    crit = OIMLoss(model.output_dim, 8, queue_size=16).to(dev)
    opt = build_optimizer(_step_params(model, crit, 2, cfg), cfg, 1e-4, dev)
    net = _TrainModule(model, crit, None, 0.0, torch.bfloat16)
    c = model.config
    clips = torch.rand(8, 3, c.clip_len, c.height, c.width, device=dev).contiguous(
        memory_format=torch.channels_last_3d)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, -1]).pin_memory()

    def step():
        loss = net(clips, pids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            last = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(last).item()


@pytest.mark.parametrize("loss", [{"name": "softmax", "triplet_weight": 0.5}, {"name": "triplet"},
                                  {"name": "oim", "triplet_weight": 0.3}])
def test_other_losses_train(synth_root, tmp_path, loss):
    """The comparison losses (labels moved to the device for them) and OIM
    with an added triplet term train through the same loop."""
    from personvlad.engine.trainer import train

    cfg = small_cfg(synth_root, loss=loss, schedule={"kmeans_init": False, "step1_iters": 3, "step2_iters": 2})
    s = train(cfg, str(tmp_path / "run"), evaluate=False)
    assert s["iterations"] == 5 and all(math.isfinite(h["loss"]) for h in s["history"])


def test_fused_epilogues_train_with_the_same_parameters(synth_root, tmp_path, caplog):
    """fuse_epilogues=true: the backbone's conv + bias + ReLU (+ pool) run as
    FusedConv3d (Triton kernel on a GPU, its eager composition here); the
    parameters and checkpoint keys are the plain model's, and the first
    loss equals the unfused run's (same initialisation, same batch)."""
    from personvlad.engine.trainer import train
    from personvlad.models import PersonVLADNet

    base = dict(schedule={"kmeans_init": False, "step1_iters": 3, "step2_iters": 1})
    plain = train(small_cfg(synth_root, **base), str(tmp_path / "plain"), evaluate=False)
    cfg = small_cfg(synth_root, fuse_epilogues=True, **base)
    with caplog.at_level("INFO", logger="personvlad"):
        fused = train(cfg, str(tmp_path / "fused"), evaluate=False)
    import re

    n = [int(m.group(1)) for m in re.finditer(r"epilogues of (\d+) convolutions", caplog.text)]
    assert n and n[0] >= 5, caplog.text  # the tiny backbone's convolutions
    assert fused["iterations"] == 4
    assert fused["history"][0]["loss"] == pytest.approx(plain["history"][0]["loss"], rel=1e-5)
    st = ck.load_checkpoint(str(tmp_path / "fused" / "latest.pt"))
    PersonVLADNet(cfg.model_config()).load_state_dict(st["model"])
