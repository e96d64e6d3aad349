"""How long a training schedule takes on this machine, from a short probe run.

``personvlad train --config C --estimate 200`` (or :func:`estimate`) runs the
config's own pipeline (data loader, model, loss, optimizer, k-means
initialisation, checkpoints) for a short schedule, ``iters`` iterations split
between the two steps like the config's, in a temporary folder, and projects
the config's full schedule from the measured parts
(:func:`project_schedule`):

    total = setup + k-means + sum over steps (iterations x steady s/iteration)
            + warm-up excess of each step + checkpoints x mean checkpoint time
            [+ evaluations x mean evaluation time, when the probe measured one]

Iterations are timed on the host, from asking the loader for a batch to the
end of the optimizer step; the trainer waits for the GPU at its log and
checkpoint points, so the times add up to the GPU's between them, and a data
path that cannot keep up shows.  Evaluation is skipped in the probe by
default (on MARS it costs minutes and does not depend on the schedule's
length); ``evaluate=True`` measures it too.
"""
from __future__ import annotations

import copy
import math
import shutil
import tempfile
from typing import Any, Dict, Optional

from .config import TrainConfig

__all__ = ["project_schedule", "estimate", "format_projection"]


def _marks(total: int, s1: int, every: int) -> int:
    """How often a full run checkpoints (or evaluates): every ``every``
    iterations, at the end of step 1 and at the end."""
    marks = set(range(every, total + 1, every)) if every > 0 else set()
    if s1 > 0:
        marks.add(s1)
    marks.add(total)
    return len(marks)


def project_schedule(timings: Dict[str, Any], config: TrainConfig) -> Dict[str, Any]:
    """Project ``config``'s full schedule from a run's ``timings`` (the
    ``"timings"`` of :func:`personvlad.engine.trainer.train`'s summary).

    Returns ``total_s`` and its ``components`` (seconds), ``s_per_iteration``
    and ``clips_per_s`` (steady, per step), ``iterations`` per step, the
    counts of checkpoints and evaluations, ``notes`` on anything assumed, and
    ``evaluations_included``."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if not isinstance(timings, dict) or "steady" not in timings or "warmup" not in timings:
        raise ValueError("timings: expected the 'timings' dict of a train() summary (with 'steady' and 'warmup')")
    sc = config.schedule
    iters = {1: int(sc.step1_iters), 2: int(sc.step2_iters)}
    total = iters[1] + iters[2]
    batch = config.data.num_ids * config.data.num_per_id
    notes = []
    rate: Dict[int, float] = {}
    for step in (1, 2):
        st = timings["steady"].get(str(step)) or {}
        if st.get("iterations", 0) > 0:
            rate[step] = float(st["seconds"]) / st["iterations"]
    if not rate:
        raise ValueError(f"timings: no steady-state iteration was measured (the probe must run more than "
                         f"{timings.get('warmup_iterations')} warm-up iterations in a step)")
    for step in (1, 2):
        if step not in rate and iters[step] > 0:
            other = 2 if step == 1 else 1
            rate[step] = rate[other]
            notes.append(f"step {step} was not measured: step {other}'s s/iteration used")
    warm_excess = 0.0
    for step in (1, 2):
        w = timings["warmup"].get(str(step)) or {}
        if iters[step] > 0 and w.get("iterations", 0) > 0:
            # may be negative (noise: warm-up faster than the steady state); kept,
            # so that a run projected onto its own schedule gives back its time
            warm_excess += float(w["seconds"]) - w["iterations"] * rate[step]
    comps: Dict[str, Optional[float]] = {
        "setup": float(timings.get("setup_s") or 0.0),
        "kmeans": 0.0,
        "iterations": sum(iters[s] * rate[s] for s in (1, 2)),
        "warmup_excess": warm_excess,
        "checkpoints": 0.0,
        "evaluations": None,
    }
    if sc.kmeans_init and iters[1] > 0 and config.model_config().head == "vlad":
        if timings.get("kmeans_s") is None:
            notes.append("k-means initialisation was not measured (counted as 0)")
        else:
            comps["kmeans"] = float(timings["kmeans_s"])
    n_ckpt = _marks(total, iters[1], int(config.log.ckpt_every))
    ck = timings.get("checkpoint_s") or []
    if ck:
        comps["checkpoints"] = n_ckpt * (sum(ck) / len(ck))
    else:
        notes.append("no checkpoint was measured (counted as 0)")
    n_eval = _marks(total, iters[1], int(config.log.eval_every))
    ev = timings.get("eval_s") or []
    if ev:
        comps["evaluations"] = n_eval * (sum(ev) / len(ev))
    else:
        notes.append(f"the {n_eval} evaluation(s) were not measured and are not included")
    total_s = sum(v for v in comps.values() if v is not None)
    return dict(
        total_s=total_s, total_min=total_s / 60.0, components=comps,
        iterations={"1": iters[1], "2": iters[2]}, batch=batch, clips=total * batch,
        s_per_iteration={str(k): v for k, v in rate.items()},
        clips_per_s={str(k): batch / v for k, v in rate.items() if v > 0},
        checkpoints=n_ckpt, evaluations=n_eval, evaluations_included=bool(ev), notes=notes,
    )


def estimate(config: TrainConfig, iters: int = 200, *, evaluate: bool = False, out_dir: Optional[str] = None,
             progress: bool = False) -> Dict[str, Any]:
    """Run a probe of ``config`` (``iters`` iterations, split between the two
    steps like the config's, at least 12 in each step the config has) and
    return ``{"probe": its summary's timings and schedule, "projection":
    project_schedule(..., config)}``.  ``out_dir``: keep the probe's folder
    there (default: a temporary folder, removed)."""
    from .trainer import train

    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 24:
        raise ValueError(f"iters: expected an int >= 24 (10 warm-up iterations per step, then a steady "
                         f"state), got {iters!r}")
    sc = config.schedule
    total = sc.step1_iters + sc.step2_iters
    n1 = 0 if sc.step1_iters == 0 else max(12, round(iters * sc.step1_iters / total))
    n2 = 0 if sc.step2_iters == 0 else max(12, iters - n1)
    probe = copy.deepcopy(config)
    probe.schedule.step1_iters, probe.schedule.step2_iters = n1, n2
    probe.log.ckpt_every = max(1, (n1 + n2) // 3)  # a few checkpoints to time
    probe.log.eval_every = 0
    probe.log.progress = progress
    probe.log.tensorboard = False
    tmp = None
    if out_dir is None:
        tmp = out_dir = tempfile.mkdtemp(prefix="personvlad-estimate-")
    try:
        summary = train(probe, out_dir, progress=progress, evaluate=evaluate)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dict(probe=dict(iterations={"1": n1, "2": n2}, timings=summary["timings"]),
                projection=project_schedule(summary["timings"], config))


def format_projection(result: Dict[str, Any], name: str = "") -> str:
    """Human-readable lines for :func:`estimate`'s result."""
    p = result["projection"]
    it = p["iterations"]
    lines = [f"schedule{(' ' + name) if name else ''}: {it['1']} + {it['2']} iterations x {p['batch']} clips "
             f"= {p['clips']:,} clips"]
    for step in ("1", "2"):
        if step in p["s_per_iteration"] and it[step] > 0:
            cps = p["clips_per_s"].get(step)  # absent for a step measured at 0 s (a clock too coarse)
            lines.append(f"  step {step}: {1e3 * p['s_per_iteration'][step]:.1f} ms/iteration "
                         + (f"({cps:.0f} clips/s, steady state)" if cps is not None else "(clips/s not measured)"))
    for k, v in p["components"].items():
        lines.append(f"  {k:14s} " + ("not measured" if v is None else f"{v:9.1f} s"))
    total = p["total_s"]
    lines.append(f"projected total: {total:.0f} s = {total / 60:.1f} min"
                 + ("" if p["evaluations_included"] else f" (without the {p['evaluations']} evaluation(s))"))
    lines += [f"note: {n}" for n in p["notes"]]
    if not math.isfinite(total):
        lines.append("note: the projection is not finite")
    return "\n".join(lines)
