"""CLI: ``personvlad synth`` (synthetic MARS-layout data) and ``personvlad pack``
(pre-packed uint8 frame shards for the fast loader)."""
from __future__ import annotations

import argparse
import logging
import os


def _synth(args) -> int:
    from .synth import generate

    generate(args.out, preset=args.preset, seed=args.seed, workers=args.workers, progress=not args.quiet)
    return 0


def _pack(args) -> int:
    from .readers import build_dataset
    from .shards import pack_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kw = {}
    if args.dataset == "prid" and args.min_frames is not None:
        kw["min_frames"] = args.min_frames
    ds = build_dataset(args.dataset, args.dataset_root, split_id=args.split_id, **kw)
    if not args.quiet:
        print(ds.summary(), flush=True)
    pack_dataset(ds, args.out, size=args.size, workers=args.workers, progress=not args.quiet)
    return 0


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "synth", help="write a synthetic MARS-layout dataset (rendered pedestrians)", formatter_class=fmt,
        description="Render a synthetic video re-id dataset in MARS's on-disk layout (bbox_train/, bbox_test/, "
                    "info/*.txt|*.mat), readable by personvlad.data.MARS.",
        epilog="example:\n  personvlad synth --out data_synth/tiny --preset tiny --seed 0\n"
               "  personvlad synth --out /data/mars_synth --preset mars-scale --workers 16")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "mars-scale"],
                   help="tiny: ~16+16 ids (seconds); small: ~100+100 ids; mars-scale: MARS's counts (long)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (same seed -> same bytes)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="rendering processes (the output does not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_synth)

    p = subparsers.add_parser(
        "pack", help="pack a dataset's frames into uint8 memmap shards for the fast loader", formatter_class=fmt,
        description="Decode every frame of a dataset once, resize to HxW and write frames.u8 (uint8 memmap, "
                    "N x H x W x 3) + index.npz, read by personvlad.data.shards.ShardTrainLoader/ShardTestLoader.",
        epilog="example:\n  personvlad pack --dataset-root data_synth/tiny --out shards/tiny --size 64x32\n"
               "  personvlad pack --dataset ilidsvid --dataset-root /data/ilids-vid --split-id 0 "
               "--out shards/ilids0 --size 180x90 --workers 16")
    p.add_argument("--dataset-root", required=True, help="dataset root in its official layout")
    p.add_argument("--dataset", default="mars", choices=["mars", "ilidsvid", "prid"], help="layout (default mars)")
    p.add_argument("--split-id", type=int, default=0, help="split for iLIDS-VID / PRID-2011")
    p.add_argument("--min-frames", type=int, default=None,
                   help="PRID-2011: also drop persons with a tracklet shorter than this (default 1: the split "
                        "file decides)")
    p.add_argument("--out", required=True, help="output directory for frames.u8 and index.npz")
    p.add_argument("--size", default="64x32", help="HxW of the packed frames (tiny model 64x32, paper 180x90)")
    p.add_argument("--workers", type=int, default=max(1, min(16, os.cpu_count() or 1)), help="decode processes")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_pack)
