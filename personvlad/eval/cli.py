"""CLI: ``personvlad evaluate``, ``personvlad index build``, ``personvlad search``,
``personvlad visualize {cmc,parts,response,ranked}``.

Registered by listing ``personvlad.eval.cli`` in ``personvlad.cli.COMMAND_MODULES``.
Only argparse is imported at registration; the work is imported when a command runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_RAW = argparse.RawDescriptionHelpFormatter


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------
def _cmd_evaluate(args) -> int:
    from .modes import evaluate_splits, format_table, write_json

    protocols = ["standard", "mars"] if args.protocol == "both" else [args.protocol]
    metric_kwargs = None
    if args.metric in ("xqda", "kissme"):
        pca = args.pca_dim
        if pca not in ("none", "auto"):
            try:
                pca = int(pca)
            except ValueError:
                return _fail(f"--pca-dim: expected 'auto', 'none' or a positive int, got {args.pca_dim!r}")
        metric_kwargs = {"reg": args.reg, "pca_dim": None if pca == "none" else pca}
    try:
        report = evaluate_splits(args.features, protocols=protocols, metric=args.metric, modes=bool(args.modes),
                                 repeats=args.repeats, seed=args.seed, max_rank=args.max_rank,
                                 metric_kwargs=metric_kwargs, device=args.device)
    except ValueError as exc:
        return _fail(str(exc))
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def _register_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="CMC/mAP of feature files (protocols, Table II modes, metric learning, splits)",
        formatter_class=_RAW,
        description="Evaluate query/gallery features written by `personvlad extract`.\n"
                    "Several feature files are treated as repeated splits (mean ± std).",
        epilog="example:\n  personvlad evaluate --features runs/mars/feats.npz --protocol both --modes "
               "--json runs/mars/eval.json\n"
               "  personvlad evaluate --features ilids_split*.npz --metric xqda --max-rank 20")
    p.add_argument("--features", nargs="+", required=True, metavar="NPZ",
                   help="feature file(s); several = repeated splits, reported as mean ± std")
    p.add_argument("--protocol", choices=["standard", "mars", "both"], default="standard",
                   help="evaluation protocol (default: standard)")
    p.add_argument("--modes", action="store_true",
                   help="Table II: probe all/random-clip x gallery all/random-clip")
    p.add_argument("--repeats", type=int, default=10, help="draws averaged for random-clip modes (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-clip draws")
    p.add_argument("--metric", choices=["euclidean", "cosine", "xqda", "kissme"], default="euclidean",
                   help="distance; xqda/kissme are fitted on train_feats/train_pids of each file")
    p.add_argument("--pca-dim", default="auto",
                   help="xqda/kissme: PCA dimension ('auto' = 256 when D > 256, 'none', or an int)")
    p.add_argument("--reg", type=float, default=1e-3, help="xqda/kissme: relative ridge regulariser")
    p.add_argument("--max-rank", type=int, default=50, help="CMC length (default 50)")
    p.add_argument("--device", default=None, help="torch device for distances (default: cuda if available)")
    p.add_argument("--json", metavar="OUT", help="write the full report (incl. CMC curves) as JSON")
    p.set_defaults(func=_cmd_evaluate)


# ---------------------------------------------------------------------------
# index / search
# ---------------------------------------------------------------------------
def _cmd_index_build(args) -> int:
    from .retrieval import build_index_from_features

    try:
        index = build_index_from_features(args.features, split=args.split, index_type=args.type, nlist=args.nlist,
                                          nprobe=args.nprobe, use_faiss=False if args.no_faiss else None)
    except ValueError as exc:
        return _fail(str(exc))
    index.save(args.out)
    print(f"indexed {len(index)} {args.split} descriptors (dim {index.dim}, type {args.type}, "
          f"backend {index.backend}) -> {args.out}")
    return 0


def _cmd_search(args) -> int:
    from .retrieval import GalleryIndex, describe_query_frames, list_frames

    try:
        index = GalleryIndex.load(args.index, use_faiss=False if args.exact else None)
        query_pid = query_cam = None
        if args.query_features:
            if args.query_index is None:
                return _fail("--query-index is required with --query-features")
            from .modes import FeatureFile

            ff = FeatureFile(args.query_features)
            feats = ff[f"{args.query_split}_feats"]
            if not 0 <= args.query_index < feats.shape[0]:
                return _fail(f"--query-index: expected 0 <= I < {feats.shape[0]} ({args.query_split} tracklets), "
                             f"got {args.query_index}")
            q = feats[args.query_index]
            query_pid = int(ff[f"{args.query_split}_pids"][args.query_index])
            query_cam = int(ff[f"{args.query_split}_camids"][args.query_index])
        else:
            if not args.checkpoint:
                return _fail("--checkpoint is required with --query")
            # described as the gallery was (the feature file's clip length and stride, kept in the index)
            q = describe_query_frames(args.checkpoint, list_frames(args.query), clip_len=index.meta.get("clip_len"),
                                      stride=int(index.meta.get("stride", 8)))
        scores, idx = index.search(q, topk=args.topk, nprobe=args.nprobe)
    except (ValueError, RuntimeError) as exc:
        return _fail(str(exc))
    rows = []
    for r, (s, i) in enumerate(zip(scores[0], idx[0])):
        if i < 0:  # faiss pads with -1 when fewer results exist
            continue
        row = {"rank": r + 1, "index": int(i), "pid": int(index.pids[i]), "camid": int(index.camids[i]),
               "score": float(s)}
        if index.first_frame is not None:
            row["frame"] = str(index.first_frame[i])
        if query_pid is not None:
            row["correct"] = bool(index.pids[i] == query_pid)
        rows.append(row)
    head = "query" + (f" pid={query_pid} cam={query_cam}" if query_pid is not None else "")
    print(f"{head}  backend={index.backend}  top-{len(rows)} of {len(index)}")
    print(f"{'rank':>4}  {'index':>6}  {'pid':>6}  {'cam':>3}  {'score':>7}" + ("  same id" if query_pid is not None else ""))
    for row in rows:
        line = f"{row['rank']:>4}  {row['index']:>6}  {row['pid']:>6}  {row['camid']:>3}  {row['score']:>7.4f}"
        if "correct" in row:
            line += "  " + ("yes" if row["correct"] else "no")
        print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"query_pid": query_pid, "query_camid": query_cam, "results": rows}, fh, indent=2)
    return 0


def _register_retrieval(sub) -> None:
    p = sub.add_parser("index", help="build a gallery retrieval index (faiss when installed, exact otherwise)",
                       formatter_class=_RAW,
                       epilog="example:\n  personvlad index build --features feats.npz --out gallery.index --type ivf")
    isub = p.add_subparsers(dest="index_command", metavar="<action>")
    b = isub.add_parser("build", help="index the gallery descriptors of a feature file", formatter_class=_RAW,
                        epilog="example:\n  personvlad index build --features feats.npz --out gallery.index\n"
                               "  personvlad index build --features feats.npz --out g.index --type ivf --nlist 64")
    b.add_argument("--features", required=True, metavar="NPZ", help="feature file (personvlad extract)")
    b.add_argument("--out", required=True, help="index file to write (npz format)")
    b.add_argument("--split", default="gallery", help="which split to index (default gallery)")
    b.add_argument("--type", choices=["flat", "ivf"], default="flat", help="flat (exact) or ivf (approximate)")
    b.add_argument("--nlist", type=int, default=None, help="ivf cells (default min(sqrt(N), N/39))")
    b.add_argument("--nprobe", type=int, default=None, help="ivf cells visited per query (default nlist/8)")
    b.add_argument("--no-faiss", action="store_true", help="do not store a faiss index even if faiss is installed")
    b.set_defaults(func=_cmd_index_build)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    s = sub.add_parser("search", help="top-k gallery tracklets for a query", formatter_class=_RAW,
                       epilog="example:\n  personvlad search --index gallery.index --query-features feats.npz "
                              "--query-index 0 --topk 10\n"
                              "  personvlad search --index gallery.index --query path/to/tracklet_dir "
                              "--checkpoint ckpt.pt")
    s.add_argument("--index", required=True, help="index file (personvlad index build)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--query-features", metavar="NPZ", help="take the query descriptor from a feature file")
    g.add_argument("--query", nargs="+", metavar="PATH", help="a tracklet directory or its frame files")
    s.add_argument("--query-index", type=int, help="row of the query split in --query-features")
    s.add_argument("--query-split", default="query", help="split of --query-features (default query)")
    s.add_argument("--checkpoint", help="model checkpoint, needed with --query")
    s.add_argument("--topk", type=int, default=10, help="results to print (default 10)")
    s.add_argument("--nprobe", type=int, default=None, help="ivf: cells visited (default: the index's)")
    s.add_argument("--exact", action="store_true", help="exact search even when faiss is installed")
    s.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    s.set_defaults(func=_cmd_search)


# ---------------------------------------------------------------------------
# visualize
# ---------------------------------------------------------------------------
def _load_frames(path: str):
    import numpy as np

    if os.path.isdir(path):
        from PIL import Image

        from .retrieval import list_frames

        frames = list_frames([path])
        imgs = []
        size = None
        for fp in frames:
            with Image.open(fp) as im:
                im = im.convert("RGB")
                size = size or im.size
                imgs.append(np.asarray(im.resize(size)))
        return np.stack(imgs)
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    raise ValueError(f"--frames: expected a directory of frames or an .npy array, got {path}")


def _load_array(path: str, what: str):
    import numpy as np

    if not os.path.isfile(path):
        raise ValueError(f"{what}: file not found: {path}")
    if path.endswith(".npz"):
        z = np.load(path, allow_pickle=False)
        if len(z.files) != 1:
            raise ValueError(f"{what}: {path} must hold exactly one array, has {z.files}")
        return z[z.files[0]]
    return np.load(path, allow_pickle=False)


def _cmd_vis_cmc(args) -> int:
    from .visualize import load_cmc_curves, plot_cmc

    try:
        curves = load_cmc_curves(args.inputs, protocol=args.protocol, mode=args.mode, labels=args.labels,
                                 max_rank=args.max_rank)
        written = plot_cmc(curves, args.out, max_rank=args.max_rank, title=args.title)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"wrote {written}")
    return 0


def _cmd_vis_parts(args) -> int:
    from .visualize import plot_part_maps

    try:
        written = plot_part_maps(_load_frames(args.frames), _load_array(args.parts, "--parts"), args.out,
                       alpha=args.alpha, scale=args.scale, max_frames=args.max_frames)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"wrote {written}")
    return 0


def _cmd_vis_response(args) -> int:
    from .visualize import plot_feature_response

    try:
        written = plot_feature_response(_load_frames(args.frames), _load_array(args.feature_map, "--feature-map"),
                                        args.out, alpha=args.alpha, scale=args.scale, max_frames=args.max_frames)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"wrote {written}")
    return 0


def ranked_gallery(features: str, query_index: int, topk: int = 10, metric: str = "euclidean",
                   drop_same_camera: bool = True):
    """Ranked gallery for one query of a feature file.

    Returns ``(query_frame, gallery_frames, correct_flags, distances, gallery_indices)``;
    with ``drop_same_camera`` the gallery entries with the query's id *and*
    camera are left out (as the standard protocol does).
    """
    from .distance import compute_distmat
    from .modes import FeatureFile
    from .protocols import check_positive_int, stable_argsort_rows

    check_positive_int("topk", topk)
    ff = FeatureFile(features)
    ff.require("query_first_frame", "needed for the ranked-list picture")
    ff.require("gallery_first_frame", "needed for the ranked-list picture")
    nq = ff["query_feats"].shape[0]
    if not 0 <= query_index < nq:
        raise ValueError(f"query_index: expected 0 <= I < {nq}, got {query_index}")
    d = compute_distmat(ff["query_feats"][query_index:query_index + 1], ff["gallery_feats"], metric=metric)[0]
    gp, gc = ff["gallery_pids"], ff["gallery_camids"]
    qp, qc = ff["query_pids"][query_index], ff["query_camids"][query_index]
    order = stable_argsort_rows(d[None])[0]
    if drop_same_camera:
        order = order[~((gp[order] == qp) & (gc[order] == qc))]
    order = order[:topk]
    return (str(ff["query_first_frame"][query_index]), [str(x) for x in ff["gallery_first_frame"][order]],
            (gp[order] == qp).tolist(), d[order].tolist(), order.tolist())


def _cmd_vis_ranked(args) -> int:
    from .visualize import plot_ranked_list

    try:
        qf, gfs, flags, dists, _ = ranked_gallery(args.features, args.query_index, args.topk, args.metric,
                                                  drop_same_camera=not args.keep_same_camera)
        written = plot_ranked_list(qf, gfs, flags, args.out, scores=dists)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"wrote {written} (rank-1 {'correct' if flags and flags[0] else 'wrong'})")
    return 0


def _register_visualize(sub) -> None:
    p = sub.add_parser("visualize", help="pictures: CMC curves, part maps, feature responses, ranked lists",
                       formatter_class=_RAW,
                       epilog="example:\n  personvlad visualize cmc --inputs a.json b.json --out cmc.png\n"
                              "  personvlad visualize ranked --features feats.npz --query-index 0 --out ranked.png")
    vsub = p.add_subparsers(dest="vis_command", metavar="<picture>")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    c = vsub.add_parser("cmc", help="CMC curves of result JSONs or feature files (Fig. 9)", formatter_class=_RAW,
                        epilog="example:\n  personvlad visualize cmc --inputs vlad.json avg.json "
                               "--labels VLAD avg --out cmc.png")
    c.add_argument("--inputs", nargs="+", required=True, help="`personvlad evaluate --json` reports or feature files")
    c.add_argument("--labels", nargs="+", default=None, help="legend labels (default: file names)")
    c.add_argument("--protocol", choices=["standard", "mars"], default="standard")
    c.add_argument("--mode", default="all/all", help="Table II mode of the curve (default all/all)")
    c.add_argument("--max-rank", type=int, default=20, help="ranks shown (default 20)")
    c.add_argument("--title", default=None)
    c.add_argument("--out", required=True, help="PNG to write")
    c.set_defaults(func=_cmd_vis_cmc)

    for name, fn, help_, arg, arg_help in (
            ("parts", _cmd_vis_parts, "part maps overlaid on frames (Fig. 8)", "--parts",
             "(B, T', H', W') part maps, .npy (e.g. from model(clips, return_parts=True))"),
            ("response", _cmd_vis_response, "feature-response maps over frames (Fig. 5)", "--feature-map",
             "(C, T', H', W') feature map, .npy (e.g. model.features(clips)[0])")):
        q = vsub.add_parser(name, help=help_, formatter_class=_RAW,
                            epilog=f"example:\n  personvlad visualize {name} --frames tracklet_dir/ "
                                   f"{arg} {arg.strip('-').replace('-', '_')}.npy --out {name}.png")
        q.add_argument("--frames", required=True, help="directory of frames or (T,H,W,3)/(T,3,H,W) uint8 .npy")
        q.add_argument(arg, required=True, help=arg_help)
        q.add_argument("--out", required=True, help="PNG to write")
        q.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
        q.add_argument("--scale", type=int, default=2, help="pixel scale of each frame")
        q.add_argument("--max-frames", type=int, default=8, help="frames shown at most")
        q.set_defaults(func=fn)

    r = vsub.add_parser("ranked", help="ranked gallery list of a query, green = correct, red = wrong",
                        formatter_class=_RAW,
                        epilog="example:\n  personvlad visualize ranked --features feats.npz --query-index 3 "
                               "--topk 10 --out ranked.png")
    r.add_argument("--features", required=True, help="feature file with *_first_frame entries")
    r.add_argument("--query-index", type=int, required=True, help="row of the query split")
    r.add_argument("--topk", type=int, default=10)
    r.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean")
    r.add_argument("--keep-same-camera", action="store_true",
                   help="keep gallery entries with the query's id and camera (removed by default)")
    r.add_argument("--out", required=True, help="PNG to write")
    r.set_defaults(func=_cmd_vis_ranked)


def register(subparsers) -> None:
    """Add ``evaluate``, ``index``, ``search`` and ``visualize`` to the ``personvlad`` CLI."""
    _register_evaluate(subparsers)
    _register_retrieval(subparsers)
    _register_visualize(subparsers)


def main(argv=None) -> int:
    """Standalone entry (``python -m personvlad.eval.cli ...``): this module's commands only."""
    from ..cli import main as cli_main

    return cli_main(argv, modules=[__name__])


if __name__ == "__main__":
    sys.exit(main())
