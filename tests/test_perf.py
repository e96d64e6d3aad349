"""personvlad.perf and the fused conv epilogue (kernels/conv_epilogue.py).

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set by
tests/conftest.py) on tiny CPU tensors; the CUDA-marked tests repeat the key
checks on a GPU (bf16 included) and exercise the CUDA-graph runner.
"""
import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from personvlad import perf

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
ce = perf._kernel_module()
needs_triton = pytest.mark.skipif(ce is None or not perf.triton_epilogue_usable(DEV)[0],
                                  reason="Triton epilogue not usable here")

# (kernel, stride, padding, ceil_mode); None = bias + ReLU only.
POOLS = {
    "p122": ((1, 2, 2), None, 0, False),          # C3D pool1
    "p222": ((2, 2, 2), None, 0, False),          # C3D pool2-4 (odd sizes: floor drops the tail)
    "p222-pad-ceil": ((2, 2, 2), None, (0, 1, 1), True),  # C3D pool5 style
    "p333-overlap": ((3, 3, 3), (1, 2, 2), 1, True),      # overlapping windows
    "nopool": (None, None, 0, False),
}


def _ref(y, b, k, s, p, c):
    """Eager reference in float32 math on an upcast copy (autograd leaves)."""
    return F.max_pool3d(F.relu(y + b.view(1, -1, 1, 1, 1)), k, s if s is not None else k, p, ceil_mode=c) \
        if k is not None else F.relu(y + b.view(1, -1, 1, 1, 1))


def _inputs(dtype, channels_last, shape=(2, 3, 5, 7, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(*shape, generator=g).to(dtype)
    b = torch.randn(shape[1], generator=g) * 0.5
    y, b = y.to(DEV), b.to(DEV)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last_3d)
    return y, b


def _tol(dtype):
    return dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)


# --------------------------------------------------------------------------
# The kernel vs the eager composition
# --------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("layout", ["ncdhw", "cl3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_epilogue_matches_eager(dtype, layout, pool):
    k, s, p, c = POOLS[pool]
    y, b = _inputs(dtype, layout == "cl3d")
    y.requires_grad_(True)
    b.requires_grad_(True)
    out = ce.bias_relu_pool3d(y, b, k, s, p, c)

    y32 = y.detach().float().requires_grad_(True)
    b32 = b.detach().clone().requires_grad_(True)
    ref = _ref(y32, b32, k, s, p, c)
    assert out.shape == ref.shape and out.dtype == dtype
    # output keeps the input's memory format
    if layout == "cl3d":
        assert out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous()
    else:
        assert out.is_contiguous()
    torch.testing.assert_close(out.float(), ref, **_tol(dtype))

    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    out.backward(g.to(dtype))
    ref.backward(g.to(dtype).float())
    assert y.grad.shape == y.shape and y.grad.dtype == dtype
    if layout == "cl3d":
        assert y.grad.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y.grad.float(), y32.grad, **_tol(dtype))
    torch.testing.assert_close(b.grad, b32.grad, atol=1e-4, rtol=1e-4)


@needs_triton
def test_epilogue_ties_route_to_first_element_like_pytorch():
    # Constant windows: every element ties; PyTorch's max pool picks the first.
    y = torch.zeros(1, 2, 4, 4, 4, device=DEV)
    y[:, :, 1:3] = 1.0  # ties inside windows along W/H, distinct along D
    b = torch.tensor([0.5, -2.0], device=DEV)  # channel 1: ReLU kills everything
    y1, b1 = y.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y2, b2 = y.clone().requires_grad_(True), b.clone().requires_grad_(True)
    out = ce.bias_relu_pool3d(y1, b1, (2, 2, 2))
    ref = _ref(y2, b2, (2, 2, 2), None, 0, False)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    g = torch.arange(out.numel(), dtype=torch.float32, device=DEV).view_as(out) + 1
    out.backward(g)
    ref.backward(g)
    assert torch.equal(y1.grad, y2.grad)
    assert torch.equal(b1.grad, b2.grad)
    assert y1.grad[:, 1].abs().sum() == 0 and b1.grad[1] == 0  # the ReLU mask


@needs_triton
def test_epilogue_int64_index_path(monkeypatch):
    assert ce._needs_i64(torch.empty(2 ** 31, dtype=torch.int8, device="meta"))
    big = torch.empty(2 ** 31 + 8, dtype=torch.int8, device="meta")
    assert ce._needs_i64(big.as_strided((2,), (2 ** 31,)))  # 2 elements, far apart
    assert not ce._needs_i64(torch.empty(2, 3, 4, 5, 6))
    # force the 64-bit index branch of both kernels on a small case
    monkeypatch.setattr(ce, "_needs_i64", lambda *t: True)
    y, b = _inputs(torch.float32, True, shape=(2, 3, 5, 7, 9))
    y1, y2 = y.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = ce.bias_relu_pool3d(y1, b, (2, 2, 2), None, (0, 1, 1), True)
    ref = _ref(y2, b, (2, 2, 2), None, (0, 1, 1), True)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(y1.grad, y2.grad)


@needs_triton
def test_epilogue_noncontiguous_input_and_fp32_bias_with_half_input():
    y, b = _inputs(torch.float16, False, shape=(2, 4, 4, 6, 6))
    y = y.transpose(3, 4)  # neither NCDHW- nor NDHWC-contiguous
    out = ce.bias_relu_pool3d(y, b, (1, 2, 2))
    ref = _ref(y.float(), b, (1, 2, 2), None, 0, False)
    torch.testing.assert_close(out.float(), ref, **_tol(torch.float16))


@needs_triton
@pytest.mark.parametrize("bad, match", [
    (dict(y=torch.zeros(2, 3, 4, 4)), "y: expected a 5-D"),
    (dict(y=torch.zeros(1, 3, 2, 4, 4, dtype=torch.int32)), "y: expected dtype"),
    (dict(b=torch.zeros(4)), r"bias: expected shape \(3,\)"),
    (dict(k=(2, 2)), "kernel_size: expected an int or 3 ints"),
    (dict(k=(1, 2, 2), p=(0, 2, 0)), "padding"),
    (dict(k=(6, 6, 6)), "window of at most 127"),
    (dict(k=(4, 4, 4)), "too small"),
])
def test_epilogue_bad_input_raises_valueerror(bad, match):
    y = bad.get("y", torch.zeros(1, 3, 2, 4, 4)).to(DEV)
    b = bad.get("b", torch.zeros(3)).to(DEV)
    with pytest.raises(ValueError, match=match):
        ce.bias_relu_pool3d(y, b, bad.get("k", (1, 2, 2)), None, bad.get("p", 0))


@needs_triton
def test_epilogue_opcheck():
    y, b = _inputs(torch.float32, True, shape=(2, 3, 4, 5, 6))
    y.requires_grad_(True)
    b.requires_grad_(True)
    torch.library.opcheck(torch.ops.personvlad.bias_relu_pool3d.default,
                          (y, b, [2, 2, 2], [2, 2, 2], [0, 1, 1], True))


_AOT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from personvlad.kernels import conv_epilogue as ce

cases = [
    (ce._bias_relu_pool3d_fwd_kernel, {"y_ptr": "*bf16", "b_ptr": "*fp32", "out_ptr": "*bf16", "off_ptr": "*i8"},
     dict(KD=2, KH=2, KW=2, SD=2, SH=2, SW=2, PD=0, PH=1, PW=1, CHANNELS_LAST=True, USE_I64=False, BLOCK=512)),
    (ce._bias_relu_pool3d_fwd_kernel, {"y_ptr": "*fp16", "b_ptr": "*fp16", "out_ptr": "*fp16", "off_ptr": "*i8"},
     dict(KD=1, KH=2, KW=2, SD=1, SH=2, SW=2, PD=0, PH=0, PW=0, CHANNELS_LAST=False, USE_I64=True, BLOCK=512)),
    (ce._bias_relu_pool3d_bwd_kernel, {"go_ptr": "*bf16", "off_ptr": "*i8", "gy_ptr": "*bf16"},
     dict(KD=3, KH=3, KW=3, SD=1, SH=2, SW=2, PD=1, PH=1, PW=1, ND=3, NH=2, NW=2, CHANNELS_LAST=True,
          USE_I64=False, BLOCK=512)),
]
for arch in (90,):
    for kern, ptrs, cons in cases:
        ints = "i64" if cons["USE_I64"] else "i32"
        sig = {n: ptrs.get(n, "constexpr" if n in cons else ints) for n in kern.arg_names}
        k = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=cons), target=GPUTarget("cuda", arch, 32))
        assert k.asm["cubin"], (arch, kern)
print("AOT-OK")
"""


@pytest.mark.skipif(HAS_CUDA or ce is None, reason="CPU-only check (the GPU runs the kernels for real)")
def test_epilogue_kernels_compile_for_gpu_ahead_of_time():
    """The interpreter does not type-check like the compiler: lower both
    kernels to cubin for sm_90 (no GPU needed) in a subprocess
    without TRITON_INTERPRET."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


@needs_triton
def test_epilogue_under_torch_compile():
    y, b = _inputs(torch.float32, False, shape=(2, 3, 4, 6, 6))
    y1, b1 = y.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y2, b2 = y.clone().requires_grad_(True), b.clone().requires_grad_(True)
    backend = "inductor" if HAS_CUDA else "aot_eager"
    f = torch.compile(lambda y, b: (ce.bias_relu_pool3d(y, b, (1, 2, 2)) ** 2).sum(), backend=backend,
                      fullgraph=True)
    f(y1, b1).backward()
    (_ref(y2, b2, (1, 2, 2), None, 0, False) ** 2).sum().backward()
    torch.testing.assert_close(y1.grad, y2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


# --------------------------------------------------------------------------
# Modules and the model rewrite
# --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fused_module_matches_eager(backend):
    y, b = _inputs(torch.float32, True, shape=(2, 4, 5, 6, 7))
    m = perf.FusedBiasReLUPool3d(b.clone(), kernel_size=(2, 2, 2), ceil_mode=True, backend=backend)
    assert isinstance(m.bias, nn.Parameter)
    y1 = y.clone().requires_grad_(True)
    out = m(y1)
    out.sum().backward()
    y2, b2 = y.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ref = _ref(y2, b2, (2, 2, 2), None, 0, True)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(y1.grad, y2.grad)
    torch.testing.assert_close(m.bias.grad, b2.grad)


def test_fused_module_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        perf.FusedBiasReLUPool3d(4, backend="cudnn")
    with pytest.raises(ValueError, match="bias"):
        perf.FusedBiasReLUPool3d(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="padding"):
        perf.FusedBiasReLUPool3d(4, kernel_size=2, padding=2)


def _seq():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(4, 6, 3, padding=1), nn.ReLU(),                       # no pool
        nn.Conv3d(6, 6, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2, padding=(0, 1, 1), ceil_mode=True),
        nn.Conv3d(6, 5, 1), nn.Tanh(),                                  # not fusable: stays
        nn.Sequential(nn.Conv3d(5, 5, 3, padding=1), nn.ReLU()),        # nested
    )


def test_fuse_sequential_same_outputs_grads_and_state_dict():
    model = _seq()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv3d):
                mod.bias.normal_(0, 0.2)
    model = model.to(DEV)
    fused = perf.fuse_conv_relu_pool(copy.deepcopy(model))
    assert perf.count_fused(fused) == 4
    assert isinstance(fused[8], nn.Conv3d) and not isinstance(fused[8], perf.FusedConv3d)
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[2], nn.Identity)

    x = torch.randn(2, 3, 4, 9, 7, device=DEV)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref, out = model(x1), fused(x2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-4)
    gm = dict(model.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, gm[name].grad, atol=1e-5, rtol=1e-4)

    # state_dict: same keys and shapes; loadable both ways
    sd_ref, sd_fused = model.state_dict(), fused.state_dict()
    assert {k: v.shape for k, v in sd_ref.items()} == {k: v.shape for k, v in sd_fused.items()}
    fresh = perf.fuse_conv_relu_pool(_seq().to(DEV))
    fresh.load_state_dict(sd_ref)
    plain = _seq().to(DEV)
    plain.load_state_dict(sd_fused)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain(x), ref.detach(), atol=1e-5, rtol=1e-5)


def test_fused_model_under_torch_compile_fullgraph():
    model = _seq().to(DEV)
    fused = perf.fuse_conv_relu_pool(copy.deepcopy(model))
    x = torch.randn(2, 3, 4, 9, 7, device=DEV)
    compiled = torch.compile(fused, backend="inductor" if HAS_CUDA else "eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_fused_conv_shares_parameters():
    conv = nn.Conv3d(3, 4, 3, padding=1)
    f = perf.FusedConv3d.from_conv(conv, nn.MaxPool3d(2))
    assert f.weight is conv.weight and f.bias is conv.bias
    with pytest.raises(ValueError, match="bias"):
        perf.FusedConv3d.from_conv(nn.Conv3d(3, 4, 3, bias=False))
    with pytest.raises(ValueError, match="dilation"):
        perf.FusedConv3d.from_conv(conv, nn.MaxPool3d(2, dilation=2))


def test_fuse_c3d_backbone():
    from personvlad.models.backbone import C3DBackbone

    torch.manual_seed(0)
    bb = C3DBackbone((4, 6, 6, 6, 6)).eval()
    with torch.no_grad():
        for _, conv in bb.convs():
            conv.bias.normal_(0, 0.1)
    bb = bb.to(DEV)
    fused = perf.fuse_conv_relu_pool(copy.deepcopy(bb))
    assert perf.count_fused(fused) == 8
    x = torch.randn(2, 3, 8, 33, 17, device=DEV)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bb(x), atol=1e-5, rtol=1e-5)
    assert fused.state_dict().keys() == bb.state_dict().keys()
    # batch-norm backbones have no conv bias: nothing is fused
    bn = C3DBackbone((4, 6, 6, 6, 6), batch_norm=True)
    assert perf.count_fused(perf.fuse_conv_relu_pool(bn)) == 0


def _tiny_model():
    from personvlad.models import build_model

    torch.manual_seed(0)
    m = build_model("tiny").eval()
    with torch.no_grad():
        for mod in m.backbone.modules():
            if isinstance(mod, nn.Conv3d) and mod.bias is not None:
                mod.bias.normal_(0, 0.05)
    return m.to(DEV)


def test_fuse_full_model_same_descriptors():
    model = _tiny_model()
    x = model.example_input(2, generator=torch.Generator().manual_seed(0))
    fused = perf.fuse_conv_relu_pool(copy.deepcopy(model))
    assert perf.count_fused(fused) == 8
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------
# conv1 channel padding
# --------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_pad_input_channels_exact(channels_last):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 4, 6, 5)
    padded = perf.pad_input_channels(copy.deepcopy(model), 8)
    assert isinstance(padded[0], perf.ChannelPadConv3d)
    assert padded[0].conv.weight.shape == (8, 8, 3, 3, 3)
    assert padded[0].conv.weight[:, 3:].abs().sum() == 0
    assert isinstance(padded[2], nn.Conv3d) and padded[2].in_channels == 8  # only the first conv
    if channels_last:
        padded = padded.to(memory_format=torch.channels_last_3d)
        x_in = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        x_in = x
    with torch.no_grad():
        torch.testing.assert_close(padded(x_in), model(x), atol=1e-6, rtol=1e-6)
    # idempotent, and 16 pads to 16
    assert perf.pad_input_channels(padded, 8) is padded
    p16 = perf.pad_input_channels(copy.deepcopy(model), 16)
    assert p16[0].conv.in_channels == 16
    with pytest.raises(ValueError, match="multiple"):
        perf.pad_input_channels(model, 0)
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        padded[0](torch.zeros(1, 4, 2, 2, 2))


# --------------------------------------------------------------------------
# cuDNN guard
# --------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="the CPU behaviour")
def test_check_cudnn_3d_on_cpu_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = perf.check_cudnn_3d(warn=True)
    assert r["status"] == "no-gpu"
    assert r["torch"] == torch.__version__


@pytest.mark.parametrize("tv, cv, enabled, n, layouts", [
    ("2.9.0+cu128", 91002, True, 1, "all"),        # cuDNN disabled for half 3D convs
    ("2.9.0", 90701, True, 0, None),               # cuDNN before 9.8: fine
    ("2.9.1+cu128", 91002, True, 1, "ncdhw"),      # 9.8-9.14: NCDHW only
    ("2.11.0", 91300, True, 1, "ncdhw"),
    ("2.9.1", 91500, True, 0, None),               # cuDNN >= 9.15: fixed
    ("2.8.0", 91002, True, 0, None),
    ("2.11.0", 91501, False, 1, "all"),            # cudnn.enabled = False
    ("2.11.0", None, True, 0, None),
])
def test_cudnn_known_problems(tv, cv, enabled, n, layouts):
    probs = perf.cudnn_3d_known_problems(tv, cv, enabled)
    assert len(probs) == n
    if n:
        assert probs[0]["layouts"] == layouts and probs[0]["fix"]


@pytest.mark.cuda
def test_check_cudnn_3d_on_gpu_probes():
    with warnings.catch_warnings(record=True):
        r = perf.check_cudnn_3d(warn=True)
    assert r["status"] in ("ok", "bad")
    assert set(r["probe"]) == {"fp32", "bf16", "bf16_cl"}
    assert all(v["ms"] > 0 for v in r["probe"].values())


# --------------------------------------------------------------------------
# optimize_for_inference
# --------------------------------------------------------------------------
def test_optimize_for_inference_cpu_equals_eager():
    model = _tiny_model().cpu()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = model.example_input(3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    runner = perf.optimize_for_inference(model, x, dtype=None)
    assert runner.graph is None and runner.info["fused_convs"] == 8 and runner.info["pad_channels"] == 8
    out = runner(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # As accurate as eager float32 against the float64 model (within 2x its
    # error): the fused, channel-padded convolutions sum in another order, and
    # the VLAD head's sharp soft-assignment amplifies that -- eager float32
    # itself is ~2e-5 off float64 on an Intel Xeon (oneDNN's kernels there),
    # more than a fixed atol of 1e-5 allowed.
    m64 = copy.deepcopy(model).double()

    def within_eager_error(got, clips):
        with torch.no_grad():
            r64 = m64(clips.double() if clips.is_floating_point() else clips.double() / 255.0)  # as the model reads uint8
            eager_err = (model(clips).double() - r64).abs().max().item()
        err = (got.double() - r64).abs().max().item()
        assert err <= 2 * eager_err + 1e-6, (err, eager_err)

    within_eager_error(out, x)
    # other batch sizes and uint8 clips work without a graph
    xu = (x[:1] * 255).round().to(torch.uint8)
    with torch.no_grad():
        within_eager_error(runner(xu), xu)
    # the caller's model is untouched
    assert perf.count_fused(model) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # bf16 autocast: close, not equal
    out16 = perf.optimize_for_inference(model, x)(x)
    assert out16.dtype == torch.float32
    assert (out16 - ref).abs().max() < 0.05


def test_optimize_for_inference_bad_arguments():
    model = nn.Sequential(nn.Conv3d(3, 4, 3))
    with pytest.raises(ValueError, match="example_clips"):
        perf.optimize_for_inference(model, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="dtype"):
        perf.optimize_for_inference(model, torch.zeros(1, 3, 4, 4, 4), dtype=torch.int8)
    with pytest.raises(ValueError, match="model"):
        perf.optimize_for_inference(object(), torch.zeros(1, 3, 4, 4, 4))


@pytest.mark.cuda
def test_optimize_for_inference_cuda_graph():
    model = _tiny_model().cuda()
    x = model.example_input(4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x).float()
    runner = perf.optimize_for_inference(model, x)
    assert runner.graph is not None
    out = runner(x)
    assert (out - ref).abs().max() < 0.05
    # a smaller batch (front of the static buffer) and a larger one (chunks)
    torch.testing.assert_close(runner(x[:3]), out[:3], atol=0, rtol=0)
    torch.testing.assert_close(runner(torch.cat([x, x[:2]])), torch.cat([out, out[:2]]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="captured"):
        runner(x[:, :, :4])


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["ncdhw", "cl3d"])
def test_epilogue_bf16_on_gpu(layout):
    y, b = _inputs(torch.bfloat16, layout == "cl3d", shape=(4, 16, 8, 30, 18))
    y.requires_grad_(True)
    out = ce.bias_relu_pool3d(y, b, (2, 2, 2))
    y32 = y.detach().float().requires_grad_(True)
    ref = _ref(y32, b, (2, 2, 2), None, 0, False)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(y.grad.float(), y32.grad, atol=0, rtol=0)


def test_inference_runner_static_buffer_logic_without_cuda():
    """The graph-replay bookkeeping (copy-in, slicing, chunking, shape
    checks) with a stand-in graph whose replay runs the function eagerly."""
    lin = torch.nn.Linear(4, 2)

    def run(x):
        return lin(x.float().flatten(1)[:, :4]).float()

    static_in = torch.zeros(3, 3, 1, 2, 2)

    class Replay:
        def replay(self):
            static_out.copy_(run(static_in))

    static_out = run(static_in)
    r = perf.InferenceRunner(lin, run, torch.device("cpu"), static_in, static_out, Replay())
    x = torch.randn(7, 3, 1, 2, 2)
    with torch.no_grad():
        ref = run(x)
        torch.testing.assert_close(r(x[:3]), ref[:3])   # exact batch
        torch.testing.assert_close(r(x[:2]), ref[:2])   # smaller: front of the buffer
        torch.testing.assert_close(r(x), ref)           # larger: chunks of 3
    out = r(x[:3])
    r(x[3:6])
    torch.testing.assert_close(out, ref[:3])  # a clone, not a view of the static output
    with pytest.raises(ValueError, match="captured"):
        r(torch.randn(3, 3, 1, 2, 3))
    with pytest.raises(ValueError, match="captured"):
        r(x[:3].double())
