"""Engine input validation: TrainConfig field checks, extraction of empty
tracklets, and the atomic writer's temporary files and file modes."""
import copy
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from personvlad.engine import checkpoint as ck
from personvlad.engine.config import DataConfig, LossConfig, OptimConfig, TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = {
    "name": "t", "device": "cpu",
    "model": {"preset": "tiny", "height": 32, "width": 16, "backend": "reference"},
    "data": {"dataset": "synthetic", "root": "/nonexistent", "num_ids": 4, "num_per_id": 2, "workers": 0},
    "loss": {"queue_size": 16}, "optim": {},
    "schedule": {"step1_iters": 2, "step2_iters": 1},
    "log": {"progress": False, "tensorboard": False},
}


def _cfg_dict(key=None, value=None):
    d = copy.deepcopy(BASE)
    if key is not None:
        *sections, last = key.split(".")
        node = d
        for s in sections:
            node = node.setdefault(s, {})
        node[last] = value
    return d


# ----------------------------------------------------------------- config
@pytest.mark.parametrize("key, value", [
    ("seed", -1), ("seed", 2 ** 63), ("seed", 2 ** 70),
    ("data.synth_seed", -1), ("data.synth_seed", 2 ** 64),
    ("optim.weight_decay", -1.0), ("optim.weight_decay", float("nan")), ("optim.weight_decay", float("inf")),
    ("loss.margin", -1.0), ("loss.margin", float("nan")), ("loss.margin", float("inf")),
    ("loss.triplet_weight", -1.0), ("loss.triplet_weight", float("nan")),
    ("data.synth_preset", "bogus"), ("data.synth_preset", ""),
    ("device", "cuda:abc"), ("device", "cuda:"), ("device", "cuda:-1"), ("device", "cuda: 1"), ("device", "gpu"),
    ("data.num_ids", "5"), ("data.num_ids", 5.0), ("data.num_ids", True), ("seed", 1.5),
    ("optim.weight_decay", "abc"), ("loss.margin", True), ("device", 0),
])
def test_from_dict_refuses_bad_values_naming_the_key(key, value):
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict(_cfg_dict(key, value))
    msg = str(e.value)
    assert msg.startswith(f"{key}: expected "), msg


@pytest.mark.parametrize("key, value", [
    ("seed", 0), ("seed", 2 ** 63 - 1), ("data.synth_seed", 0), ("data.synth_seed", 12345),
    ("optim.weight_decay", 0.0), ("optim.weight_decay", 5e-4), ("optim.weight_decay", 0),
    ("loss.margin", 0.0), ("loss.margin", 1), ("loss.triplet_weight", 0.0), ("loss.triplet_weight", 2.5),
    ("device", "cuda:0"), ("device", "cuda:12"), ("device", "cuda"), ("device", "auto"),
])
def test_from_dict_accepts_valid_edge_values(key, value):
    cfg = TrainConfig.from_dict(_cfg_dict(key, value))
    node = cfg
    for p in key.split("."):
        node = getattr(node, p)
    assert node == value


def test_every_synth_preset_is_accepted():
    from personvlad.data.synth import PRESETS

    assert PRESETS
    for name in PRESETS:
        assert TrainConfig.from_dict(_cfg_dict("data.synth_preset", name)).data.synth_preset == name


def test_largest_accepted_seed_works_with_the_seeded_generators():
    """The range's upper end is usable by what the trainer seeds (torch, numpy)."""
    seed = TrainConfig.from_dict(_cfg_dict("seed", 2 ** 63 - 1)).seed
    torch.Generator().manual_seed(seed)
    torch.Generator().manual_seed(seed + 7919)
    np.random.default_rng([seed, 1]).integers(10)
    np.random.SeedSequence([seed, 1, 0, 0]).generate_state(2, dtype=np.uint64)


@pytest.mark.parametrize("make, key", [
    (lambda: TrainConfig(data=DataConfig(num_ids="5")), "data.num_ids"),
    (lambda: TrainConfig(data=DataConfig(num_ids=5.0)), "data.num_ids"),
    (lambda: TrainConfig(data=DataConfig(workers=True)), "data.workers"),
    (lambda: TrainConfig(data=DataConfig(flip_p="0.5")), "data.flip_p"),
    (lambda: TrainConfig(data=DataConfig(root=None)), "data.root"),
    (lambda: TrainConfig(optim=OptimConfig(eps="1e-4")), "optim.eps"),
    (lambda: TrainConfig(optim=OptimConfig(weight_decay=None)), "optim.weight_decay"),
    (lambda: TrainConfig(optim=OptimConfig(betas=["a", 0.9])), "optim.betas[0]"),
    (lambda: TrainConfig(loss=LossConfig(num_sampled=2.0)), "loss.num_sampled"),
    (lambda: TrainConfig(loss=LossConfig(margin=-0.5)), "loss.margin"),
    (lambda: TrainConfig(seed="x"), "seed"),
    (lambda: TrainConfig(seed=-3), "seed"),
    (lambda: TrainConfig(deterministic=1), "deterministic"),
    (lambda: TrainConfig(device=0), "device"),
    (lambda: TrainConfig(data={"num_ids": 5}), "data"),
])
def test_direct_construction_type_errors_are_value_errors(make, key):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value).startswith(f"{key}: expected "), str(e.value)


def test_direct_construction_accepts_ints_for_float_fields():
    c = TrainConfig(optim=OptimConfig(weight_decay=0, betas=(0.9, 0.99)), loss=LossConfig(margin=1))
    assert c.optim.weight_decay == 0 and c.loss.margin == 1


def test_validate_catches_values_set_after_construction():
    c = TrainConfig.from_dict(_cfg_dict())
    c.loss.margin = float("nan")
    with pytest.raises(ValueError, match=r"^loss\.margin: expected "):
        c.validate()
    c.loss.margin = 0.3
    c.data.num_ids = "4"
    with pytest.raises(ValueError, match=r"^data\.num_ids: expected an int"):
        c.validate()


def test_yaml_numbers_still_load(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 7\noptim: {weight_decay: 0, eps: 1e-4}\nloss: {margin: 1, triplet_weight: 0}\n"
                 "data: {synth_seed: 3}\ndevice: cuda:1\n")
    c = TrainConfig.from_yaml(str(p))
    assert c.seed == 7 and c.data.synth_seed == 3 and c.device == "cuda:1"
    for v in (c.optim.weight_decay, c.optim.eps, c.loss.margin, c.loss.triplet_weight):
        assert isinstance(v, float)
    assert c.optim.eps == 1e-4 and c.loss.margin == 1.0
    q = tmp_path / "d.yaml"
    c.save_yaml(str(q))
    assert TrainConfig.from_yaml(str(q)).to_dict() == c.to_dict()
    p.write_text("optim: {weight_decay: -0.1}\n")
    with pytest.raises(ValueError, match=r"optim\.weight_decay: expected a finite number >= 0"):
        TrainConfig.from_yaml(str(p))


def test_saved_configs_keep_how_they_trained(tmp_path, caplog):
    """A run saved before loss.skip_unwritten existed left OIM's unwritten
    queue slots out: read as a saved config (a checkpoint's, or its
    config.yaml) it keeps doing so; a new config takes today's default; and
    resuming such a checkpoint under a config that counts them is warned
    about by name."""
    import logging

    from personvlad.engine.trainer import _warn_config_changes

    old = _cfg_dict()
    assert "skip_unwritten" not in old["loss"]
    assert TrainConfig.from_dict(old, saved=True).loss.skip_unwritten is True
    assert TrainConfig.from_dict(old).loss.skip_unwritten is False
    explicit = _cfg_dict("loss.skip_unwritten", False)
    assert TrainConfig.from_dict(explicit, saved=True).loss.skip_unwritten is False
    p = tmp_path / "config.yaml"
    TrainConfig.from_dict(old).save_yaml(str(p))
    text = p.read_text().replace("  skip_unwritten: false\n", "")
    assert "skip_unwritten" not in text
    p.write_text(text)
    assert TrainConfig.from_yaml(str(p), saved=True).loss.skip_unwritten is True
    saved = TrainConfig.from_dict(old).to_dict()
    del saved["loss"]["skip_unwritten"]
    with caplog.at_level(logging.WARNING, logger="personvlad"):
        _warn_config_changes(saved, TrainConfig.from_dict(old, saved=True))
    assert not caplog.records  # the checkpoint's own config: nothing changes
    with caplog.at_level(logging.WARNING, logger="personvlad"):
        _warn_config_changes(saved, TrainConfig.from_dict(old))
    text = caplog.text
    assert "before loss.skip_unwritten existed" in text and "loss.skip_unwritten: True -> False" in text


@pytest.mark.parametrize("override, key", [
    ("seed=-1", "seed"), ("device=cuda:abc", "device"), ("data.synth_preset=bogus", "data.synth_preset"),
    ("loss.triplet_weight=.nan", "loss.triplet_weight"), ("data.synth_seed=-2", "data.synth_seed"),
])
def test_overrides_are_validated(override, key):
    with pytest.raises(ValueError, match="^" + key.replace(".", r"\.") + ": expected "):
        TrainConfig.from_dict(_cfg_dict()).apply_overrides([override])


# ----------------------------------------------------------------- extraction
def _frames(folder, n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"f{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return tuple(paths)


@pytest.fixture(scope="module")
def tiny_model():
    from personvlad.models import build_model

    torch.manual_seed(0)
    return build_model("tiny", height=32, width=16, backend="reference").eval()


def test_extract_split_refuses_an_empty_tracklet(tmp_path, tiny_model):
    from personvlad.engine.extract import extract_split

    a = (_frames(str(tmp_path / "a"), 5, 1), 3, 1)
    for tracks, idx, pid in (([((), 999, 0), a], 0, 999), ([a, a, [[], 42, 2]], 2, 42)):
        with pytest.raises(ValueError, match=rf"^tracklets\[{idx}\]: empty tracklet \(pid {pid}, .*expected >= 1 frame"):
            extract_split(tiny_model, tracks, workers=0, progress=False)


def test_extract_split_rows_follow_the_input_order(tmp_path, tiny_model):
    from personvlad.engine.extract import extract_split

    a = (_frames(str(tmp_path / "a"), 5, 1), 3, 1)
    b = (_frames(str(tmp_path / "b"), 11, 2), 4, 2)
    fa, _, ca = extract_split(tiny_model, [a], stride=4, workers=0, progress=False)
    fb, _, cb = extract_split(tiny_model, [b], stride=4, workers=0, progress=False)
    f, clips, c = extract_split(tiny_model, [b, a], stride=4, workers=0, progress=False)
    assert c.tolist() == [cb[0], ca[0]] and clips.shape[0] == c.sum()
    np.testing.assert_allclose(f[0], fb[0], atol=1e-5)
    np.testing.assert_allclose(f[1], fa[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)


def test_extract_split_runs_cudnn_benchmark_mode_and_restores_it(tmp_path, tiny_model):
    # as the trainer does: each batch's convolutions in cuDNN's benchmark
    # mode, the process's flag left as it was
    from personvlad.engine.extract import extract_split

    seen = []
    hook = tiny_model.register_forward_pre_hook(lambda m, a: seen.append(torch.backends.cudnn.benchmark))
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        a = (_frames(str(tmp_path / "a"), 5, 1), 3, 1)
        extract_split(tiny_model, [a], stride=4, batch_size=1, workers=0, progress=False)
        assert seen and set(seen) == {True}
        assert torch.backends.cudnn.benchmark is False
    finally:
        hook.remove()
        torch.backends.cudnn.benchmark = saved


def test_extract_features_refuses_an_empty_gallery_tracklet_and_writes_nothing(tmp_path, tiny_model):
    from types import SimpleNamespace

    from personvlad.engine.extract import extract_features

    a = (_frames(str(tmp_path / "a"), 4, 1), 3, 1)
    ds = SimpleNamespace(query=[a], gallery=[a, ((), 7, 2)], train=[])
    out = tmp_path / "f.npz"
    with pytest.raises(ValueError, match=r"^tracklets\[1\]: empty tracklet"):
        extract_features(tiny_model, ds, str(out), workers=0, progress=False)
    assert not out.exists()


# ----------------------------------------------------------------- atomic writes
def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_a_save_killed_before_replace_leaves_a_tmp_file_the_next_save_removes(tmp_path):
    target = tmp_path / "latest.pt"
    ck.save_checkpoint({"model": {"w": torch.ones(2)}, "iteration": 1}, str(target))
    code = ("import os, sys, torch\n"
            "from personvlad.engine import checkpoint as ck\n"
            "ck._before_replace = lambda tmp, path: os._exit(9)\n"
            "ck.save_checkpoint({'model': {'w': torch.zeros(3)}, 'iteration': 2}, sys.argv[1])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code, str(target)], env=env, cwd=REPO, timeout=300)
    assert r.returncode == 9
    stale = _leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".latest.pt."), stale  # the kill left one behind
    assert ck.load_checkpoint(str(target))["iteration"] == 1
    ck.save_checkpoint({"model": {"w": torch.ones(2)}, "iteration": 3}, str(target))
    assert _leftovers(tmp_path) == []
    assert ck.load_checkpoint(str(target))["iteration"] == 3


def test_stale_tmp_cleanup_touches_only_this_targets_tmp_files(tmp_path):
    names = {
        ".latest.pt.ab_cd012.tmp": False,      # a stale temp file of latest.pt: removed
        ".latest.pt.zzzzzzzz.tmp": False,
        ".latest.pt.bak.abcdefgh.tmp": True,   # latest.pt.bak's: kept
        ".best.pt.abcdefgh.tmp": True,
        "latest.pt.tmp": True,
        ".latest.pt.x.tmp": True,              # not a mkstemp name
    }
    for n in names:
        (tmp_path / n).write_bytes(b"partial")
    ck.atomic_write_bytes(str(tmp_path / "latest.pt"), b"data")
    assert (tmp_path / "latest.pt").read_bytes() == b"data"
    for n, kept in names.items():
        assert (tmp_path / n).exists() == kept, n


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "wb"):
            pass
        expected = _mode(tmp_path / "plain")
        ck.save_checkpoint({"model": {"w": torch.ones(2)}}, str(tmp_path / "latest.pt"))
        ck.atomic_write_bytes(str(tmp_path / "config.yaml"), b"a: 1\n")
        assert _mode(tmp_path / "latest.pt") == expected
        assert _mode(tmp_path / "config.yaml") == expected
        # an existing file keeps its mode, as when open(path, "w") rewrites it
        os.chmod(tmp_path / "config.yaml", 0o640)
        ck.atomic_write_bytes(str(tmp_path / "config.yaml"), b"a: 2\n")
        assert _mode(tmp_path / "config.yaml") == 0o640
    finally:
        os.umask(old)
