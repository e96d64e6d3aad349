"""personvlad.roofline: the op's work and traffic, model FLOPs, device peaks,
the roofline bound, and the report's achieved-vs-peak columns."""
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import backend_device_params, make_inputs
from personvlad import bench_report, reference, roofline
from personvlad.models import build_model


def _op_inputs(N, C, S, K, B, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    F = torch.randn(N, C, *S, generator=g).to(dtype)
    M = None if B is None else torch.rand(N, B, *S, generator=g).to(dtype)
    W, z, c = torch.randn(K, C, generator=g), torch.randn(K, generator=g), torch.randn(K, C, generator=g)
    ts = [F, M, W, z, c]
    if grad:
        ts = [t if t is None else t.requires_grad_(True) for t in ts]
    return ts


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("N, C, S, K, B", [(3, 16, (2, 5), 8, 4), (2, 24, (7,), 5, None), (1, 8, (2, 3, 2), 3, 1)])
def test_gemm_flops_match_flop_counter_on_the_reference(N, C, S, K, B, mode):
    """The matmul form's products, counted by PyTorch's FlopCounterMode, are
    exactly op_cost's gemm_flops (the backward's four products included)."""
    ins = _op_inputs(N, C, S, K, B, grad=(mode == "fwdbwd"))
    counter = FlopCounterMode(display=False)
    with counter:
        out = reference.person_vlad_ref(*ins)
        if mode == "fwdbwd":
            out.sum().backward()
    cost = roofline.op_cost(N, C, math.prod(S), K, B, mode=mode)
    assert counter.get_total_flops() == cost["gemm_flops"]
    assert 0 < cost["vector_flops"] < cost["gemm_flops"] or C < 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [None, 3])
def test_bytes_are_the_inputs_and_outputs(dtype, B):
    """fwd: every input read once + the output written once; fwd+bwd adds the
    backward's reads (inputs, saved output, norms, incoming grad) and the
    gradients of every input."""
    N, C, S, K = 4, 32, (3, 5), 8
    F, M, W, z, c = _op_inputs(N, C, S, K, B, dtype)
    out = reference.person_vlad_ref(F, M, W, z, c)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
    ins = nbytes([F, M, W, z, c])
    fwd = roofline.op_cost(N, C, 15, K, B, dtype=dtype, mode="fwd")
    assert fwd["bytes"] == ins + nbytes([out])
    both = roofline.op_cost(N, C, 15, K, B, dtype=dtype, mode="fwdbwd")
    norms = N * (K + 1) * 4
    assert both["bytes"] == (ins + nbytes([out]) + norms) + (ins + 2 * nbytes([out]) + norms + ins)
    nonorm = roofline.op_cost(N, C, 15, K, B, dtype=dtype, mode="fwdbwd", normalize=False)
    assert nonorm["bytes"] == both["bytes"] - 2 * norms and nonorm["vector_flops"] < both["vector_flops"]


def test_op_cost_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        roofline.op_cost(1, 2, 3, 4, 1, mode="bwd")
    with pytest.raises(ValueError, match="^K: expected an int >= 0"):
        roofline.op_cost(1, 2, 3, -4, 1)
    with pytest.raises(ValueError, match="^B: expected"):
        roofline.op_cost(1, 2, 3, 4, 0)
    with pytest.raises(ValueError, match="^dtype: expected a floating"):
        roofline.op_cost(1, 2, 3, 4, 1, dtype=torch.int32)
    assert roofline.op_cost(0, 2, 3, 4, 1)["gemm_flops"] == 0


def test_model_flops_on_meta_equal_a_real_count():
    """Counting on the meta device (how the benchmarks do it: no memory, no
    compute) gives the same FLOPs as counting a real CPU forward of the tiny
    model; the paper model is the issue's 81 GFLOP per clip."""
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    c = model.config
    x = torch.rand(2, 3, c.clip_len, c.height, c.width)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    assert roofline.model_flops("tiny") * 2 == counter.get_total_flops()
    assert roofline.model_flops(model) == roofline.model_flops(model.config) == roofline.model_flops("tiny")
    fb = roofline.model_flops("tiny", "fwdbwd")
    assert 2.5 * roofline.model_flops("tiny") < fb < 3.5 * roofline.model_flops("tiny")
    assert roofline.model_flops("paper") / 1e9 == pytest.approx(81.03, abs=0.01)
    with pytest.raises(ValueError, match="clip_shape"):
        roofline.model_flops("tiny", clip_shape=(3, 8, 64))
    with pytest.raises(ValueError, match="model_or_preset"):
        roofline.model_flops(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name, expect", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200 (96 GB HBM3)"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"), ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("Tesla T4", "T4"),
    ("Tesla V100-SXM2-32GB", "V100 SXM2"), ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
    ("NVIDIA TITAN X (Pascal)", "TITAN X (Pascal)"), ("NVIDIA TITAN Xp", "TITAN Xp"), ("NVIDIA A10", "A10"),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None), ("cpu", None), ("Some Future GPU", None), ("NVIDIA A40", None),
])
def test_device_peaks_by_name(name, expect, monkeypatch):
    monkeypatch.delenv(roofline.PEAKS_ENV, raising=False)
    p = roofline.device_peaks(name)
    assert (p.name if p else None) == expect


def test_device_peaks_for_devices_and_the_environment(monkeypatch):
    monkeypatch.delenv(roofline.PEAKS_ENV, raising=False)
    assert roofline.device_peaks(torch.device("cpu")) is None and roofline.device_peaks("cpu") is None
    if not torch.cuda.is_available():
        assert roofline.device_peaks("cuda") is None and roofline.device_peaks(None) is None
    monkeypatch.setenv(roofline.PEAKS_ENV, "gbps=1000, fp32=20,bf16=200")
    p = roofline.device_peaks("Some Future GPU")
    assert (p.gbps, p.fp32, p.bf16, p.tf32, p.name) == (1000, 20, 200, None, "Some Future GPU")
    assert p.source == "$" + roofline.PEAKS_ENV
    for bad, msg in (("gbps=1000", "fp32 is missing"), ("gbps=1e3,fp32=x", "fp32 expected a number"),
                     ("gbps=1000,fp32=20,hbm=3", "expected comma-separated key=value"),
                     ("gbps=0,fp32=20", "gbps expected a positive")):
        monkeypatch.setenv(roofline.PEAKS_ENV, bad)
        with pytest.raises(ValueError, match=roofline.PEAKS_ENV + ".*" + msg):
            roofline.device_peaks("x")
    with pytest.raises(ValueError, match="^device: expected"):
        roofline.device_peaks(3)


def test_matmul_peak_per_dtype_and_precision():
    h100 = roofline.device_peaks("NVIDIA H100 80GB HBM3")
    assert roofline.matmul_peak_tflops(h100, torch.bfloat16) == 989.4
    assert roofline.matmul_peak_tflops(h100, torch.float16, "tf32x3") == 989.4  # half: tensor cores regardless
    assert roofline.matmul_peak_tflops(h100, torch.float32) == 67
    assert roofline.matmul_peak_tflops(h100, torch.float32, "tf32") == 494.7
    assert roofline.matmul_peak_tflops(h100, torch.float32, "tf32x3") == pytest.approx(494.7 / 3)
    pascal = roofline.device_peaks("NVIDIA TITAN X (Pascal)")
    assert roofline.matmul_peak_tflops(pascal, torch.float16) == 11.0  # no tensor cores: the FP32 rate
    assert roofline.matmul_peak_tflops(pascal, torch.float32, "tf32x3") == 11.0
    with pytest.raises(ValueError, match="^precision"):
        roofline.matmul_peak_tflops(h100, torch.float32, "fp8")


def test_roofline_bound_is_the_slowest_resource():
    h100 = roofline.device_peaks("NVIDIA H100 80GB HBM3")
    r = roofline.roofline(67e12, 3350e9 / 2, h100, torch.float32, "ieee", vector_flops=67e12 / 4)
    assert (r["bound_by"], r["bound_s"]) == ("matmul", pytest.approx(1.0))
    r = roofline.roofline(989.4e12 / 10, 3350e9, h100, "bfloat16")
    assert (r["bound_by"], r["bound_s"]) == ("memory", pytest.approx(1.0))
    r = roofline.roofline(1.0, 1.0, h100, torch.float32, vector_flops=2 * 67e12)
    assert (r["bound_by"], r["bound_s"]) == ("vector", pytest.approx(2.0))
    # mixed precisions: half the products in IEEE fp32, half in tf32x3
    mixed = roofline.roofline(2e12, 0, h100, torch.float32, {"ieee": 0.5, "tf32x3": 0.5})
    assert mixed["bound_s"] == pytest.approx(1 / 67 + 1 / (494.7 / 3))
    assert mixed["peak_matmul_tflops"] == pytest.approx(2 / mixed["bound_s"])
    with pytest.raises(ValueError, match="^precision"):
        roofline.roofline(1, 1, h100, torch.float32, {"ieee": 0.5})


def test_model_work_info_counts_the_batch(monkeypatch):
    info = roofline.model_work_info("tiny", "fwd", 5, "float32", "cpu")
    assert info["flops"] == 5 * info["flops_per_clip"] == 5 * roofline.model_flops("tiny")
    assert "roofline_s" not in info  # no peaks for a CPU


def test_report_shows_achieved_throughput_and_roofline_fraction():
    """TFLOP/s and GB/s are the recorded work over the median; % roofline is
    roofline_s / median, with the bounding resource."""
    cost = roofline.op_cost(64, 256, 110, 64, 6, dtype="bfloat16", mode="fwd")
    h100 = roofline.device_peaks("NVIDIA H100 80GB HBM3")
    rl = roofline.roofline(cost["gemm_flops"], cost["bytes"], h100, "bfloat16", "tf32x3", cost["vector_flops"])
    med = 1e-4
    bench = dict(name="test_op_gpu[fused-triton]", group="op", stats=dict(mean=med, median=med, min=med, ops=1e4),
                 extra_info=dict(op_backend="fused-triton", device="NVIDIA H100 80GB HBM3", **cost,
                                 roofline_s=rl["bound_s"], bound_by=rl["bound_by"], peaks_name=rl["peaks_name"],
                                 peaks_source=rl["peaks_source"]))
    model = dict(name="test_e2e[ofi]", group="e2e", stats=dict(mean=0.01, median=0.01, min=0.01, ops=100),
                 extra_info=dict(label="ofi", flops=64 * 81e9, clips=64))
    data = {"benchmarks": [bench, model]}
    rows = {r["label"]: r for r in bench_report.summarize(json.loads(json.dumps(data)))}
    r = rows["fused-triton"]
    assert r["tflops"] == pytest.approx((cost["gemm_flops"] + cost["vector_flops"]) / med / 1e12)
    assert r["gbps"] == pytest.approx(cost["bytes"] / med / 1e9)
    assert r["roofline_frac"] == pytest.approx(rl["bound_s"] / med) and r["bound_by"] == "memory"
    assert rows["ofi"]["tflops"] == pytest.approx(64 * 81e9 / 0.01 / 1e12) and rows["ofi"]["gbps"] is None
    md = bench_report.markdown_report(data)
    assert "| TFLOP/s | GB/s | % roofline |" in md and "roofline peaks H100 SXM (datasheet)" in md
    line = next(l for l in md.splitlines() if l.startswith("| test_op_gpu[fused-triton] |"))
    assert f"| {100 * rl['bound_s'] / med:.3g}% memory |" in line
    assert "| 518 |" in next(l for l in md.splitlines() if l.startswith("| test_e2e[ofi] |"))  # 64*81e9/0.01


@pytest.mark.parametrize("backend, device", backend_device_params(exclude=()))
@pytest.mark.parametrize("B", [None, 2])
def test_flop_counter_counts_every_backend_like_op_cost(backend, device, B):
    """FlopCounterMode sees the custom ops (flop formulas registered for the
    op, its backward and the Triton pair), so a model's count is the same
    whatever backend runs it: fwd 4NKCP, fwd+bwd 12NKCP."""
    from personvlad import ops

    N, C, S, K = 2, 16, (2, 5), 4
    ins = make_inputs(N=N, C=C, S=S, B=B, K=K, device=device, requires_grad=True)
    for mode in ("fwd", "fwdbwd"):
        counter = FlopCounterMode(display=False)
        with counter:
            out = ops.person_vlad(*ins, backend=backend)
            if mode == "fwdbwd":
                out.sum().backward()
        assert counter.get_total_flops() == roofline.op_cost(N, C, 10, K, B, mode=mode)["gemm_flops"], backend
