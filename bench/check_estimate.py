"""How close `personvlad train --estimate` comes: probe a config, then run
its whole schedule (without evaluation) and compare the projection with the
measured wall time.

    python bench/check_estimate.py                      # configs/synthetic-tiny.yaml on CPU, 48-iteration probe
    python bench/check_estimate.py --config configs/synthetic-tiny.yaml --iters 48 --device cpu

Generates the tiny synthetic data set into a temporary folder when the
config's data set is synthetic and its root does not exist.  Prints one JSON
line: projected and measured seconds, their ratio, and the projection's parts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "synthetic-tiny.yaml"))
    p.add_argument("--iters", type=int, default=48, help="probe iterations (default 48)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    from personvlad.engine.config import TrainConfig
    from personvlad.engine.estimate import estimate
    from personvlad.engine.trainer import train

    with tempfile.TemporaryDirectory(prefix="pv-check-estimate-") as tmp:
        cfg = TrainConfig.from_yaml(args.config).apply_overrides(
            [f"device={args.device}", f"data.workers={args.workers}", "log.progress=false", "log.tensorboard=false"])
        if cfg.data.dataset == "synthetic" and not os.path.isdir(os.path.join(cfg.data.root, "info")):
            from personvlad.data.synth import generate

            root = os.path.join(tmp, "data")
            generate(root, preset=cfg.data.synth_preset, seed=cfg.data.synth_seed)
            cfg = cfg.apply_overrides([f"data.root={root}"])
        proj = estimate(cfg, args.iters)["projection"]
        t0 = time.perf_counter()
        train(cfg, os.path.join(tmp, "run"), evaluate=False)
        wall = time.perf_counter() - t0
    print(json.dumps(dict(config=os.path.basename(args.config), device=args.device, probe_iterations=args.iters,
                          projected_s=round(proj["total_s"], 2), measured_s=round(wall, 2),
                          ratio=round(proj["total_s"] / wall, 3),
                          components={k: (None if v is None else round(v, 2)) for k, v in proj["components"].items()})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
