"""Pictures: PNGs are written, non-empty and of the documented size; CLI wrappers."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from personvlad.eval.visualize import (feature_response, frames_to_thwc, plot_cmc, plot_feature_response,
                                       plot_part_maps, plot_ranked_list, upsample_maps)


def _png(path):
    assert path.is_file() and path.stat().st_size > 500
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
        return im.size, arr


def _frames(t=4, h=32, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_plot_part_maps_size_and_layouts(tmp_path):
    f = _frames()
    parts = np.random.default_rng(1).random((2, 2, 4, 2)).astype(np.float32)
    out = tmp_path / "parts.png"
    assert plot_part_maps(f, parts, str(out), scale=2) == str(out)
    size, a = _png(out)
    assert size == (4 * 16 * 2, 3 * 32 * 2)  # T*W*scale, (1+B)*H*scale
    # (T, 3, H, W) torch frames and a leading batch dim on the maps give the same picture
    out2 = tmp_path / "parts2.png"
    plot_part_maps(torch.from_numpy(f).permute(0, 3, 1, 2), parts[None], str(out2), scale=2)
    assert np.array_equal(_png(out2)[1], a)
    # a name without an extension gets .png, and the path returned is the file written
    got = plot_part_maps(f, parts, str(tmp_path / "noext"), scale=1)
    assert got == str(tmp_path / "noext.png") and os.path.isfile(got)
    # max_frames subsamples the columns
    out3 = tmp_path / "parts3.png"
    plot_part_maps(_frames(t=10), parts, str(out3), scale=1, max_frames=5)
    assert _png(out3)[0] == (5 * 16, 3 * 32)


def test_plot_feature_response_size(tmp_path):
    out = tmp_path / "sub" / "resp.png"
    fm = np.random.default_rng(2).standard_normal((8, 2, 4, 2)).astype(np.float32)
    plot_feature_response(_frames(), fm, str(out), scale=3)
    assert _png(out)[0] == (4 * 16 * 3, 2 * 32 * 3)


def test_feature_response_and_upsampling_values():
    fm = np.zeros((3, 1, 2, 2), dtype=np.float32)
    fm[:, 0, 1, 1] = [3.0, 4.0, 0.0]  # energy 5 at (1, 1), 0 elsewhere
    e = feature_response(fm)
    assert e.shape == (1, 2, 2) and e[0, 1, 1] == 1.0 and e[0, 0, 0] == 0.0
    up = upsample_maps(np.ones((2, 1, 2, 2)), (4, 8, 6))
    assert up.shape == (2, 4, 8, 6) and np.allclose(up, 1.0)


def test_frames_validation():
    with pytest.raises(ValueError, match="frames"):
        frames_to_thwc(np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(ValueError, match="frames"):
        frames_to_thwc(np.zeros((4, 5, 6, 7), np.uint8))
    assert frames_to_thwc(np.ones((2, 4, 4, 3), np.float32)).max() == 255
    with pytest.raises(ValueError, match="parts"):
        plot_part_maps(_frames(), np.zeros((2, 4, 2)), "unused.png")


def _write_images(tmp_path, n):
    paths = []
    rng = np.random.default_rng(3)
    for i in range(n):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_plot_ranked_list_size_and_border_colours(tmp_path):
    paths = _write_images(tmp_path, 4)
    out = tmp_path / "ranked.png"
    plot_ranked_list(paths[0], paths[1:], [True, False, True], str(out), panel_size=(64, 128), border=4, gap=16,
                     scores=[0.1, 0.2, 0.3])
    size, a = _png(out)
    assert size == (4 * 64 + 16, 128)
    # left border pixel of each gallery panel (middle height)
    def px(panel):
        return a[64, 64 + 16 + panel * 64 + 1].astype(int)
    green, red = px(0), px(1)
    assert green[1] > 120 and green[0] < 60 and red[0] > 150 and red[1] < 60
    assert px(2)[1] > 120
    with pytest.raises(ValueError, match="correct_flags"):
        plot_ranked_list(paths[0], paths[1:], [True], str(out))
    with pytest.raises(ValueError, match="not found"):
        plot_ranked_list(str(tmp_path / "nope.jpg"), paths[1:2], [True], str(out))


def test_plot_cmc_size(tmp_path):
    out = tmp_path / "cmc.png"
    plot_cmc({"a": np.linspace(0.5, 1, 20), "b": np.linspace(0.3, 0.9, 20)}, str(out), max_rank=10,
             title="t", size=(500, 400))
    assert _png(out)[0] == (500, 400)
    with pytest.raises(ValueError, match="curves"):
        plot_cmc({}, str(out))


def _run_cli(argv):
    from personvlad.eval import cli

    parser = argparse.ArgumentParser(prog="personvlad")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_visualize(tmp_path):
    # ranked: a feature file whose *_first_frame entries are real images
    paths = _write_images(tmp_path, 6)
    rng = np.random.default_rng(0)
    g = rng.standard_normal((5, 8)).astype(np.float32)
    feats = tmp_path / "feats.npz"
    np.savez(feats, query_feats=g[:1] + 0.01, query_pids=np.array([2]), query_camids=np.array([0]),
             query_first_frame=np.array(paths[:1]), gallery_feats=g, gallery_pids=np.array([2, 3, 4, 5, 2]),
             gallery_camids=np.array([1, 1, 1, 1, 0]), gallery_first_frame=np.array(paths[1:]))
    out = tmp_path / "ranked.png"
    assert _run_cli(["visualize", "ranked", "--features", str(feats), "--query-index", "0", "--topk", "3",
                     "--out", str(out)]) == 0
    assert _png(out)[0][1] == 128
    from personvlad.eval.cli import ranked_gallery
    assert len(ranked_gallery(str(feats), 0, topk=2)[1]) == 2
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="topk: expected a positive int"):
            ranked_gallery(str(feats), 0, topk=bad)
    # cmc from a JSON report and from a feature file
    report = {"results": {"standard": {"all/all": {"cmc": [0.5, 0.7, 0.9]}}}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    out = tmp_path / "cmc.png"
    assert _run_cli(["visualize", "cmc", "--inputs", str(tmp_path / "r.json"), str(feats), "--labels", "A", "B",
                     "--max-rank", "3", "--out", str(out)]) == 0
    assert _png(out)[0] == (640, 480)
    # parts / response from .npy arrays and a frame directory
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i, f in enumerate(_frames(t=3)):
        Image.fromarray(f).save(frames_dir / f"{i}.png")
    np.save(tmp_path / "parts.npy", rng.random((2, 1, 4, 2)).astype(np.float32))
    np.save(tmp_path / "fm.npy", rng.random((4, 1, 4, 2)).astype(np.float32))
    out = tmp_path / "parts.png"
    assert _run_cli(["visualize", "parts", "--frames", str(frames_dir), "--parts", str(tmp_path / "parts.npy"),
                     "--scale", "1", "--out", str(out)]) == 0
    assert _png(out)[0] == (3 * 16, 3 * 32)
    np.save(tmp_path / "frames.npy", _frames(t=3).transpose(0, 3, 1, 2))
    out = tmp_path / "resp.png"
    assert _run_cli(["visualize", "response", "--frames", str(tmp_path / "frames.npy"), "--feature-map",
                     str(tmp_path / "fm.npy"), "--scale", "1", "--out", str(out)]) == 0
    assert _png(out)[0] == (3 * 16, 2 * 32)
    assert _run_cli(["visualize", "cmc", "--inputs", str(tmp_path / "r.json"), "--protocol", "mars",
                     "--out", str(out)]) == 2
