"""``personvlad bench report`` / ``bench table`` on real pytest-benchmark JSON.

A tiny benchmark suite (sleeps) runs in a subprocess with ``--benchmark-json``
so the input has exactly pytest-benchmark's format; copies with hand-set
times check the arithmetic and the backend choice exactly (measured sleeps
are too noisy on a loaded CI machine to assert on).
"""
import argparse
import copy
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from personvlad import _backend_table, bench_report

SUITE = textwrap.dedent('''
    import time
    import pytest

    def _sleep(s):
        time.sleep(s)

    @pytest.mark.parametrize("variant, secs", [("slow", 0.004), ("fast", 0.001)])
    def test_e2e(benchmark, variant, secs):
        benchmark.group = "e2e"
        benchmark.extra_info.update(label=variant, baseline="slow", clips=8, peak_bytes=3 * 2 ** 20,
                                    device="FakeGPU", device_type="cuda")
        benchmark.pedantic(_sleep, args=(secs,), rounds=3, iterations=1)

    # op benchmarks: class 1 (C=256 ...) cuda faster, class 2 (C=512 ...) triton faster,
    # plus a CPU row and a reference row that the table must ignore.
    OPS = [
        ("fused-cuda",   256, 110, 64, 6, "bfloat16", "fwd", 0.001, "cuda"),
        ("fused-triton", 256, 110, 64, 6, "bfloat16", "fwd", 0.003, "cuda"),
        ("fused-cuda",   512, 1568, 64, 8, "float32", "fwdbwd", 0.004, "cuda"),
        ("fused-triton", 512, 1568, 64, 8, "float32", "fwdbwd", 0.001, "cuda"),
        ("unfused-eager", 512, 1568, 64, 8, "float32", "fwdbwd", 0.0001, "cuda"),
        ("fused-cuda",   64, 20, 8, 2, "float32", "fwd", 0.0001, "cpu"),
    ]

    @pytest.mark.parametrize("i", range(len(OPS)))
    def test_op(benchmark, i):
        be, C, P, K, B, dt, mode, secs, devtype = OPS[i]
        benchmark.group = f"op-{C}-{mode}"
        benchmark.extra_info.update(op_backend=be, N=8, C=C, P=P, K=K, B=B, dtype=dt, mode=mode,
                                    device="FakeGPU" if devtype == "cuda" else "cpu", device_type=devtype,
                                    baseline="unfused-eager")
        benchmark.pedantic(_sleep, args=(secs,), rounds=3, iterations=1)
''')


def _default_sigint():
    # A shell without job control starts background commands with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: a suite
    # run from such a shell would never see the interrupt the test sends.
    # GNU timeout (gpu_check.sh's) gives its child the default disposition;
    # so does this.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_suite(d, suite):
    """Run the benchmark suite text in folder ``d`` (its own rootdir) in a
    subprocess, SIGINT at its default disposition (as under ``timeout``);
    returns (the finished process, the --benchmark-json path)."""
    (d / "test_suite.py").write_text(suite)
    (d / "pytest.ini").write_text("[pytest]\n")
    out = d / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(d),
         "-c", str(d / "pytest.ini"), f"--benchmark-json={out}", str(d / "test_suite.py")],
        cwd=str(d), env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True,
        timeout=120, preexec_fn=_default_sigint)
    return proc, out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    proc, out = _run_suite(tmp_path_factory.mktemp("bench"), SUITE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _parser():
    p = argparse.ArgumentParser(prog="personvlad")
    sub = p.add_subparsers(dest="command")
    bench_report.register(sub)
    return p


def _with_medians(path, tmp_path, medians):
    """A copy of the real JSON with chosen (mean = median = min) per benchmark name."""
    data = json.loads(path.read_text())
    data = copy.deepcopy(data)
    for b in data["benchmarks"]:
        if b["name"] in medians:
            t = medians[b["name"]]
            b["stats"].update(mean=t, median=t, min=t, ops=1.0 / t)
    out = tmp_path / "exact.json"
    out.write_text(json.dumps(data))
    return out


def test_report_real_json(results, tmp_path, capsys):
    args = _parser().parse_args(["bench", "report", str(results), "--out", str(tmp_path / "rep")])
    assert args.func(args) == 0
    md = capsys.readouterr().out
    assert "## e2e" in md and "| test_e2e[slow-0.004] |" in md
    assert "clips/s" in md and "peak mem" in md and "3 MiB" in md
    rows = {r["label"]: r for r in bench_report.summarize(bench_report.load_results(str(results)))}
    # measured sleeps (4 ms vs 1 ms) are too noisy on a loaded CI machine for
    # bounds: check the definition; test_report_exact_numbers checks values.
    assert rows["fast"]["speedup"] == pytest.approx(rows["slow"]["median"] / rows["fast"]["median"])
    assert rows["slow"]["speedup"] == pytest.approx(1.0)
    assert rows["fast"]["clips_per_s"] == pytest.approx(8 / rows["fast"]["mean"])
    png = tmp_path / "rep" / "results_speedup.png"
    assert (tmp_path / "rep" / "results.md").read_text().startswith("# results")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_exact_numbers(results, tmp_path):
    exact = _with_medians(results, tmp_path, {"test_e2e[slow-0.004]": 0.002, "test_e2e[fast-0.001]": 0.0005})
    md, files = bench_report.write_report(str(exact))
    assert files == []  # no --out: nothing written
    line = next(l for l in md.splitlines() if l.startswith("| test_e2e[fast"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:4] == ["500 µs", "500 µs", "500 µs"]
    assert cells[4] == "2000"            # ops/s
    assert cells[5] == "16,000"          # clips/s = 8 / 0.0005
    assert cells[-1] == "4.00x"
    # op rows: baseline "unfused-eager" resolved inside each group
    rows = {(r["group"], r["label"]): r for r in bench_report.summarize(json.loads(exact.read_text()))}
    r = rows[("op-512-fwdbwd", "fused-triton")]
    base = rows[("op-512-fwdbwd", "unfused-eager")]
    assert r["speedup"] == pytest.approx(base["median"] / r["median"])
    assert rows[("op-256-fwd", "fused-cuda")]["speedup"] is None  # no unfused-eager in that group


def test_report_best_of_several_baselines(results, tmp_path):
    """A list baseline resolves to the fastest named benchmark of the group,
    and output_bytes adds a peak/output column."""
    data = json.loads(results.read_text())
    group = "op-512-fwdbwd"
    eager = next(b for b in data["benchmarks"] if b.get("group") == group
                 and b["extra_info"]["op_backend"] == "unfused-eager")
    compiled = copy.deepcopy(eager)
    compiled["name"] = compiled["fullname"] = "test_op[compiled]"
    compiled["param"] = "compiled"
    compiled["extra_info"]["op_backend"] = "unfused-compile"
    data["benchmarks"].append(compiled)
    meds = {"unfused-eager": 0.004, "unfused-compile": 0.002, "fused-triton": 0.0005, "fused-cuda": 0.001}
    for b in data["benchmarks"]:
        ei = b["extra_info"]
        if b.get("group") == group:
            t = meds[ei["op_backend"]]
            b["stats"].update(mean=t, median=t, min=t)
            ei["baseline"] = ["unfused-eager", "unfused-compile"]
            ei["output_bytes"] = 2 ** 20
            ei["peak_bytes"] = 3 * 2 ** 20
    rows = {r["label"]: r for r in bench_report.summarize(data) if r["group"] == group}
    assert rows["fused-triton"]["baseline"] == "unfused-compile"
    assert rows["fused-triton"]["speedup"] == pytest.approx(0.002 / 0.0005)
    assert rows["unfused-eager"]["speedup"] == pytest.approx(0.5)
    assert rows["fused-cuda"]["peak_per_output"] == pytest.approx(3.0)
    md = bench_report.markdown_report(data)
    tri = next(b["name"] for b in data["benchmarks"] if b.get("group") == group
               and b["extra_info"]["op_backend"] == "fused-triton")
    line = next(l for l in md.splitlines() if l.startswith(f"| {tri} |"))
    assert "peak/output" in md and "| 3.00 | unfused-compile | 4.00x |" in line
    # when the compiled run is missing, the eager one is the baseline
    data["benchmarks"].remove(compiled)
    rows = {r["label"]: r for r in bench_report.summarize(data) if r["group"] == group}
    assert rows["fused-triton"]["baseline"] == "unfused-eager"
    assert rows["fused-triton"]["speedup"] == pytest.approx(8.0)


def _designed(results, tmp_path):
    """The real JSON with every op benchmark's times set to its designed sleep."""
    meds = {}
    for b in json.loads(results.read_text())["benchmarks"]:
        if b["name"].startswith("test_op"):
            i = int(b["name"].split("[")[1].rstrip("]"))
            meds[b["name"]] = [0.001, 0.003, 0.004, 0.001, 0.0001, 0.0001][i]
    return _with_medians(results, tmp_path, meds)


def test_table_picks_faster_backend_per_class(results, tmp_path, capsys):
    out = tmp_path / "backend_table.json"
    designed = _designed(results, tmp_path)
    args = _parser().parse_args(["bench", "table", str(designed), "--out", str(out)])
    assert args.func(args) == 0
    table = json.loads(out.read_text())
    c1 = _backend_table.shape_class(256, 110, 64, 6, torch.bfloat16)
    c2 = _backend_table.shape_class(512, 1568, 64, 8, torch.float32)
    assert table["classes"] == {c1: "cuda", c2: "triton"}  # CPU and unfused rows ignored
    assert table["details"][c1]["speedup"] == pytest.approx(3.0)
    assert table["details"][c2]["speedup"] == pytest.approx(4.0)
    assert table["devices"] == ["FakeGPU"] and table["sources"] == ["exact.json"]
    # the file is what backend="auto" reads
    _backend_table.load_table.cache_clear()
    try:
        assert _backend_table.load_table(str(out)) == {c1: "cuda", c2: "triton"}
    finally:
        _backend_table.load_table.cache_clear()
    assert c1 in capsys.readouterr().out


def test_auto_pick_traces_under_torch_compile_fullgraph(monkeypatch):
    """backend="auto" runs inside compiled models: the pick is a lookup in the
    table read at import (no file access while tracing, which Dynamo refuses),
    and it honours the table and the candidates."""
    F, M = torch.randn(2, 256, 2, 11, 5), torch.rand(2, 6, 2, 11, 5)
    c1 = _backend_table.shape_class(256, 110, 64, 6, torch.float32)
    monkeypatch.setattr(_backend_table, "_CLASSES", {c1: "cuda"})

    def scaled(x, parts, candidates):
        return x * (2.0 if _backend_table.pick_cuda_backend(x, parts, 64, candidates) == "cuda" else 3.0)

    for candidates, factor in ((["cuda", "triton"], 2.0), (["triton"], 3.0)):
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, p: scaled(x, p, candidates), fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(F, M), F * factor)
    # a class with no measurement: DEFAULT_ORDER
    assert _backend_table.pick_cuda_backend(F, None, 64, ["cuda", "triton"]) == _backend_table.DEFAULT_ORDER[0]


def test_table_keeps_each_mode_apart_and_auto_uses_it(monkeypatch):
    """by_mode decides fwd and fwdbwd on their own: a backend faster forward
    only (the H200's Triton at the large shape) is picked where no backward
    can follow; classes (both summed) stays the fallback."""
    def b(backend, mode, med):
        return dict(name=f"{backend}-{mode}", group=mode, stats=dict(mean=med, median=med, min=med),
                    extra_info=dict(op_backend=backend, mode=mode, N=8, C=512, P=1568, K=64, B=8,
                                    dtype="bfloat16", device="FakeGPU", device_type="cuda"))

    data = {"benchmarks": [b("fused-cuda", "fwd", 0.5e-3), b("fused-triton", "fwd", 0.34e-3),
                           b("fused-cuda", "fwdbwd", 2.03e-3), b("fused-triton", "fwdbwd", 2.39e-3)]}
    t = bench_report.reduce_backend_table([data])
    cls = _backend_table.shape_class(512, 1568, 64, 8, torch.bfloat16)
    assert t["classes"] == {cls: "cuda"}  # 2.53 ms vs 2.73 ms summed
    assert t["by_mode"] == {"fwd": {cls: "triton"}, "fwdbwd": {cls: "cuda"}}
    monkeypatch.setattr(_backend_table, "_CLASSES", t["classes"])
    monkeypatch.setattr(_backend_table, "_BY_MODE", t["by_mode"])
    F = torch.randn(1, 512, 8, 14, 14, dtype=torch.bfloat16)
    M = torch.rand(1, 8, 8, 14, 14, dtype=torch.bfloat16)
    pick = _backend_table.pick_cuda_backend
    assert pick(F, M, 64, ["cuda", "triton"], backward=False) == "triton"
    assert pick(F, M, 64, ["cuda", "triton"], backward=True) == "cuda"
    assert pick(F, M, 64, ["cuda", "triton"]) == "cuda"
    assert pick(F, M, 64, ["cuda"], backward=False) == "cuda"  # only what is available
    monkeypatch.setattr(_backend_table, "_BY_MODE", {})  # a table from before the modes were kept apart
    assert pick(F, M, 64, ["cuda", "triton"], backward=False) == "cuda"


def test_table_modes_and_merge(results, tmp_path):
    out = tmp_path / "t.json"
    out.write_text(json.dumps({"classes": {"C8-P8-K8-B1-float32": "cuda"}, "sources": ["old.json"]}))
    t = bench_report.write_backend_table([str(_designed(results, tmp_path))], str(out), modes=("fwd",), merge=True)
    c1 = _backend_table.shape_class(256, 110, 64, 6, torch.bfloat16)
    assert t["classes"] == {"C8-P8-K8-B1-float32": "cuda", c1: "cuda"}  # fwdbwd class left out
    assert t["sources"] == ["exact.json", "old.json"]


def test_table_exact_sums(results, tmp_path):
    # class 1: cuda 2.0 vs triton 1.0 -> triton now
    exact = _with_medians(results, tmp_path, {"test_op[0]": 2.0, "test_op[1]": 1.0})
    t = bench_report.reduce_backend_table([json.loads(exact.read_text())])
    c1 = _backend_table.shape_class(256, 110, 64, 6, torch.bfloat16)
    assert t["classes"][c1] == "triton"
    assert t["details"][c1] == dict(cuda_s=2.0, triton_s=1.0, measurements=1, speedup=2.0)


def test_cli_errors(tmp_path, capsys):
    p = _parser()
    missing = tmp_path / "nope.json"
    args = p.parse_args(["bench", "report", str(missing)])
    assert args.func(args) == 2
    assert "no such file" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmarks": [{"name": "x", "stats": {"mean": 1.0}}]}))
    with pytest.raises(ValueError, match=r"stats\['median'\]"):
        bench_report.load_results(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="'benchmarks' list"):
        bench_report.load_results(str(bad))
    # a file without op benchmarks gives an empty table and exit status 1
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    args = p.parse_args(["bench", "table", str(empty), "--out", str(tmp_path / "t.json")])
    assert args.func(args) == 1
    assert not (tmp_path / "t.json").exists()  # nothing written over an existing table either
    args = p.parse_args(["bench"])
    assert args.func(args) == 2


def test_report_prints_the_schedule_projection():
    """A schedule_projection_s (bench/test_bench_train.py's probe) is printed
    under its group with its components and the verdict against its target."""
    st = dict(mean=5.0, median=5.0, min=5.0, ops=0.2)
    comps = {"setup": 3.0, "kmeans": 6.0, "iterations": 1200.0, "warmup_excess": 20.0, "checkpoints": 6.0,
             "evaluations": None}
    ei = dict(label="schedule-paper-gpu", schedule_projection_s=1235.0, schedule_target_s=1800.0,
              schedule_components_s=comps, schedule_iterations={"1": 50000, "2": 10000})
    data = {"benchmarks": [dict(name="test_schedule", group="schedule-gpu", stats=st, extra_info=ei)]}
    md = bench_report.markdown_report(data)
    assert ("Schedule projection (schedule-paper-gpu, 50000 + 10000 iterations, from the probe above): "
            "**20.6 min** (setup 3 s, kmeans 6 s, iterations 1200 s, warmup_excess 20 s, checkpoints 6 s); "
            "target 30 min: met.") in md
    ei.update(schedule_projection_s=2400.0)
    assert "**40.0 min**" in bench_report.markdown_report(data) and "not met" in bench_report.markdown_report(data)
    del ei["schedule_target_s"]
    assert "target" not in bench_report.markdown_report(data).split("Schedule projection")[1]


def test_report_target_column():
    """target_speedup (at least), target_peak_per_output (at most) and
    target_clips_per_s (at least) give a 'target' column: met, or what fell
    short; rows without targets show '-'."""
    def b(name, label, med, **ei):
        return dict(name=name, group="g", stats=dict(mean=med, median=med, min=med, ops=1 / med),
                    extra_info=dict(label=label, **ei))

    data = {"benchmarks": [
        b("base", "eager", 0.010),
        b("fast", "fused", 0.0008, baseline="eager", target_speedup=10.0, output_bytes=100, peak_bytes=250,
          target_peak_per_output=3.0),
        b("slow", "fused2", 0.002, baseline="eager", target_speedup=10.0, output_bytes=100, peak_bytes=400,
          target_peak_per_output=3.0),
        b("clips", "ofi", 0.01, clips=64, target_clips_per_s=6000.0),
    ]}
    rows = {r["name"]: r for r in bench_report.summarize(data)}
    assert rows["base"]["target"] is None
    assert rows["fast"]["target"] == "met"  # 12.5x, peak 2.5x output
    assert rows["slow"]["target"] == "not met: 5x vs >= 10x; 4x output vs <= 3x output"
    assert rows["clips"]["target"] == "met"  # 64 / 0.01 = 6,400 clips/s
    md = bench_report.markdown_report(data)
    assert "| speed-up | target |" in md
    assert next(l for l in md.splitlines() if l.startswith("| base |")).endswith("| - |")
    assert next(l for l in md.splitlines() if l.startswith("| slow |")).endswith(
        "| not met: 5x vs >= 10x; 4x output vs <= 3x output |")


INTERRUPTED_SUITE = textwrap.dedent('''
    import os
    import signal

    def test_finished(benchmark):
        benchmark.pedantic(lambda: None, rounds=3, iterations=1)

    def test_interrupted(benchmark):
        # what gpu_check.sh does at a step's time limit (timeout -s INT), here
        # inside the first round, before the case has any timing
        benchmark.pedantic(lambda: os.kill(os.getpid(), signal.SIGINT), rounds=3, iterations=1)
''')


def test_benchmark_json_survives_sigint_mid_case(tmp_path):
    """bench/conftest.py drops the interrupted case, so the JSON of the finished
    ones is still written (pytest-benchmark alone writes none)."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    shutil.copy(repo / "bench" / "conftest.py", tmp_path / "conftest.py")
    proc, out = _run_suite(tmp_path, INTERRUPTED_SUITE)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # pytest's "interrupted"
    names = [b["name"] for b in json.loads(out.read_text())["benchmarks"]]
    assert names == ["test_finished"], proc.stdout + proc.stderr


def test_profile_op_runs_on_cpu(tmp_path):
    """bench/profile_op.py (gpu_check.sh's `profile` step) on the CPU kernels:
    one record per variant and pass, with the op among the profiled operators."""
    from personvlad import ops

    if not ops.extension_loaded():
        pytest.skip("personvlad._C is not built")
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench" / "profile_op.py"), "--device", "cpu",
                           "--shapes", "tiny", "--rounds", "4", "--out", str(tmp_path)],
                          cwd=str(repo), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "profile_op.json").read_text())
    recs = {(r["variant"], r["mode"]): r for r in data["results"]}
    assert set(recs) == {(v, m) for v in ("fused-cpu", "unfused-eager") for m in ("fwd", "fwdbwd")}
    for r in recs.values():
        assert r["wall_us"] > 0 and r["pipelined_us"] > 0 and r["kernels"], r
    assert any(k[0] == "personvlad::person_vlad" for k in recs[("fused-cpu", "fwd")]["kernels"])
    assert not any(k[0].startswith("personvlad::") for k in recs[("unfused-eager", "fwd")]["kernels"])
    assert "| tiny | fp32 | fwd | fused-cpu |" in (tmp_path / "profile_op.md").read_text()


def test_gpu_op_candidates_run_where_they_apply():
    """The GPU op benchmark's candidate rows (each costs device time in
    gpu_check.sh's op step): the split forward at the paper shape only, the
    streamed one at the large shape's forward only, both in bf16 and fp32;
    the ablations in bf16 only."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "bench"))
    try:
        import test_bench_ops as tbo
    finally:
        sys.path.remove(str(repo / "bench"))
    runs = {(v, shape, mode, dt)
            for v in ("fused-triton-split", "fused-triton-stream", "fused-triton-tiled")
            for shape in tbo.GPU_SHAPES for mode in ("fwd", "fwdbwd") for dt in (torch.bfloat16, torch.float32)
            if tbo._skip_reason(v, shape, tbo.GPU_SHAPES[shape], dt, mode) is None}
    assert {r for r in runs if r[0] == "fused-triton-split"} == {
        ("fused-triton-split", "paper", m, dt) for m in ("fwd", "fwdbwd") for dt in (torch.bfloat16, torch.float32)}
    assert {r for r in runs if r[0] == "fused-triton-stream"} == {
        ("fused-triton-stream", "large", "fwd", dt) for dt in (torch.bfloat16, torch.float32)}
    assert {r for r in runs if r[0] == "fused-triton-tiled"} == {
        ("fused-triton-tiled", "paper", m, torch.bfloat16) for m in ("fwd", "fwdbwd")}
    assert "fused-triton-stream" in tbo.GPU_VARIANTS and tbo._ABLATION_ENV["fused-triton-stream"] == {
        "PERSONVLAD_TRITON_FWD": "stream"}


def test_broken_baselines_and_unnamed_rows():
    """A baseline without a finite positive median does not count (it used
    to become 'the fastest' and give a NaN speed-up); an absent baseline is
    named by its names, not a Python list; a row without any name gets a
    placeholder label instead of an IndexError."""
    def b(name, label, med, **ei):
        return dict(name=name, group="g", stats=dict(mean=med, median=med, min=med, ops=1.0),
                    extra_info=dict(label=label, **ei) if label else dict(ei))

    data = {"benchmarks": [
        b("e", "eager", float("nan")),
        b("z", "zero", 0.0),
        b("k", "compiled", 0.002),
        b("f", "fused", 0.001, baseline=["eager", "zero", "compiled"], target_speedup=1.5),
        b("g", "fused2", 0.001, baseline=["eager", "zero"]),
        b("h", "fused3", 0.001, baseline=["missing", "gone"]),
        b("", None, 0.001),
    ]}
    rows = {r["name"]: r for r in bench_report.summarize(data)}
    assert rows["f"]["baseline"] == "compiled" and rows["f"]["speedup"] == pytest.approx(2.0)
    assert rows["f"]["target"] == "met"
    assert rows["g"]["speedup"] is None and rows["g"]["baseline"] == "eager/zero"
    assert rows["h"]["baseline"] == "missing/gone"
    assert rows[""]["label"] == "(unnamed)"
    assert "nanx" not in bench_report.markdown_report(data)


@pytest.mark.parametrize("fmt, value, text", [
    ("_fmt_time", 0.9996, "1 s"), ("_fmt_time", 0.0009996, "1 ms"), ("_fmt_time", 0.148e-3, "148 µs"),
    ("_fmt_time", 2.5, "2.5 s"), ("_fmt_time", 5e-10, "0.5 ns"),
    ("_fmt_bytes", 1023 * 2 ** 10, "0.999 MiB"), ("_fmt_bytes", 1010 * 2 ** 20, "0.986 GiB"),
    ("_fmt_bytes", 999, "999 B"), ("_fmt_bytes", 1000, "0.977 KiB"), ("_fmt_bytes", 3 * 2 ** 30, "3 GiB"),
    ("_fmt_num", 9999.7, "10,000"), ("_fmt_num", 1795.2, "1795"), ("_fmt_num", 123456.0, "123,456"),
    ("_fmt_num", 0.00012345, "0.0001234"), ("_fmt_num", 1e-7, "1e-07"),
])
def test_number_formats_never_print_1e3_of_a_unit(fmt, value, text):
    assert getattr(bench_report, fmt)(value) == text


def test_damaged_backend_table_warns_instead_of_breaking_import(tmp_path):
    """A truncated or foreign backend_table.json (a killed write) gave
    JSONDecodeError/AttributeError at `import personvlad`; it now warns and
    falls back to the default order.  The writer goes through a rename."""
    for text in ('{"classes": {"C256-P128', "[]", '{"classes": [1]}'):
        p = tmp_path / "t.json"
        p.write_text(text)
        with pytest.warns(RuntimeWarning, match="backend='auto' uses its default order"):
            assert _backend_table.load_table.__wrapped__(str(p)) == {}
    p.write_text("[]")
    with pytest.raises(ValueError, match="cannot merge"):
        bench_report.write_backend_table([], str(p), merge=True)


def test_titan_x_generations():
    from personvlad import roofline

    pascal = roofline.device_peaks("NVIDIA TITAN X (Pascal)")
    maxwell = roofline.device_peaks("NVIDIA GeForce GTX TITAN X")
    assert pascal.name == "TITAN X (Pascal)" and maxwell.name == "GeForce GTX TITAN X (Maxwell)"
    assert maxwell.fp32 < pascal.fp32


def test_auto_backend_asks_for_the_forward_choice_when_no_backward_can_follow(monkeypatch):
    """ops._auto_backend on (fake) CUDA tensors passes backward=False with
    grad mode off or no input requiring grad, True otherwise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from personvlad import ops

    if not ops._NATIVE_CUDA:
        pytest.skip("needs the extension built with its CUDA kernels")
    seen = []
    monkeypatch.setattr(ops, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(ops, "pick_cuda_backend",
                        lambda *a, backward=None, **k: seen.append(backward) or "cuda")
    with FakeTensorMode():
        F, M = torch.empty(2, 8, 3, 4, device="cuda"), torch.empty(2, 2, 3, 4, device="cuda")
        W, z, c = torch.empty(5, 8, device="cuda"), torch.empty(5, device="cuda"), torch.empty(5, 8, device="cuda")
        assert ops._auto_backend(F, M, W, z, c) == "cuda"
        W.requires_grad_(True)
        ops._auto_backend(F, M, W, z, c)
        with torch.no_grad():
            ops._auto_backend(F, M, W, z, c)
        ops._auto_backend(F, None, W.detach(), z, c)
    assert seen == [False, True, False, False]
