"""``personvlad train`` and ``personvlad extract``.

Registered in :mod:`personvlad.cli` through ``register(subparsers)``; also
runnable on its own: ``python -m personvlad.engine.cli train ...``.
Multi-GPU / multi-process: ``torchrun --nproc_per_node=N -m personvlad.cli train ...``
(the RANK/WORLD_SIZE environment torchrun sets is detected).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

TRAIN_EPILOG = """examples:
  personvlad train --config configs/synthetic-tiny.yaml --out runs/tiny
  personvlad train --config configs/mars.yaml --override data.root=/data/MARS --out runs/mars
  personvlad train --out runs/mars --resume          # continue from runs/mars/latest.pt
  personvlad train --config configs/mars.yaml --override data.root=/data/MARS --estimate 200
                                                     # time a 200-iteration probe, project the schedule
  torchrun --nproc_per_node=4 -m personvlad.cli train --config configs/mars.yaml \\
      --override data.root=/data/MARS --out runs/mars-ddp
"""

EXTRACT_EPILOG = """examples:
  personvlad extract --checkpoint runs/mars/best.pt --dataset mars --root /data/MARS --out mars_feats.npz
  personvlad extract --checkpoint runs/ilids/best.pt --dataset ilidsvid --root /data/iLIDS-VID \\
      --split-id 3 --include-train --out ilids_s3.npz
  personvlad evaluate --features mars_feats.npz --protocol both
"""


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    logging.getLogger("personvlad").setLevel(logging.INFO)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a PersonVLAD model (two-step OIM schedule; resumable; DDP via torchrun)",
        description="Train per a YAML config: k-means VLAD centers, step 1 (centers frozen, Adam eps 1e-4, lr "
                    "halved every N iterations), step 2 (joint fine-tuning), OIM loss; atomic checkpoints "
                    "(latest.pt, best.pt by mAP), CSV/TensorBoard logs, periodic evaluation (both protocols). "
                    "Under torchrun (RANK/WORLD_SIZE set) it runs DDP: NCCL on GPUs, gloo on CPU.", epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML training config: a file, or the name of a shipped one (mars, ilidsvid, "
                                    "prid, synthetic-tiny, ...: configs/*.yaml); with --resume and no --config, "
                                    "the run's own: the one stored in its latest checkpoint (else, before "
                                    "the first checkpoint, --out/config.yaml)")
    p.add_argument("--override", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, dotted keys (several, or repeat the flag), "
                        "e.g. schedule.step1_iters=100 optim.grad_clip=5")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--out", help="output folder (checkpoints, logs); default runs/<config name>")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many iterations in total")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--estimate", type=int, default=None, metavar="ITERS",
                   help="do not train: run a probe of ITERS iterations (>= 24) of this config in a temporary "
                        "folder (--out keeps it) and project the full schedule's wall time from it")
    p.add_argument("--estimate-eval", action="store_true", help="with --estimate: also time the evaluation")
    p.set_defaults(func=train_main)

    e = subparsers.add_parser(
        "extract", help="extract tracklet features of a data set's query/gallery (+train) into a .npz",
        description="Every tracklet -> clips every --stride frames -> clip descriptors -> tracklet activation "
                    "(mean, L2-normalised); writes the feature file that `personvlad evaluate` reads.",
        epilog=EXTRACT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--checkpoint", required=True, help="checkpoint written by personvlad train (latest.pt/best.pt)")
    e.add_argument("--dataset", required=True, choices=["mars", "ilidsvid", "prid"])
    e.add_argument("--root", required=True, help="data set folder (official layout; synthetic sets are 'mars')")
    e.add_argument("--split-id", type=int, default=0, help="split for iLIDS-VID / PRID-2011 (default 0)")
    e.add_argument("--out", required=True, help="output .npz")
    e.add_argument("--include-train", action="store_true", help="also extract the training split (XQDA/KISSME)")
    e.add_argument("--mars-kit-gallery", action="store_true",
                   help="MARS: every test track in the gallery, the queries included, as the MATLAB kit "
                        "ranks them (default: the other test tracks, as the Python ports)")
    e.add_argument("--batch-size", type=int, default=32, help="clips per forward pass (default 32)")
    e.add_argument("--clip-len", type=int, default=None, help="frames per clip (default: the model's)")
    e.add_argument("--stride", type=int, default=8, help="frames between clip starts (default 8)")
    e.add_argument("--workers", type=int, default=4, help="data loader workers (default 4)")
    e.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto)")
    e.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast: auto = bf16 on CUDA, fp32 on CPU")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=extract_main)


def train_main(args) -> int:
    from .checkpoint import find_latest, load_checkpoint
    from .config import TrainConfig, resolve_config
    from .trainer import train

    _setup_logging()
    if args.stop_after is not None and args.stop_after < 1:
        print(f"error: --stop-after: expected >= 1 iterations, got {args.stop_after}", file=sys.stderr)
        return 2
    if args.estimate is None and args.estimate_eval:
        print("error: --estimate-eval goes with --estimate ITERS", file=sys.stderr)
        return 2
    if args.estimate is not None and args.stop_after is not None:
        print("error: --estimate runs its own ITERS-iteration probe; it does not take --stop-after", file=sys.stderr)
        return 2
    if args.config:
        try:
            path = resolve_config(args.config)
        except FileNotFoundError as e:
            print(f"error: --config {e}", file=sys.stderr)
            return 2
        cfg = TrainConfig.from_yaml(path)
    elif args.resume and args.out:
        # the checkpoint's config is the one its weights were trained with;
        # config.yaml is only the record of a run that crashed before its
        # first checkpoint
        saved = os.path.join(args.out, "config.yaml")
        path = find_latest(args.out)
        if path is not None:
            cfg = TrainConfig.from_dict(load_checkpoint(path)["config"], saved=True)
        elif os.path.isfile(saved):
            cfg = TrainConfig.from_yaml(saved, saved=True)
        else:
            print(f"error: --resume without --config needs a checkpoint or {saved} in {args.out}", file=sys.stderr)
            return 2
    else:
        print("error: --config is required (or --resume with --out)", file=sys.stderr)
        return 2
    cfg = cfg.apply_overrides(args.override)
    if args.estimate is not None:
        from .estimate import estimate, format_projection

        if args.resume:
            print("error: --estimate runs a fresh probe; it does not take --resume", file=sys.stderr)
            return 2
        try:
            result = estimate(cfg, args.estimate, evaluate=args.estimate_eval, out_dir=args.out,
                              progress=not args.no_progress)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(format_projection(result, cfg.name))
        print(json.dumps(result["projection"], indent=1))
        return 0
    out = args.out or os.path.join("runs", cfg.name)
    summary = train(cfg, out, resume=args.resume, progress=False if args.no_progress else None,
                    stop_after=args.stop_after)
    if int(os.environ.get("RANK", "0")) == 0:
        short = {k: summary[k] for k in ("out_dir", "iterations", "first_loss", "last_loss", "best", "metrics")}
        print(json.dumps(short, indent=1, default=str))
    return 0


def extract_main(args) -> int:
    import torch

    from ..data.readers import build_dataset
    from .distributed import resolve_device
    from .extract import extract_features, load_model_from_checkpoint

    _setup_logging()
    device = resolve_device(args.device)
    model = load_model_from_checkpoint(args.checkpoint, device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last_3d)
    if args.mars_kit_gallery and args.dataset != "mars":
        raise SystemExit(f"--mars-kit-gallery: MARS only, got --dataset {args.dataset}")
    kw = {"kit_gallery": True} if args.mars_kit_gallery else {}
    dataset = build_dataset(args.dataset, args.root, split_id=args.split_id, **kw)
    meta = {"dataset": args.dataset, "root": os.path.abspath(args.root), "split_id": args.split_id,
            "checkpoint": os.path.abspath(args.checkpoint), "mars_kit_gallery": bool(args.mars_kit_gallery)}
    arrays = extract_features(model, dataset, args.out, include_train=args.include_train, batch_size=args.batch_size,
                              clip_len=args.clip_len, stride=args.stride, workers=args.workers, amp=args.amp,
                              progress=not args.no_progress, meta=meta)
    print(f"wrote {args.out}: query {arrays['query_feats'].shape}, gallery {arrays['gallery_feats'].shape}"
          + (f", train {arrays['train_feats'].shape}" if args.include_train else ""))
    return 0


def main(argv=None) -> int:
    """Standalone entry (``python -m personvlad.engine.cli ...``): this module's commands only."""
    from ..cli import main as cli_main

    return cli_main(argv, modules=[__name__])


if __name__ == "__main__":
    sys.exit(main())
