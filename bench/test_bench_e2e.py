"""End-to-end throughput: inference clips/s and training-step clips/s.

GPU (``bench/gpu_check.sh``; skipped without CUDA), the paper model
(16x180x90 clips):

- inference, batch 64: ``eager-fp32`` (baseline), ``eager-bf16`` (autocast),
  ``bf16-cl`` (+ channels_last_3d), ``compile-bf16-cl`` (torch.compile
  default mode of the latter), all four at PyTorch's defaults (cuDNN's
  heuristics choose the convolution algorithms); ``ofi``
  (:func:`personvlad.perf.optimize_for_inference`: bf16 + channels_last_3d +
  fused conv epilogues + padded conv1 + cuDNN benchmark mode + CUDA graph),
  ``ofi-nograph`` (the same without the graph), ``ofi-heuristic`` (``ofi``
  without the benchmark mode);
- training step, batch 32 (8 ids x 4 clips, OIM loss with the labels on the
  host, Adam), as the trainer runs it: ``train-fp32`` (baseline, PyTorch's
  defaults), ``train-bf16-cl`` (bf16 autocast, channels_last_3d, fused Adam,
  cuDNN benchmark mode), ``train-bf16-cl-heuristic`` (the same without the
  benchmark mode), ``train-bf16-cl-epilogue`` (+ fused conv epilogues),
  ``train-bf16-cl-compile`` (the model torch.compile'd, as the trainer's
  ``compile="default"``).

- the conv epilogue alone at the conv1a / conv2a output shapes (batch 64,
  bf16, channels_last_3d), fwd and fwd+bwd: ``eager`` (baseline:
  ``max_pool3d(relu(y + b))``), ``compile`` (the same, torch.compile),
  ``fused-triton`` (:func:`personvlad.kernels.conv_epilogue.bias_relu_pool3d`).

CPU (tiny model, 8x64x32 clips, few rounds): inference ``eager-fp32``
(baseline), ``ofi-fp32``, ``ofi-bf16``; training ``train-fp32``.

extra_info: label, baseline, clips (per round; conftest turns it into
clips_per_s), batch, model, dtype, peak_bytes (one call, above what was
allocated before), flops (per round) / flops_per_clip and on a GPU with known
peaks roofline_s / bound_by (:func:`personvlad.roofline.model_work_info`),
plus the device/version keys of bench/conftest.py.
"""
from __future__ import annotations

import pytest
import torch

from personvlad._memory import peak_bytes
from personvlad.perf import cudnn_benchmark_scope
from personvlad.roofline import model_work_info

HAS_CUDA = torch.cuda.is_available()
GPU_INFER_BATCH = 64
GPU_TRAIN_IDS, GPU_TRAIN_PER_ID = 8, 4
CPU_INFER_BATCH = 4
CPU_TRAIN_IDS, CPU_TRAIN_PER_ID = 2, 2


def _model(preset: str, device: str):
    from personvlad.models import build_model

    torch.manual_seed(0)
    return build_model(preset).to(device)


def _clips(model, batch: int, device: str, dtype=torch.float32):
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, c.clip_len, c.height, c.width, generator=g)
    return x.to(device=device, dtype=dtype)


def _inference_fn(variant: str, model, clips):
    """A zero-argument callable running one batch of inference (synchronised on CUDA)."""
    from personvlad.perf import optimize_for_inference

    device = clips.device
    cuda = device.type == "cuda"
    model.eval()
    if variant.startswith("ofi"):
        dtype = torch.float32 if variant == "ofi-fp32" else torch.bfloat16
        runner = optimize_for_inference(model, clips, dtype=dtype, channels_last=True,
                                        cuda_graph=(variant in ("ofi", "ofi-heuristic") and cuda),
                                        cudnn_benchmark=variant != "ofi-heuristic")
        fn = lambda: runner(clips)  # noqa: E731
    else:
        amp = variant != "eager-fp32"
        cl = variant in ("bf16-cl", "compile-bf16-cl")
        m = model.to(memory_format=torch.channels_last_3d) if cl else model
        x = clips.contiguous(memory_format=torch.channels_last_3d) if cl else clips
        fwd = torch.compile(m) if variant.startswith("compile") else m

        def fn():  # PyTorch's defaults: cuDNN's heuristics pick the algorithms
            with torch.no_grad(), cudnn_benchmark_scope(False), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return fwd(x)

    if not cuda:
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    return synced


def _train_fn(variant: str, model, clips, num_ids: int, per_id: int):
    from personvlad.losses import OIMLoss
    from personvlad.perf import fuse_conv_relu_pool

    device = clips.device
    cuda = device.type == "cuda"
    model.train()
    bf16 = "bf16" in variant
    cl = "-cl" in variant
    if variant.endswith("epilogue"):
        fuse_conv_relu_pool(model)
    if variant.endswith("compile"):
        model.compile()  # what TrainConfig.compile="default" does
    if cl:
        model.to(memory_format=torch.channels_last_3d)
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    # labels on the host, as the trainer passes them: the OIM loss then takes
    # its data-dependent decisions without a device-to-host sync mid-step
    labels = torch.arange(num_ids).repeat_interleave(per_id)
    loss_fn = OIMLoss(model.output_dim, num_ids).to(device)
    # cuDNN's benchmark mode where the trainer has it (every run that is not
    # deterministic): the trainer-like variants; the fp32 baseline and
    # *-heuristic keep PyTorch's default (off)
    bench_mode = bf16 and not variant.endswith("heuristic")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, eps=1e-4,
                           fused=bool(cuda and bf16))

    def step():
        opt.zero_grad(set_to_none=True)
        with cudnn_benchmark_scope(bench_mode):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                desc = model(clips)
            loss = loss_fn(desc.float(), labels)
            loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    return step


def _run(benchmark, fn, *, label, baseline, clips, batch, preset, dtype, device, rounds, warmup):
    for _ in range(warmup):
        fn()  # compilation, autotuning, cuDNN algorithm search, graph capture happened before
    peak = peak_bytes(fn, device)
    benchmark.extra_info.update(label=label, baseline=baseline, clips=clips, batch=batch, model=preset,
                                dtype=dtype, peak_bytes=int(peak))
    benchmark.extra_info.update(model_work_info(preset, "fwdbwd" if label.startswith("train") else "fwd", clips,
                                                dtype, device))
    if device == "cuda" and preset == "paper":  # issue 10's targets for the optimised paths
        if label == "ofi":
            benchmark.extra_info["target_clips_per_s"] = 6000.0
        elif label.startswith("train-bf16"):
            benchmark.extra_info["target_clips_per_s"] = 1500.0
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


# --------------------------------------------------------------------------
# CPU: tiny model
# --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["eager-fp32", "ofi-fp32", "ofi-bf16"])
def test_e2e_infer_cpu(benchmark, variant):
    benchmark.group = "e2e-infer-cpu-tiny"
    model = _model("tiny", "cpu")
    clips = _clips(model, CPU_INFER_BATCH, "cpu")
    fn = _inference_fn(variant, model, clips)
    _run(benchmark, fn, label=variant, baseline="eager-fp32", clips=CPU_INFER_BATCH, batch=CPU_INFER_BATCH,
         preset="tiny", dtype="bfloat16" if "bf16" in variant else "float32", device="cpu", rounds=3, warmup=1)


@pytest.mark.parametrize("variant", ["train-fp32"])
def test_e2e_train_cpu(benchmark, variant):
    benchmark.group = "e2e-train-cpu-tiny"
    model = _model("tiny", "cpu")
    n = CPU_TRAIN_IDS * CPU_TRAIN_PER_ID
    clips = _clips(model, n, "cpu")
    fn = _train_fn(variant, model, clips, CPU_TRAIN_IDS, CPU_TRAIN_PER_ID)
    _run(benchmark, fn, label=variant, baseline="train-fp32", clips=n, batch=n, preset="tiny",
         dtype="float32", device="cpu", rounds=2, warmup=1)


# --------------------------------------------------------------------------
# GPU: paper model
# --------------------------------------------------------------------------
INFER_GPU = ["eager-fp32", "eager-bf16", "bf16-cl", "compile-bf16-cl", "ofi-nograph", "ofi", "ofi-heuristic"]
TRAIN_GPU = ["train-fp32", "train-bf16-cl", "train-bf16-cl-heuristic", "train-bf16-cl-epilogue",
             "train-bf16-cl-compile"]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("variant", INFER_GPU)
def test_e2e_infer_gpu(benchmark, variant):
    benchmark.group = "e2e-infer-gpu-paper"
    model = _model("paper", "cuda")
    clips = _clips(model, GPU_INFER_BATCH, "cuda")
    fn = _inference_fn(variant, model, clips)
    _run(benchmark, fn, label=variant, baseline="eager-fp32", clips=GPU_INFER_BATCH, batch=GPU_INFER_BATCH,
         preset="paper", dtype="float32" if variant == "eager-fp32" else "bfloat16", device="cuda",
         rounds=10, warmup=3 if variant.startswith("compile") else 2)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("variant", TRAIN_GPU)
def test_e2e_train_gpu(benchmark, variant):
    benchmark.group = "e2e-train-gpu-paper"
    model = _model("paper", "cuda")
    n = GPU_TRAIN_IDS * GPU_TRAIN_PER_ID
    clips = _clips(model, n, "cuda")
    fn = _train_fn(variant, model, clips, GPU_TRAIN_IDS, GPU_TRAIN_PER_ID)
    _run(benchmark, fn, label=variant, baseline="train-fp32", clips=n, batch=n, preset="paper",
         dtype="float32" if variant == "train-fp32" else "bfloat16", device="cuda", rounds=5, warmup=2)


# --------------------------------------------------------------------------
# GPU: the conv epilogue alone (bias + ReLU + MaxPool3d on a cuDNN conv output)
# --------------------------------------------------------------------------
# conv1a / conv2a outputs of the paper model at batch 64 (channels_last_3d, bf16).
EPILOGUE_SHAPES = {
    "conv1a": ((64, 64, 16, 180, 90), (1, 2, 2)),
    "conv2a": ((64, 128, 16, 90, 45), (2, 2, 2)),
}


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", list(EPILOGUE_SHAPES))
@pytest.mark.parametrize("variant", ["eager", "compile", "fused-triton"])
def test_epilogue_gpu(benchmark, variant, shape, mode):
    import torch.nn.functional as F

    from personvlad.kernels.conv_epilogue import bias_relu_pool3d

    benchmark.group = f"epilogue-gpu-{shape}-{mode}"
    size, pool = EPILOGUE_SHAPES[shape]
    # drawn on the GPU: ~1e9 bf16 values from the CPU's generator took ~5 s a case
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(*size, generator=g, dtype=torch.bfloat16, device="cuda").contiguous(
        memory_format=torch.channels_last_3d)
    b = torch.randn(size[1], generator=g, device="cuda")
    if mode == "fwdbwd":
        y.requires_grad_(True)
        b.requires_grad_(True)

    def eager(y, b):
        return F.max_pool3d(F.relu(y + b.to(y.dtype).view(1, -1, 1, 1, 1)), pool)

    f = {"eager": eager, "compile": torch.compile(eager), "fused-triton": lambda y, b: bias_relu_pool3d(y, b, pool)}[variant]

    def step():
        if mode == "fwd":
            with torch.no_grad():
                f(y, b)
        else:
            y.grad = b.grad = None
            f(y, b).float().sum().backward()
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    peak = peak_bytes(step, "cuda")
    benchmark.extra_info.update(label=variant, baseline="eager", shape=shape, size=list(size), pool=list(pool),
                                mode=mode, dtype="bfloat16", peak_bytes=int(peak),
                                bytes_moved=int(y.numel() * 2 * (1 + 1 / (pool[0] * pool[1] * pool[2]))))
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=0)
