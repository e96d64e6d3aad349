"""End to end with the real feature writer: `extract_features` (training helper)
-> `personvlad evaluate` / `index build` / `search` / `visualize ranked`.
Skips while the engine or models pieces are not importable."""
import argparse
import json
import types

import numpy as np
import pytest


def _run_cli(argv):
    from personvlad.eval import cli

    parser = argparse.ArgumentParser(prog="personvlad")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_extract_then_evaluate_search_and_draw(tmp_path, capsys):
    try:
        from personvlad.engine.extract import extract_features
        from personvlad.models import build_model
    except ImportError as exc:
        pytest.skip(f"personvlad.engine.extract / personvlad.models not available yet ({exc})")
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    rng = np.random.default_rng(0)

    def tracklet(pid, cam, n_frames=6):
        d = tmp_path / "frames" / f"{pid}_{cam}"
        d.mkdir(parents=True)
        base = rng.integers(0, 256, (64, 32, 3))
        paths = []
        for i in range(n_frames):
            img = np.clip(base + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.jpg")
            paths.append(str(d / f"{i}.jpg"))
        return (tuple(paths), pid, cam)

    ids = [1, 2, 3, 4]
    ds = types.SimpleNamespace(query=[tracklet(p, 0) for p in ids],
                               gallery=[tracklet(p, 1) for p in ids] + [tracklet(-1, 1)],
                               train=[])
    feats = str(tmp_path / "feats.npz")
    extract_features(model, ds, feats, batch_size=4, workers=0, progress=False)
    out = tmp_path / "eval.json"
    assert _run_cli(["evaluate", "--features", feats, "--protocol", "both", "--modes", "--repeats", "2",
                     "--max-rank", "5", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["counts"][0]["num_query"] == 4 and rep["counts"][0]["num_gallery"] == 5
    for protocol in ("standard", "mars"):
        assert 0.0 <= rep["results"][protocol]["random/random"]["mAP"] <= 1.0
    idx = str(tmp_path / "g.index")
    assert _run_cli(["index", "build", "--features", feats, "--out", idx]) == 0
    assert _run_cli(["search", "--index", idx, "--query-features", feats, "--query-index", "0", "--topk", "3"]) == 0
    png = tmp_path / "ranked.png"
    assert _run_cli(["visualize", "ranked", "--features", feats, "--query-index", "0", "--topk", "3",
                     "--out", str(png)]) == 0
    assert png.stat().st_size > 500
    capsys.readouterr()
