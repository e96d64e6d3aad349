"""Tests for personvlad.models (issue 6): shapes, parts, heads, gradients,
checkpoints/config round trips, C3D weight import (incl. malicious pickles),
center initialisation, torch.compile / autocast / channels_last_3d."""
import json
import os
import pickle
import time

import numpy as np
import pytest
import torch
import yaml

from personvlad.models import (
    C3D_MEAN, C3D_STD, HEADS, PART_MODES, ModelConfig, UnsafePickleError, build_model,
    collect_descriptors, feature_shape, fixed_part_maps, init_centers_from, load_c3d_weights, load_model,
    min_input_size, model_from_state, model_state, read_weight_file,
)
from personvlad.models.parts import bin_masks
from personvlad.nn import PersonVLAD, kmeans
from personvlad.ops import BACKENDS, person_vlad

COMBOS = [(h, p) for h in HEADS for p in PART_MODES]


def _clips(model, n=2, seed=0):
    return model.example_input(n, generator=torch.Generator().manual_seed(seed))


def _expected_parts(cfg):
    return {"learned": cfg.num_parts, "stripe": cfg.stripes, "grid": cfg.grid[0] * cfg.grid[1], "none": 0}[cfg.parts]


# ----------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------
def test_paper_feature_shape_meta():
    assert feature_shape(16, 180, 90) == (2, 11, 5)
    assert min_input_size() == (8, 16, 16)
    with torch.device("meta"):
        model = build_model("paper")
        f = model.features(torch.empty(2, 3, 16, 180, 90))
    assert tuple(f.shape) == (2, 256, 2, 11, 5)
    assert model.output_dim == 16384 and model.feature_dim == 256 and model.num_parts == 6


@pytest.mark.parametrize("head,parts", COMBOS)
def test_paper_shapes_meta(head, parts):
    with torch.device("meta"):
        model = build_model("paper", head=head, parts=parts)
        desc, maps = model(torch.empty(2, 3, 16, 180, 90), return_parts=True)
    cfg = model.config
    assert tuple(desc.shape) == (2, model.output_dim)
    assert tuple(maps.shape) == (2, _expected_parts(cfg), 2, 11, 5)
    if head == "vlad":
        assert model.output_dim == 64 * 256
    else:
        assert model.output_dim == max(_expected_parts(cfg), 1) * cfg.embed_dim


def test_paper_forward_cpu_batch1():
    torch.manual_seed(0)
    model = build_model("paper").eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        desc, maps = model(_clips(model, 1), return_parts=True)
    assert time.perf_counter() - t0 < 30
    assert desc.shape == (1, 16384) and maps.shape == (1, 6, 2, 11, 5)
    assert torch.isfinite(desc).all()
    torch.testing.assert_close(desc.norm(dim=1), torch.ones(1))


@pytest.mark.parametrize("head,parts", COMBOS)
def test_tiny_shapes_and_normalised(head, parts):
    torch.manual_seed(0)
    model = build_model("tiny", head=head, parts=parts)
    x = _clips(model, 3)
    desc, maps = model(x, return_parts=True)
    B = _expected_parts(model.config)
    assert model.feature_shape(8, 64, 32) == (1, 4, 2)
    assert desc.shape == (3, model.output_dim)
    assert maps.shape == (3, B, 1, 4, 2)
    torch.testing.assert_close(desc.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x), desc)
    # another input size that survives the pools
    assert model(torch.rand(1, 3, 9, 40, 20)).shape == (1, model.output_dim)


@pytest.mark.parametrize("head,parts", COMBOS)
def test_empty_batch(head, parts):
    """N = 0 gives (0, output_dim) descriptors and (0, B, T', H', W') maps (the
    avg/max heads and learned parts used to reshape(N, D, -1), which cannot
    infer -1 when N = 0)."""
    torch.manual_seed(0)
    model = build_model("tiny", head=head, parts=parts).eval()
    x = torch.rand(0, 3, 8, 32, 16)
    with torch.no_grad():
        desc, maps = model(x, return_parts=True)
        assert model(x).shape == (0, model.output_dim)
    assert desc.shape == (0, model.output_dim) and desc.dtype == torch.float32
    assert maps.shape == (0, _expected_parts(model.config), *model.feature_shape(8, 32, 16))


def test_output_dims_documented():
    assert build_model("tiny").output_dim == 8 * 64
    assert build_model("tiny", head="avg", parts="grid").output_dim == 25 * 64
    assert build_model("tiny", head="max", parts="none").output_dim == 64
    assert build_model("tiny", head="avg", parts="stripe", embed_dim=7).output_dim == 5 * 7


# ----------------------------------------------------------------------
# Part maps
# ----------------------------------------------------------------------
def test_bin_masks_cover_and_nonempty():
    m = bin_masks(11, 5)
    expected = [(0, 3), (2, 5), (4, 7), (6, 9), (8, 11)]
    for i, (lo, hi) in enumerate(expected):
        row = torch.zeros(11)
        row[lo:hi] = 1
        assert torch.equal(m[i], row), (i, m[i])
    assert torch.equal(bin_masks(10, 5), torch.eye(5).repeat_interleave(2, dim=1))
    small = bin_masks(2, 5)  # fewer rows than parts: all parts non-empty
    assert (small.sum(1) >= 1).all() and (small.sum(0) >= 1).all()
    with pytest.raises(ValueError):
        bin_masks(0, 5)


def test_fixed_part_maps_stripe_and_grid():
    s = fixed_part_maps("stripe", (2, 10, 5), batch=3)
    assert s.shape == (3, 5, 2, 10, 5)
    for b in range(5):  # stripe b covers rows 2b, 2b+1 over all t and w
        expect = torch.zeros(2, 10, 5)
        expect[:, 2 * b:2 * b + 2, :] = 1
        assert torch.equal(s[1, b], expect)
    g = fixed_part_maps("grid", (1, 10, 5), grid=(5, 5))
    assert g.shape == (1, 25, 1, 10, 5)
    for r in range(5):
        for c in range(5):
            expect = torch.zeros(1, 10, 5)
            expect[:, 2 * r:2 * r + 2, c] = 1
            assert torch.equal(g[0, r * 5 + c], expect)
    with pytest.raises(ValueError, match="mode"):
        fixed_part_maps("blob", (1, 2, 2))


# ----------------------------------------------------------------------
# Heads against direct compositions
# ----------------------------------------------------------------------
def _manual_features(model, x):
    xn = (x - torch.tensor(model.config.mean).view(1, 3, 1, 1, 1)) / torch.tensor(model.config.std).view(1, 3, 1, 1, 1)
    return model.backbone(xn)


def _manual_maps(model, f):
    cfg = model.config
    N, D, T, H, W = f.shape
    if cfg.parts == "learned":
        layer = model.head.vlad if cfg.head == "vlad" else model.head.parts
        w = layer.part_weight if cfg.head == "vlad" else layer.weight
        b = layer.part_bias if cfg.head == "vlad" else layer.bias
        return torch.sigmoid(torch.einsum("bd,ndthw->nbthw", w, f) + b.view(1, -1, 1, 1, 1))
    if cfg.parts == "stripe":
        m = torch.zeros(N, cfg.stripes, T, H, W)
        for i in range(cfg.stripes):
            lo, hi = (i * H) // cfg.stripes, -((-(i + 1) * H) // cfg.stripes)
            m[:, i, :, lo:hi, :] = 1
        return m
    if cfg.parts == "grid":
        gr, gc = cfg.grid
        m = torch.zeros(N, gr * gc, T, H, W)
        for r in range(gr):
            for c in range(gc):
                hl, hh = (r * H) // gr, -((-(r + 1) * H) // gr)
                wl, wh = (c * W) // gc, -((-(c + 1) * W) // gc)
                m[:, r * gc + c, :, hl:hh, wl:wh] = 1
        return m
    return None


@pytest.mark.parametrize("parts", PART_MODES)
def test_vlad_head_equals_direct_composition(parts):
    torch.manual_seed(1)
    model = build_model("tiny", parts=parts, alpha=5.0).eval()
    x = _clips(model, 3, seed=1)
    with torch.no_grad():
        desc, maps = model(x, return_parts=True)
        f = _manual_features(model, x)
        torch.testing.assert_close(model.features(x), f)
        m = _manual_maps(model, f)
        v = model.head.vlad
        expect = person_vlad(f, m, v.assign_weight, v.assign_bias, v.centers, backend="reference")
    torch.testing.assert_close(desc, expect, atol=2e-5, rtol=1e-4)
    if m is None:
        assert maps.shape[1] == 0
    else:
        torch.testing.assert_close(maps, m)


@pytest.mark.parametrize("head", ["avg", "max"])
@pytest.mark.parametrize("parts", PART_MODES)
def test_pool_head_equals_per_part_loop(head, parts):
    torch.manual_seed(2)
    model = build_model("tiny", head=head, parts=parts).eval()
    x = _clips(model, 2, seed=2)
    with torch.no_grad():
        desc = model(x)
        f = _manual_features(model, x).flatten(2)  # (N, D, P)
        m = _manual_maps(model, _manual_features(model, x))
        m = torch.ones(f.shape[0], 1, f.shape[2]) if m is None else m.flatten(2)
        outs = []
        for b in range(m.shape[1]):  # the slow per-part loop the head vectorises
            wf = m[:, b:b + 1] * f
            p = wf.sum(-1) / m[:, b].sum(-1, keepdim=True) if head == "avg" else wf.amax(-1)
            outs.append(p @ model.head.weight[b] + model.head.bias[b])
        expect = torch.nn.functional.normalize(torch.cat(outs, 1), dim=1)
    torch.testing.assert_close(desc, expect, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------
# Gradients, parameters
# ----------------------------------------------------------------------
@pytest.mark.parametrize("head,parts", [("vlad", "learned"), ("vlad", "stripe"), ("vlad", "none"),
                                        ("avg", "learned"), ("max", "grid")])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_gradients_reach_every_parameter(head, parts, batch_norm):
    torch.manual_seed(3)
    # alpha=1 keeps the soft-assignment soft so W and z get non-zero gradients.
    model = build_model("tiny", head=head, parts=parts, alpha=1.0, batch_norm=batch_norm).train()
    x = _clips(model, 3, seed=3)
    desc = model(x)
    probe = torch.randn(desc.shape, generator=torch.Generator().manual_seed(0))
    (desc * probe).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_center_parameters():
    model = build_model("tiny")
    cp = model.center_parameters()
    v = model.head.vlad
    assert [id(p) for p in cp] == [id(v.centers), id(v.assign_weight), id(v.assign_bias)]
    assert build_model("tiny", head="avg").center_parameters() == []
    assert build_model("tiny", head="max", parts="stripe").center_parameters() == []


def test_uint8_input_and_validation():
    model = build_model("tiny").eval()
    u8 = torch.randint(0, 256, (2, 3, 8, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(u8), model(u8.float() / 255))
    with pytest.raises(ValueError, match="clips"):
        model(torch.rand(2, 1, 8, 64, 32))
    with pytest.raises(ValueError, match="T >= 8"):
        model(torch.rand(2, 3, 4, 64, 32))
    with pytest.raises(ValueError, match="clips"):
        model(torch.rand(3, 8, 64, 32))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 3, 8, 64, 32, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["f64", "f16", "bf16"])
def test_uint8_input_in_model_dtype(dtype):
    """uint8 clips are divided by 255 in the model's dtype (they used to become
    float32 whatever the model's dtype: a float64/half/bf16 model failed)."""
    torch.manual_seed(0)
    model = build_model("tiny", alpha=5.0).eval()
    u8 = torch.randint(0, 256, (2, 3, 8, 32, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ref64 = (u8.double() / 255).to(dtype)  # the exact quotient, rounded once to the model's dtype
    model = model.to(dtype)
    with torch.no_grad():
        out = model(u8)
        ref = model(ref64)
    assert out.dtype == dtype and out.shape == (2, model.output_dim)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    else:
        torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------
# Config and checkpoints
# ----------------------------------------------------------------------
def test_config_round_trips():
    cfg = build_model("tiny", head="max", parts="grid", grid=(3, 2), mean=C3D_MEAN, std=C3D_STD).config
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_yaml(cfg.to_yaml()) == cfg
    assert yaml.safe_load(cfg.to_yaml())["grid"] == [3, 2]
    assert cfg.replace(num_clusters=3).num_clusters == 3
    paper = build_model("paper").config
    assert (paper.num_clusters, paper.num_parts, paper.alpha, paper.feature_dim) == (64, 6, 1000.0, 256)
    assert (paper.clip_len, paper.height, paper.width) == (16, 180, 90)
    tiny = ModelConfig.from_dict(build_model("tiny").config.to_dict())
    assert (tiny.clip_len, tiny.height, tiny.width, tiny.num_clusters, tiny.num_parts) == (8, 64, 32, 8, 2)


@pytest.mark.parametrize("bad,match", [
    (dict(head="mean"), "head"), (dict(parts="rows"), "parts"), (dict(widths=(1, 2, 3)), "widths"),
    (dict(num_clusters=0), "num_clusters"), (dict(alpha=-1.0), "alpha"), (dict(clip_len=4), "clip_len"),
    (dict(std=(1.0, 0.0, 1.0)), "std"), (dict(backend="gpu"), "backend"), (dict(colour=1), "colour"),
    (dict(num_parts=0), "num_parts"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        build_model("tiny", **bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        build_model("huge")


def test_state_dict_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(4)
    model = build_model("tiny", parts="stripe", batch_norm=True).eval()
    x = _clips(model, 2, seed=4)
    with torch.no_grad():
        ref = model(x)
    fresh = build_model("tiny", parts="stripe", batch_norm=True).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, atol=0, rtol=0)
    path = tmp_path / "ckpt.pt"
    torch.save({**model_state(model), "epoch": 3}, path)
    loaded = load_model(path).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, atol=0, rtol=0)
    state = torch.load(path, weights_only=True)
    assert model_from_state(state).config.parts == "stripe"
    with pytest.raises(ValueError, match="model_config"):
        model_from_state({"model": {}})


# ----------------------------------------------------------------------
# C3D weights
# ----------------------------------------------------------------------
C3D_SHAPES = {"conv1": (64, 3), "conv2": (128, 64), "conv3a": (256, 128), "conv3b": (256, 256),
              "conv4a": (512, 256), "conv4b": (512, 512), "conv5a": (512, 512), "conv5b": (512, 512)}
FEATURE_IDX = dict(zip(C3D_SHAPES, (0, 3, 6, 8, 11, 13, 16, 18)))
OURS = dict(zip(C3D_SHAPES, ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")))


@pytest.fixture(scope="module")
def c3d_weights():
    g = torch.Generator().manual_seed(5)
    d = {}
    for k, (o, i) in C3D_SHAPES.items():
        d[f"{k}.weight"] = torch.randn(o, i, 3, 3, 3, generator=g) * 0.01
        d[f"{k}.bias"] = torch.randn(o, generator=g)
    d["fc6.weight"] = torch.zeros(16, 8)  # stand-ins for the unused fc layers
    d["fc8.bias"] = torch.zeros(3)
    return d


def _check_loaded(model, d, prefix_of):
    bb = model.backbone
    for k, ours in OURS.items():
        conv = getattr(bb, ours)
        o, i = conv.weight.shape[:2]
        torch.testing.assert_close(conv.weight, d[f"{prefix_of(k)}.weight"][:o, :i], atol=0, rtol=0)
        torch.testing.assert_close(conv.bias, d[f"{prefix_of(k)}.bias"][:o], atol=0, rtol=0)


@pytest.mark.parametrize("as_numpy,protocol", [(True, 2), (True, pickle.HIGHEST_PROTOCOL), (False, 2)])
def test_load_c3d_plain_pickle_dict(tmp_path, c3d_weights, as_numpy, protocol):
    d = {k: (v.numpy() if as_numpy else v) for k, v in c3d_weights.items()}
    path = tmp_path / "c3d.pickle"
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=protocol)
    model = build_model("paper")
    report = load_c3d_weights(model, path)  # adapt="slice"
    assert report.layout == "c3d"
    assert len(report.loaded) == 8 and len(report.adapted) == 8 and not report.skipped and not report.missing
    assert report.unused == ["fc6.weight", "fc8.bias"]
    assert ("backbone.conv4b.weight", (512, 512, 3, 3, 3), (256, 256, 3, 3, 3)) in report.adapted
    assert "backbone.conv3b.weight" in report.loaded
    _check_loaded(model, c3d_weights, lambda k: k)
    assert "8 adapted" in str(report)


def test_load_c3d_features_pth_and_tiny_slice(tmp_path, c3d_weights):
    sd = {}
    for k, j in FEATURE_IDX.items():
        sd[f"features.{j}.weight"] = c3d_weights[f"{k}.weight"]
        sd[f"features.{j}.bias"] = c3d_weights[f"{k}.bias"]
    sd["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "c3d_features.pth"
    torch.save(sd, path)
    model = build_model("paper")
    report = load_c3d_weights(model, path)
    assert report.layout == "features" and report.num_loaded == 16
    _check_loaded(model, sd, lambda k: f"features.{FEATURE_IDX[k]}")
    # the tiny preset (16/32/64/64/64) slices every layer, "module." prefixes are stripped
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    tiny = build_model("tiny")
    rep = load_c3d_weights(tiny, path)
    assert len(rep.adapted) == 16 and not rep.loaded
    _check_loaded(tiny, sd, lambda k: f"features.{FEATURE_IDX[k]}")
    assert torch.isfinite(tiny(_clips(tiny, 1))).all()


def test_load_c3d_skip_error_and_bgr(tmp_path, c3d_weights):
    path = tmp_path / "c3d_legacy.pth"
    torch.save(c3d_weights, path, _use_new_zipfile_serialization=False)  # legacy torch.save format
    model = build_model("paper")
    before = model.backbone.conv5b.weight.detach().clone()
    report = load_c3d_weights(model, path, adapt="skip")
    assert len(report.loaded) == 8 and len(report.skipped) == 8 and not report.adapted
    assert all("adapt='skip'" in why for _, why in report.skipped)
    assert torch.equal(model.backbone.conv5b.weight, before)
    with pytest.raises(ValueError, match="conv4a.weight"):
        load_c3d_weights(build_model("paper"), path, adapt="error")
    with pytest.raises(ValueError, match="adapt"):
        load_c3d_weights(model, path, adapt="resize")
    load_c3d_weights(model, path, input_order="bgr")
    torch.testing.assert_close(model.backbone.conv1a.weight, c3d_weights["conv1.weight"].flip(1), atol=0, rtol=0)
    # batch-norm convs have no bias: the biases are reported as skipped
    bn = build_model("tiny", batch_norm=True)
    rep = load_c3d_weights(bn, path)
    assert len(rep.adapted) == 8 and len(rep.skipped) == 8
    assert all("no bias" in why for _, why in rep.skipped)


def test_load_c3d_rejects_non_weight_files(tmp_path):
    p = tmp_path / "x.pickle"
    with open(p, "wb") as f:
        pickle.dump({"foo.weight": np.zeros(3, np.float32)}, f)
    with pytest.raises(ValueError, match="no C3D conv weights"):
        load_c3d_weights(build_model("tiny"), p)
    with open(p, "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(ValueError, match="expected a dict"):
        read_weight_file(p)
    p.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a readable"):
        read_weight_file(p)
    with pytest.raises(FileNotFoundError):
        read_weight_file(tmp_path / "missing.pth")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_malicious_pickles_are_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"conv1.weight": np.zeros((64, 3, 3, 3, 3), np.float32), "evil": _Evil(marker)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        p = tmp_path / f"evil{protocol}.pickle"
        with open(p, "wb") as f:
            pickle.dump(payload, f, protocol=protocol)
        with pytest.raises(UnsafePickleError, match="system"):
            load_c3d_weights(build_model("tiny"), p)
        assert not marker.exists()
    p = tmp_path / "eval.pickle"
    with open(p, "wb") as f:
        pickle.dump({"x": _EvalEvil()}, f)
    with pytest.raises(UnsafePickleError, match="eval"):
        read_weight_file(p)
    # the same payload inside a torch.save zip is refused by weights_only=True
    p = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3, 3), "evil": _Evil(marker)}, p)
    with pytest.raises(UnsafePickleError):
        load_c3d_weights(build_model("tiny"), p)
    assert not marker.exists()
    assert issubclass(UnsafePickleError, ValueError)


# ----------------------------------------------------------------------
# Center initialisation
# ----------------------------------------------------------------------
def test_init_centers_from_kmeans_on_raw_features():
    torch.manual_seed(6)
    model = build_model("tiny", num_clusters=4)
    g = torch.Generator().manual_seed(6)
    u8 = [torch.randint(0, 256, (2, 3, 8, 64, 32), generator=g, dtype=torch.uint8) for _ in range(3)]
    batches = [b.float() / 255 for b in u8]
    # raw local vectors: 2 clips x 8 cells per batch, no part reweighting
    desc = collect_descriptors(model, batches, num_descriptors=40)
    with torch.no_grad():
        f = torch.cat([model.features(b) for b in batches])
    allvec = f.flatten(2).transpose(1, 2).reshape(-1, 64)
    assert desc.shape == (40, 64)
    # every collected descriptor is one of the raw feature vectors
    d = (desc[:, None, :] - allvec[None, :, :]).abs().amax(-1).min(1).values
    assert d.max() < 1e-5
    assert len({tuple(r.tolist()) for r in desc}) == 40  # sampled without replacement
    before = model.head.vlad.centers.detach().clone()
    u8_batches = [(b, torch.zeros(2)) for b in u8]  # uint8 (clips, pids) tuples
    model.train()
    out = init_centers_from(model, u8_batches, num_descriptors=1000, iters=20, seed=0)
    assert out is model and model.training
    v = model.head.vlad
    assert not torch.equal(v.centers, before)
    torch.testing.assert_close(v.centers.detach(), kmeans(allvec, 4, iters=20, seed=0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v.assign_weight.detach(), 2 * v.alpha * v.centers.detach())
    torch.testing.assert_close(v.assign_bias.detach(), -v.alpha * (v.centers.detach() ** 2).sum(1))
    with pytest.raises(ValueError, match="head='vlad'"):
        init_centers_from(build_model("tiny", head="avg"), batches)
    with pytest.raises(ValueError, match="num_descriptors"):
        collect_descriptors(model, batches, num_descriptors=0)


# ----------------------------------------------------------------------
# The PersonVLAD layer's own checks (the vlad head's layer)
# ----------------------------------------------------------------------
def test_personvlad_layer_rejects_bad_backend_and_bool_alpha():
    for backend in ("bogus", None, 3, "AUTO"):
        with pytest.raises(ValueError, match="backend: expected one of"):
            PersonVLAD(8, num_clusters=4, num_parts=2, backend=backend)
    for backend in ("auto",) + BACKENDS:  # construction does not need the backend to be usable here
        assert PersonVLAD(8, num_clusters=4, num_parts=2, backend=backend).backend == backend
    for alpha in (True, False):
        with pytest.raises(ValueError, match="alpha: expected a finite float > 0"):
            PersonVLAD(8, num_clusters=4, num_parts=2, alpha=alpha)
    assert PersonVLAD(8, num_clusters=4, alpha=2).alpha == 2.0


@pytest.mark.parametrize("num_parts", [0, 3])
def test_personvlad_layer_device_mismatch_is_valueerror(num_parts):
    """x and the layer on different devices: the op's ValueError (also with
    learned parts, whose matmul used to raise a RuntimeError first)."""
    torch.manual_seed(0)
    layer = PersonVLAD(8, num_clusters=4, num_parts=num_parts)
    x = torch.randn(2, 8, 3, 4)
    with pytest.raises(ValueError, match=r"assign_weight: expected device meta .*got cpu"):
        layer(x.to("meta"))
    with pytest.raises(ValueError, match=r"assign_weight: expected device cpu .*got meta"):
        layer.to("meta")(x)


# ----------------------------------------------------------------------
# Execution modes
# ----------------------------------------------------------------------
def test_autocast_bfloat16_cpu():
    torch.manual_seed(7)
    model = build_model("tiny", alpha=5.0).eval()
    x = _clips(model, 2, seed=7)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, maps = model(x, return_parts=True)
    assert torch.isfinite(out).all() and torch.isfinite(maps).all()
    assert (out.float() - ref).abs().max() < 0.1
    torch.testing.assert_close(out.float().norm(dim=1), torch.ones(2), atol=2e-2, rtol=0)
    # training step under autocast: gradients are finite.  oneDNN is off for
    # this step: its bf16 Conv3d weight-gradient on CPU intermittently returns
    # non-finite values (torch 2.14.1: conv4a.weight, 2 runs in 40; 0 in 60
    # with oneDNN off) — a library defect, not one of this model.
    model.train()
    with torch.backends.mkldnn.flags(enabled=False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).sum() + model(x).float()[:, 0].sum()
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("head,parts", [("vlad", "learned"), ("avg", "grid"), ("max", "stripe")])
def test_channels_last_3d_same_output(head, parts):
    torch.manual_seed(8)
    model = build_model("tiny", head=head, parts=parts, alpha=5.0).eval()
    x = _clips(model, 2, seed=8)
    with torch.no_grad():
        ref, ref_maps = model(x, return_parts=True)
        model = model.to(memory_format=torch.channels_last_3d)
        assert model.backbone.conv2a.weight.is_contiguous(memory_format=torch.channels_last_3d)
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        assert model.features(xc).is_contiguous(memory_format=torch.channels_last_3d)
        out, maps = model(xc, return_parts=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps, ref_maps, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_tiny_cpu():
    """One inductor compile (fullgraph: no graph breaks) of forward + backward."""
    torch.manual_seed(9)
    model = build_model("tiny", alpha=5.0).train()
    x = _clips(model, 2, seed=9)
    ref = model(x)
    ref.pow(3).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.pow(3).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-4, rtol=1e-3, msg=n)


def test_torch_export_tiny_cpu(tmp_path):
    """``torch.export`` of the whole model, for deployment: the fused op stays
    one node (``personvlad.person_vlad``, traced through its fake kernel), the
    program matches eager, survives ``torch.export.save``/``load`` (in a
    process that has imported personvlad, which registers the op) and takes
    a dynamic batch dimension."""
    torch.manual_seed(3)
    model = build_model("tiny").eval()
    x = _clips(model, 2, seed=3)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes={"clips": {0: batch}})
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function" and "personvlad" in str(n.target)]
    assert ops == [torch.ops.personvlad.person_vlad.default], ops
    path = str(tmp_path / "model.pt2")
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    for n, seed in ((2, 3), (5, 4), (1, 5)):
        clips = _clips(model, n, seed=seed)
        with torch.no_grad():
            ref = model(clips)
            torch.testing.assert_close(ep.module()(clips), ref, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(loaded(clips), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_aot_inductor_package_tiny_cpu(tmp_path):
    """AOTInductor (export, compile to a shared library, package, load) with
    the fused op inside: the compiled code calls the registered C++ op (or
    its fallback kernel) and matches eager."""
    torch.manual_seed(4)
    model = build_model("tiny").eval()
    x = _clips(model, 2, seed=4)
    ep = torch.export.export(model, (x,))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), atol=1e-5, rtol=1e-4)
