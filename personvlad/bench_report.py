"""``personvlad bench``: turn pytest-benchmark results into reports and tables.

- ``personvlad bench report RESULTS.json [--out DIR]`` prints a Markdown table
  per benchmark group (name, mean / median / min time, ops/s, clips/s or
  frames/s, peak memory, speed-up vs the baseline named in
  ``extra_info["baseline"]``); with ``--out`` it also writes
  ``DIR/<stem>.md`` and a bar chart of the speed-ups ``DIR/<stem>_speedup.png``.
- ``personvlad bench table RESULTS.json [...] [--out personvlad/backend_table.json]``
  reduces GPU op benchmarks (``extra_info``: ``op_backend``, ``C``, ``P``,
  ``K``, ``B``, ``dtype``, ``mode``) to the table ``backend="auto"`` reads
  (:mod:`personvlad._backend_table`): each shape class mapped to the faster of
  ``"cuda"`` / ``"triton"``.

Baselines: ``extra_info["baseline"]`` names another benchmark of the same group
by its ``label``, ``variant`` or ``op_backend`` extra_info, its ``param`` or
its test name; benchmarks without a group match among the ungrouped ones.  A
list names several, and the fastest of those present is the baseline (the op
benchmarks: the best of eager and ``torch.compile``'d unfused PyTorch).
No baseline in the group: no speed-up.  Speed-up = baseline median / this
median.  With ``extra_info["output_bytes"]`` a ``peak/output`` column gives
the peak memory as a multiple of the output's size.

Work and ceilings (:mod:`personvlad.roofline`): with ``extra_info["flops"]``
(or ``gemm_flops`` + ``vector_flops``) and/or ``bytes`` per round, the table
adds the achieved ``TFLOP/s`` and ``GB/s`` (algorithmic work / median time);
with ``roofline_s`` (the device's bound for that work) a ``% roofline`` column
gives ``roofline_s / median`` and what bounds it (``matmul``, ``vector`` or
``memory``).  Rows with targets in extra_info (``target_speedup``,
``target_peak_per_output``, ``target_clips_per_s``) get a ``target`` column:
"met" or what fell short.  A ``schedule_projection_s`` (bench/test_bench_train.py's probe of
the trainer, :mod:`personvlad.engine.estimate`) is printed under its group's
table with its components and ``schedule_target_s``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
from collections import OrderedDict, defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "load_results",
    "summarize",
    "markdown_report",
    "plot_speedups",
    "write_report",
    "reduce_backend_table",
    "write_backend_table",
    "register",
]

_LABEL_KEYS = ("label", "variant", "op_backend")
_OP_BACKENDS = {"cuda": "cuda", "triton": "triton", "fused-cuda": "cuda", "fused-triton": "triton"}


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------
def load_results(path: str) -> Dict[str, Any]:
    """Read a pytest-benchmark JSON file (``--benchmark-json``)."""
    if not os.path.isfile(path):
        raise ValueError(f"results: no such file {path!r}")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"results: {path!r} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"results: expected a pytest-benchmark JSON with a 'benchmarks' list, got "
                         f"{type(data).__name__} with keys {sorted(data) if isinstance(data, dict) else '-'}")
    for i, b in enumerate(data["benchmarks"]):
        if not isinstance(b, dict) or "name" not in b or not isinstance(b.get("stats"), dict):
            raise ValueError(f"results: benchmark #{i} has no 'name'/'stats'")
        for k in ("mean", "median", "min"):
            if not isinstance(b["stats"].get(k), (int, float)):
                raise ValueError(f"results: benchmark {b['name']!r} has no numeric stats[{k!r}]")
    return data


def _labels(b: Dict[str, Any]) -> List[str]:
    ei = b.get("extra_info") or {}
    out = [str(ei[k]) for k in _LABEL_KEYS if ei.get(k) is not None]
    for k in ("param", "name", "fullname"):
        if b.get(k):
            out.append(str(b[k]))
    return out


def _find_baseline(b: Dict[str, Any], benches: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The benchmark of ``b``'s group that ``extra_info["baseline"]`` names;
    a list of names means the fastest (smallest median) of those present.
    A baseline without a finite, positive median (an interrupted or broken
    run) does not count."""
    base = (b.get("extra_info") or {}).get("baseline")
    if base is None:
        return None
    names = [str(x) for x in base] if isinstance(base, (list, tuple)) else [str(base)]
    group = b.get("group")
    found = []
    for name in names:
        same = [x for x in benches if x.get("group") == group and name in _labels(x)]
        if same and _positive(same[0]["stats"].get("median")):
            found.append(same[0])
    if not found:
        return None
    return min(found, key=lambda x: x["stats"]["median"])


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _baseline_label(b: Dict[str, Any], base: Optional[Dict[str, Any]]) -> Optional[str]:
    ei = b.get("extra_info") or {}
    if base is None:
        if ei.get("baseline") is None:
            return None
        names = ei["baseline"] if isinstance(ei["baseline"], (list, tuple)) else [ei["baseline"]]
        return "/".join(str(n) for n in names)
    names = ei["baseline"] if isinstance(ei["baseline"], (list, tuple)) else [ei["baseline"]]
    return next(str(n) for n in names if str(n) in _labels(base))


def _rate(b: Dict[str, Any], key: str, per_round_key: str) -> Optional[float]:
    ei = b.get("extra_info") or {}
    if isinstance(ei.get(key), (int, float)):
        return float(ei[key])
    if isinstance(ei.get(per_round_key), (int, float)) and b["stats"]["mean"] > 0:
        return float(ei[per_round_key]) / b["stats"]["mean"]
    return None


def _peak(b: Dict[str, Any]) -> Optional[int]:
    ei = b.get("extra_info") or {}
    for k in ("peak_bytes", "peak_mem_bytes", "cuda_max_allocated_bytes"):
        v = ei.get(k)
        if isinstance(v, (int, float)) and v >= 0:
            return int(v)
    return None


def _num(ei: Dict[str, Any], key: str) -> Optional[float]:
    v = ei.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _work(ei: Dict[str, Any]) -> Tuple[Optional[float], Optional[float]]:
    """(flops, bytes) per round from extra_info, or None each."""
    flops = _num(ei, "flops")
    if flops is None and _num(ei, "gemm_flops") is not None:
        flops = _num(ei, "gemm_flops") + (_num(ei, "vector_flops") or 0.0)
    return flops, _num(ei, "bytes")


def summarize(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per benchmark: name, group, label, mean/median/min (s), ops,
    clips_per_s, frames_per_s, peak_bytes, baseline, speedup, tflops, gbps,
    roofline_frac, bound_by (or None)."""
    benches = data["benchmarks"]
    rows = []
    for b in benches:
        ei = b.get("extra_info") or {}
        st = b["stats"]
        base = _find_baseline(b, benches)
        speedup = None
        if base is not None and _positive(st["median"]):
            speedup = base["stats"]["median"] / st["median"]
        labels = _labels(b)
        rows.append(OrderedDict(
            name=b["name"], group=b.get("group") or "(no group)", label=labels[0] if labels else "(unnamed)",
            mean=float(st["mean"]), median=float(st["median"]), min=float(st["min"]),
            ops=float(st.get("ops") or (1.0 / st["mean"] if st["mean"] > 0 else float("nan"))),
            rounds=st.get("rounds"),
            clips_per_s=_rate(b, "clips_per_s", "clips"), frames_per_s=_rate(b, "frames_per_s", "frames"),
            peak_bytes=_peak(b), baseline=_baseline_label(b, base), speedup=speedup,
            peak_per_output=(_peak(b) / ei["output_bytes"]
                             if _peak(b) is not None and isinstance(ei.get("output_bytes"), (int, float))
                             and ei["output_bytes"] > 0 else None),
            device=ei.get("device"),
        ))
        flops, nbytes = _work(ei)
        med = float(st["median"])
        bound = _num(ei, "roofline_s")
        rows[-1].update(
            tflops=flops / med / 1e12 if flops is not None and med > 0 else None,
            gbps=nbytes / med / 1e9 if nbytes is not None and med > 0 else None,
            roofline_frac=bound / med if bound is not None and med > 0 else None,
            bound_by=ei.get("bound_by") if bound is not None else None,
            schedule_s=_num(ei, "schedule_projection_s"), schedule_target_s=_num(ei, "schedule_target_s"),
            schedule_components=ei.get("schedule_components_s"), schedule_iterations=ei.get("schedule_iterations"),
        )
        rows[-1]["target"] = _verdict(ei, rows[-1])
    return rows


def _verdict(ei: Dict[str, Any], row: Dict[str, Any]) -> Optional[str]:
    """"met" / "not met: ..." against the row's targets in extra_info
    (``target_speedup``: at least, vs the baseline; ``target_peak_per_output``:
    at most; ``target_clips_per_s``: at least), None without targets."""
    wanted = {k: _num(ei, k) for k in ("target_speedup", "target_peak_per_output", "target_clips_per_s")}
    if all(v is None for v in wanted.values()):
        return None
    checks = []
    for key, value, fmt, at_least in (
            ("target_speedup", row["speedup"], "{:.3g}x", True),
            ("target_peak_per_output", row["peak_per_output"], "{:.3g}x output", False),
            ("target_clips_per_s", row["clips_per_s"], "{:,.0f} clips/s", True)):
        want = wanted[key]
        if want is None:
            continue
        if value is None:
            checks.append(f"{fmt.format(want)} not measured")
        elif not ((value >= want) if at_least else (value <= want)):
            checks.append(f"{fmt.format(value)} vs {'>=' if at_least else '<='} {fmt.format(want)}")
    return "met" if not checks else "not met: " + "; ".join(checks)


# --------------------------------------------------------------------------
# Markdown + chart
# --------------------------------------------------------------------------
def _fmt_units(x: float, units: Sequence[Tuple[str, float]]) -> str:
    """``x`` to 3 significant digits in the largest unit (``units`` from the
    largest scale down) it reaches, moving up a unit where the rounding
    reaches 1000 (999.6 ms is "1 s", never "1e+03 ms")."""
    i = next((j for j, (_, scale) in enumerate(units) if x >= scale), len(units) - 1)
    if i > 0 and float(f"{x / units[i][1]:.3g}") >= 1000:
        i -= 1
    return f"{x / units[i][1]:.3g} {units[i][0]}"


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    return _fmt_units(s, (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)))


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    if n < 1000:
        return f"{n} B"
    return _fmt_units(n, (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)))


def _fmt_num(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    s = f"{x:.4g}"
    return f"{x:,.0f}" if abs(x) >= 1 and "e" in s else s


def markdown_report(data: Dict[str, Any], title: Optional[str] = None, chart: Optional[str] = None) -> str:
    rows = summarize(data)
    machine = data.get("machine_info") or {}
    devices = sorted({str(r["device"]) for r in rows if r["device"]})
    lines = [f"# {title or 'Benchmark results'}", ""]
    meta = []
    if data.get("datetime"):
        meta.append(f"date {data['datetime']}")
    if devices:
        meta.append("device " + ", ".join(devices))
    peaks = sorted({f"{(b.get('extra_info') or {}).get('peaks_name')} ({(b.get('extra_info') or {}).get('peaks_source')})"
                    for b in data["benchmarks"] if (b.get("extra_info") or {}).get("peaks_name")})
    if peaks:
        meta.append("roofline peaks " + ", ".join(peaks))
    if machine.get("cpu", {}).get("brand_raw"):
        meta.append(f"CPU {machine['cpu']['brand_raw']}")
    if data.get("version"):
        meta.append(f"pytest-benchmark {data['version']}")
    if meta:
        lines += ["; ".join(meta) + ".", ""]
    lines += ["Speed-up = median time of the row's baseline / its median time (>1: faster); where "
              "several baselines are named, the fastest of them.", ""]
    has_clips = any(r["clips_per_s"] is not None for r in rows)
    has_ratio = any(r["peak_per_output"] is not None for r in rows)
    has_frames = any(r["frames_per_s"] is not None for r in rows)
    has_tflops = any(r["tflops"] is not None for r in rows)
    has_gbps = any(r["gbps"] is not None for r in rows)
    has_roof = any(r["roofline_frac"] is not None for r in rows)
    has_target = any(r["target"] is not None for r in rows)
    if has_roof:
        lines += ["% roofline = the device's bound for the row's algorithmic work (datasheet peaks, "
                  "personvlad.roofline) / its median time, and the resource that bounds it.", ""]
    by_group: Dict[str, List[Dict[str, Any]]] = OrderedDict()
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    for group, rs in by_group.items():
        lines += [f"## {group}", ""]
        head = ["name", "mean", "median", "min", "ops/s"]
        head += (["clips/s"] if has_clips else []) + (["frames/s"] if has_frames else [])
        head += (["TFLOP/s"] if has_tflops else []) + (["GB/s"] if has_gbps else [])
        head += (["% roofline"] if has_roof else [])
        head += ["peak mem"] + (["peak/output"] if has_ratio else []) + ["baseline", "speed-up"]
        head += ["target"] if has_target else []
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in rs:
            cells = [r["name"], _fmt_time(r["mean"]), _fmt_time(r["median"]), _fmt_time(r["min"]), _fmt_num(r["ops"])]
            if has_clips:
                cells.append(_fmt_num(r["clips_per_s"]))
            if has_frames:
                cells.append(_fmt_num(r["frames_per_s"]))
            if has_tflops:
                cells.append(f"{r['tflops']:.3g}" if r["tflops"] is not None else "-")
            if has_gbps:
                cells.append(f"{r['gbps']:.3g}" if r["gbps"] is not None else "-")
            if has_roof:
                cells.append(f"{100 * r['roofline_frac']:.3g}% {r['bound_by']}" if r["roofline_frac"] is not None
                             else "-")
            cells.append(_fmt_bytes(r["peak_bytes"]))
            if has_ratio:
                cells.append(f"{r['peak_per_output']:.2f}" if r["peak_per_output"] is not None else "-")
            cells += [str(r["baseline"]) if r["baseline"] is not None else "-",
                      f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"]
            if has_target:
                cells.append(r["target"] or "-")
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
        for r in rs:
            if r["schedule_s"] is None:
                continue
            it = r["schedule_iterations"] or {}
            comps = r["schedule_components"] or {}
            parts = ", ".join(f"{k} {v:.0f} s" for k, v in comps.items() if isinstance(v, (int, float)))
            target = r["schedule_target_s"]
            verdict = "" if target is None else (f"; target {target / 60:.0f} min: "
                                                 + ("met" if r["schedule_s"] <= target else "not met"))
            lines += [f"Schedule projection ({r['label']}, {it.get('1', '?')} + {it.get('2', '?')} iterations, "
                      f"from the probe above): **{r['schedule_s'] / 60:.1f} min** ({parts}){verdict}.", ""]
    if chart:
        lines += [f"![speed-ups]({chart})", ""]
    return "\n".join(lines)


def plot_speedups(data: Dict[str, Any], path: str, title: Optional[str] = None) -> bool:
    """Horizontal bar chart of every speed-up; False (no file) when there is none."""
    rows = [r for r in summarize(data) if r["speedup"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    labels = [f"{r['group']}: {r['label']}" for r in rows]
    values = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("speed-up vs baseline (median time ratio)")
    ax.set_title(title or "Speed-ups")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: str, out_dir: Optional[str] = None, title: Optional[str] = None) -> Tuple[str, List[str]]:
    """(markdown, files written).  Files only with ``out_dir``."""
    data = load_results(results)
    stem = os.path.splitext(os.path.basename(results))[0]
    files: List[str] = []
    chart = None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        png = os.path.join(out_dir, f"{stem}_speedup.png")
        if plot_speedups(data, png, title or stem):
            files.append(png)
            chart = os.path.basename(png)
    md = markdown_report(data, title or stem, chart)
    if out_dir:
        path = os.path.join(out_dir, f"{stem}.md")
        with open(path, "w") as f:
            f.write(md)
        files.append(path)
    return md, files


# --------------------------------------------------------------------------
# backend table
# --------------------------------------------------------------------------
def _is_gpu(ei: Dict[str, Any]) -> bool:
    if ei.get("device_type") is not None:
        return ei["device_type"] == "cuda"
    dev = ei.get("device")
    return dev is not None and str(dev).lower() != "cpu"


def _pick_winners(times: Dict[str, Dict[tuple, Dict[str, float]]]) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """Per shape class: the backend with the smaller sum of median times over
    the measurements both have; a class measured for one backend only maps
    to it."""
    classes: Dict[str, str] = {}
    details: Dict[str, Any] = {}
    for cls in sorted(times):
        both = [k for k, v in times[cls].items() if "cuda" in v and "triton" in v]
        if both:
            sums = {be: sum(times[cls][k][be] for k in both) for be in ("cuda", "triton")}
            winner = min(sums, key=lambda be: (sums[be], be != "cuda"))
            loser = "triton" if winner == "cuda" else "cuda"
            details[cls] = dict(cuda_s=sums["cuda"], triton_s=sums["triton"], measurements=len(both),
                                speedup=sums[loser] / sums[winner] if sums[winner] > 0 else None)
        else:
            seen = sorted({be for v in times[cls].values() for be in v})
            if len(seen) != 1:
                continue
            winner = seen[0]
            details[cls] = dict(only=winner, measurements=len(times[cls]))
        classes[cls] = winner
    return classes, details


def reduce_backend_table(datas: Iterable[Dict[str, Any]], modes: Sequence[str] = ("fwd", "fwdbwd")
                         ) -> Dict[str, Any]:
    """GPU op benchmarks -> ``{"classes": {shape_class: "cuda"|"triton"},
    "by_mode": {mode: {shape_class: ...}}, "details": ...}``.

    For every shape class the median times of the measurements that both
    backends have (same N, C, P, K, B, dtype, mode) are summed per backend;
    the smaller sum wins.  A class measured for only one backend maps to it.
    ``classes`` sums over all ``modes``; ``by_mode`` decides each mode on its
    own (``backend="auto"`` uses ``fwd`` when no backward can follow, and
    ``fwdbwd`` when one can).
    """
    import torch

    from ._backend_table import shape_class

    # mode -> class -> measurement key -> backend -> median time
    times: Dict[str, Dict[str, Dict[tuple, Dict[str, float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict)))
    devices = set()
    for data in datas:
        for b in data["benchmarks"]:
            ei = b.get("extra_info") or {}
            backend = _OP_BACKENDS.get(str(ei.get("op_backend")))
            mode = ei.get("mode", "fwd")
            if backend is None or not _is_gpu(ei) or mode not in modes:
                continue
            try:
                C, P, K, B = (int(ei[k]) for k in ("C", "P", "K", "B"))
                dname = str(ei["dtype"]).replace("torch.", "")
                dtype = getattr(torch, dname)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            if not isinstance(dtype, torch.dtype):
                continue
            cls = shape_class(C, P, K, B, dtype)
            key = (ei.get("N"), C, P, K, B, dname, mode)
            t = float(b["stats"]["median"])
            prev = times[mode][cls][key].get(backend)
            times[mode][cls][key][backend] = t if prev is None else min(prev, t)
            if ei.get("device"):
                devices.add(str(ei["device"]))
    merged: Dict[str, Dict[tuple, Dict[str, float]]] = defaultdict(dict)
    for per_class in times.values():
        for cls, keys in per_class.items():
            merged[cls].update(keys)  # the keys hold the mode: no collisions
    classes, details = _pick_winners(merged)
    by_mode = {mode: _pick_winners(times[mode])[0] for mode in modes if times.get(mode)}
    return dict(
        generated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        devices=sorted(devices), modes=list(modes),
        rule="per shape class, the backend with the smaller sum of median times over the measurements "
             "both backends have (classes: over all modes; by_mode: per mode)",
        classes=classes, by_mode=by_mode, details=details,
    )


def write_backend_table(results: Sequence[str], out: str, modes: Sequence[str] = ("fwd", "fwdbwd"),
                        merge: bool = False) -> Dict[str, Any]:
    datas = [load_results(p) for p in results]
    table = reduce_backend_table(datas, modes)
    table["sources"] = [os.path.basename(p) for p in results]
    if merge and os.path.exists(out):
        try:
            with open(out) as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError(f"a {type(old).__name__}, not an object")
            for key in ("classes", "details", "by_mode"):
                if not isinstance(old.get(key, {}), dict):
                    raise ValueError(f"its {key!r} is a {type(old[key]).__name__}, not an object")
            if not all(isinstance(v, dict) for v in old.get("by_mode", {}).values()):
                raise ValueError("its 'by_mode' is not a map of objects")
            if not isinstance(old.get("sources", []), list):
                raise ValueError("its 'sources' is not a list")
        except ValueError as e:
            raise ValueError(f"{out}: cannot merge into it, expected a backend table (JSON object): {e}") from e
        classes = dict(old.get("classes", {}))
        classes.update(table["classes"])
        by_mode = {m: dict(v) for m, v in (old.get("by_mode") or {}).items()}
        for m, v in table["by_mode"].items():
            by_mode.setdefault(m, {}).update(v)
        table["by_mode"] = by_mode
        details = dict(old.get("details", {}))
        details.update(table["details"])
        table["classes"], table["details"] = classes, details
        table["sources"] = sorted(set(old.get("sources", [])) | set(table["sources"]))
    if not table["classes"]:
        return table  # nothing measured: leave any existing table alone
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    tmp = out + ".tmp"  # then a rename: a killed write never leaves a truncated table
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, out)
    return table


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def _cmd_report(args) -> int:
    try:
        md, files = write_report(args.results, args.out, args.title)
    except ValueError as e:
        print(f"personvlad bench report: {e}")
        return 2
    print(md)
    for f in files:
        print(f"wrote {f}")
    return 0


def _cmd_table(args) -> int:
    modes = ("fwd", "fwdbwd") if args.mode == "both" else (args.mode,)
    try:
        table = write_backend_table(args.results, args.out, modes, args.merge)
    except ValueError as e:
        print(f"personvlad bench table: {e}")
        return 2
    if not table["classes"]:
        print("personvlad bench table: no GPU op benchmarks with op_backend cuda/triton and C, P, K, B, dtype "
              f"in {args.results}; {args.out} left unchanged")
        return 1
    fwd_only = table.get("by_mode", {}).get("fwd", {})
    for cls, be in table["classes"].items():
        det = table["details"].get(cls, {})
        sp = det.get("speedup")
        print(f"{cls:40s} {be:7s}" + (f" ({sp:.2f}x)" if sp else " (only backend measured)")
              + (f"; forward alone: {fwd_only[cls]}" if fwd_only.get(cls, be) != be else ""))
    print(f"wrote {args.out} ({len(table['classes'])} classes)")
    return 0


def _default_table_path() -> str:
    from ._backend_table import TABLE_PATH

    return TABLE_PATH


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark reports (Markdown + chart) and the backend='auto' table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  personvlad bench report bench/results/gpu/bench_model.json --out bench/results/gpu\n"
               "  personvlad bench table bench/results/gpu/bench_ops.json",
    )
    sub = p.add_subparsers(dest="bench_command", metavar="<bench command>")
    r = sub.add_parser(
        "report", help="Markdown table and speed-up chart of a pytest-benchmark JSON",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  pytest bench/test_bench_e2e.py --benchmark-json=e2e.json\n"
               "  personvlad bench report e2e.json --out bench/results/cpu",
    )
    r.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    r.add_argument("--out", default=None, help="directory for <stem>.md and <stem>_speedup.png "
                                               "(default: print the Markdown only)")
    r.add_argument("--title", default=None, help="report title (default: the file's stem)")
    r.set_defaults(func=_cmd_report)
    t = sub.add_parser(
        "table", help="reduce GPU op benchmarks to personvlad/backend_table.json (backend='auto')",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  personvlad bench table bench/results/gpu/bench_ops.json --mode both",
    )
    t.add_argument("results", nargs="+", help="pytest-benchmark JSON files of bench/test_bench_ops.py on a GPU")
    t.add_argument("--out", default=_default_table_path(), help="table to write (default: %(default)s)")
    t.add_argument("--mode", choices=("fwd", "fwdbwd", "both"), default="both",
                   help="which measurements decide (default: both)")
    t.add_argument("--merge", action="store_true", help="keep classes of the existing table not measured here")
    t.set_defaults(func=_cmd_table)

    def _help(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)
