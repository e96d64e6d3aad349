"""The whole re-id pipeline on synthetic data, on CPU, in a few minutes.

1. generate the ``tiny`` synthetic MARS-layout data set (rendered pedestrians
   with part-level appearance, camera casts, misaligned boxes, occlusion);
2. train the ``tiny`` PersonVLAD model with the paper's two-step schedule
   (k-means centers, step 1 with centers fixed, step 2 joint fine-tuning;
   OIM loss) — and, with the same budget, the 3D-ConvNet + global-average-
   pooling baseline (the paper's "3D ConvNets+GP");
3. extract tracklet descriptors (16-frame-style clips every 8 frames, mean,
   L2) for query and gallery with the trained models and an untrained one;
4. evaluate with both protocols (SPEC §3) and print rank-1/5/20 and mAP;
5. write CMC curves, part-map overlays and a ranked list as PNGs.

Everything goes through the same code as the CLI (`personvlad synth`,
`personvlad train`, `personvlad extract`, `personvlad evaluate`,
`personvlad visualize`).  ``fast=True`` (``DEMO_FAST=1``) shrinks the
training budget for CI; the code path is the same.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List, Tuple

import numpy as np
import torch

# Training budget (iterations of step 1 / step 2) and its reduced CI form.
BUDGET = {"full": (360, 40), "fast": (160, 40)}


def _demo_config(data_root: str, head: str, fast: bool, seed: int):
    from .engine import TrainConfig

    step1, step2 = BUDGET["fast" if fast else "full"]
    return TrainConfig().apply_overrides([
        f"name=demo-{head}", f"seed={seed}", "device=cpu", "amp=fp32",
        "model.preset=tiny", f"model.head={head}",
        "data.dataset=synthetic", f"data.root={data_root}", "data.synth_preset=tiny", f"data.synth_seed={seed}",
        "data.num_ids=8", "data.num_per_id=2", "data.workers=0", "data.test_batch_size=64",
        "loss.name=oim", "loss.queue_size=64",
        "optim.grad_clip=10.0",
        "schedule.kmeans_init=true", "schedule.kmeans_descriptors=4000", "schedule.kmeans_batches=10",
        f"schedule.step1_iters={step1}", "schedule.step1_lr=0.0003", "schedule.step1_gamma=0.5",
        f"schedule.step1_decay_every={max(step1 // 2, 1)}",
        f"schedule.step2_iters={step2}", "schedule.step2_lr=0.0001",
        "log.log_every=10", f"log.ckpt_every={step1 + step2}", "log.eval_every=0",
        "log.progress=true", "log.tensorboard=false",
    ])


def _row(report: dict, protocol: str) -> Dict[str, float]:
    r = report[protocol]["all/all"]
    cmc = r["cmc"]
    return {"rank1": cmc[0], "rank5": cmc[min(4, len(cmc) - 1)], "rank20": cmc[min(19, len(cmc) - 1)],
            "mAP": r["mAP"]}


def _table(results: Dict[str, dict]) -> str:
    lines = []
    for protocol in ("standard", "mars"):
        lines.append(f"\nprotocol '{protocol}'")
        lines.append(f"  {'model':34s} {'rank-1':>7s} {'rank-5':>7s} {'rank-20':>8s} {'mAP':>7s}")
        for name, rep in results.items():
            r = _row(rep, protocol)
            lines.append(f"  {name:34s} {100 * r['rank1']:6.1f}% {100 * r['rank5']:6.1f}% "
                         f"{100 * r['rank20']:7.1f}% {100 * r['mAP']:6.1f}%")
    return "\n".join(lines)


def _pictures(out_dir: str, results: Dict[str, dict], model, dataset, feats_path: str) -> List[str]:
    from .data import read_clip, test_clip_indices
    from .eval import compute_distmat
    from .eval.modes import FeatureFile
    from .eval.visualize import plot_cmc, plot_part_maps, plot_ranked_list

    pics = []
    curves = {name: rep["standard"]["all/all"]["cmc"] for name, rep in results.items()}
    pics.append(plot_cmc(curves, os.path.join(out_dir, "cmc.png"), max_rank=20,
                         title="CMC, synthetic tiny set (standard protocol)"))

    # Part maps of the trained PersonVLAD model on the first query tracklet.
    frames, _, _ = dataset.query[0]
    cfg = model.config
    idx = test_clip_indices(len(frames), clip_len=cfg.clip_len, stride=8)[0]
    clip = read_clip(frames, idx, size=(cfg.height, cfg.width))  # uint8 (3, T, H, W)
    with torch.no_grad():
        _, parts = model(clip[None], return_parts=True)
    pics.append(plot_part_maps(clip.permute(1, 0, 2, 3), parts[0].float().numpy(),
                               os.path.join(out_dir, "part_maps.png")))

    # Ranked gallery list for the first query.
    ff = FeatureFile(feats_path)
    dist = compute_distmat(ff["query_feats"][:1], ff["gallery_feats"])[0]
    order = np.argsort(dist, kind="stable")
    qp, qc = int(ff["query_pids"][0]), int(ff["query_camids"][0])
    gp, gc = ff["gallery_pids"], ff["gallery_camids"]
    keep = [i for i in order if not (gp[i] == qp and gc[i] == qc)][:10]
    pics.append(plot_ranked_list(str(ff["query_first_frame"][0]), [str(ff["gallery_first_frame"][i]) for i in keep],
                                 [bool(gp[i] == qp) for i in keep], os.path.join(out_dir, "ranked_list.png")))
    return pics


def run_pipeline(out_dir: str = "demo_out", fast: bool = False, seed: int = 0) -> Dict[str, dict]:
    """Run the demo; returns ``{model name: evaluation report}`` and writes
    ``summary.json`` (the table's numbers, timings) into ``out_dir``."""
    from .data import MARS
    from .data.synth import ensure_generated
    from .engine import extract_features, train
    from .engine.extract import load_model_from_checkpoint
    from .eval.modes import evaluate_feature_file
    from .models import build_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    os.makedirs(out_dir, exist_ok=True)
    # one folder per seed: the set of another seed is never reused or clobbered
    data_root = os.path.join(out_dir, "data", "synthetic-tiny" + (f"-seed{seed}" if seed else ""))

    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(data_root, "synth.json")):
        print(f"generating the tiny synthetic MARS-layout set in {data_root} ...", flush=True)
    ensure_generated(data_root, preset="tiny", seed=seed)
    dataset = MARS(data_root)
    timings["synth"] = time.perf_counter() - t0
    print(f"data: {len(dataset.train)} train tracklets of {dataset.num_train_pids} ids, "
          f"{len(dataset.query)} query / {len(dataset.gallery)} gallery tracklets "
          f"({timings['synth']:.1f} s)", flush=True)

    runs = {"PersonVLAD (trained)": "vlad", "3D ConvNet + GP avg (trained)": "avg"}
    results: Dict[str, dict] = {}
    feats: Dict[str, str] = {}

    # The untrained model: the same tiny PersonVLAD network at initialisation.
    t0 = time.perf_counter()
    untrained = build_model("tiny").eval()
    path = os.path.join(out_dir, "feats_untrained.npz")
    extract_features(untrained, dataset, path, workers=0, progress=True)
    results["PersonVLAD (untrained)"] = evaluate_feature_file(path, protocols=("standard", "mars"))
    feats["PersonVLAD (untrained)"] = path
    timings["untrained"] = time.perf_counter() - t0

    trained_vlad = None
    for name, head in runs.items():
        t0 = time.perf_counter()
        # one folder per budget and seed: resume=True continues an interrupted
        # demo, never another budget's or seed's run (its data differ)
        run_dir = os.path.join(out_dir, "runs", f"{head}-{'fast' if fast else 'full'}-seed{seed}")
        cfg = _demo_config(data_root, head, fast, seed)
        step1, step2 = cfg.schedule.step1_iters, cfg.schedule.step2_iters
        print(f"\ntraining {name}: {step1} + {step2} iterations, batch "
              f"{cfg.data.num_ids * cfg.data.num_per_id} clips, OIM loss -> {run_dir}", flush=True)
        summary = train(cfg, run_dir, resume=True)
        model = load_model_from_checkpoint(summary["checkpoint"], "cpu").eval()
        path = os.path.join(out_dir, f"feats_{head}.npz")
        extract_features(model, dataset, path, workers=0, progress=True)
        results[name] = evaluate_feature_file(path, protocols=("standard", "mars"))
        feats[name] = path
        timings[f"train+eval {head}"] = time.perf_counter() - t0
        if head == "vlad":
            trained_vlad = model

    print(_table(results))
    pics = _pictures(out_dir, results, trained_vlad, dataset, feats["PersonVLAD (trained)"])
    timings["total"] = time.perf_counter() - t_start
    summary = {
        "fast": fast,
        "timings_s": timings,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "results": {name: {p: _row(rep, p) for p in ("standard", "mars")} for name, rep in results.items()},
        "pictures": pics,
        "features": feats,
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\npictures:")
    for p in pics:
        print(f"  {p}")
    print(f"numbers: {os.path.join(out_dir, 'summary.json')}; total {timings['total']:.0f} s on CPU "
          f"({torch.get_num_threads()} threads)")
    print("next: `personvlad train --config configs/mars.yaml --override data.root=/path/to/MARS` "
          "(see README: Training on MARS / iLIDS-VID / PRID-2011)")
    return results


def check_sane(results: Dict[str, dict]) -> Tuple[bool, str]:
    """The demo's acceptance check: the trained PersonVLAD beats the untrained
    model on rank-1 (standard protocol)."""
    tr = _row(results["PersonVLAD (trained)"], "standard")["rank1"]
    un = _row(results["PersonVLAD (untrained)"], "standard")["rank1"]
    return tr > un, f"trained rank-1 {tr:.3f} vs untrained {un:.3f}"
