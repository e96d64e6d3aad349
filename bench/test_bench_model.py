"""PersonVLADNet throughput (issue 6): inference and training-step clips/s.

- CPU, ``tiny`` preset (8x64x32 clips, batch 4), eager float32, a few rounds:
  ``model-tiny-cpu-infer`` and ``model-tiny-cpu-train``.
- CUDA (skipped without a GPU), ``paper`` preset (16x180x90 clips), bfloat16
  autocast + channels_last_3d: ``model-paper-gpu-infer`` (batch 32) and
  ``model-paper-gpu-train`` (batch 16).

The training step is forward + a linear identity classifier with
cross-entropy on the descriptors + backward + SGD step (so it measures the
model, not a particular re-id loss).

extra_info: label, preset, batch, clips (per round; bench/conftest.py turns it
into clips_per_s), dtype, channels_last, peak_bytes and peak_method, flops /
flops_per_clip (and on a GPU with known peaks roofline_s / bound_by:
:func:`personvlad.roofline.model_work_info`), plus the device name / torch version keys of bench/conftest.py.  peak_bytes is the
memory one call adds: on CUDA ``torch.cuda.max_memory_allocated`` minus what
was allocated before (peak_method "cuda_max_memory_allocated"); on CPU the
growth of the process's peak resident set measured by
:func:`personvlad._memory.peak_bytes` (Linux ``VmHWM`` reset through
``/proc/self/clear_refs``, large allocations served by mmap; peak_method
"vmhwm_delta"), i.e. not tracemalloc and not a ``ru_maxrss`` delta (which
cannot be reset and so under-reports after an earlier, larger peak).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from personvlad._memory import peak_bytes
from personvlad.roofline import model_work_info
from personvlad.models import build_model

HAS_CUDA = torch.cuda.is_available()


def _setup(preset: str, batch: int, device: str, channels_last: bool):
    torch.manual_seed(0)
    model = build_model(preset).to(device)
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, c.clip_len, c.height, c.width, generator=g).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return model, x


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _infer_fn(model, x, amp_dtype):
    model.eval()
    dev = x.device

    def fn():
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        _sync(dev)
        return out

    return fn


def _train_fn(model, x, amp_dtype, num_ids: int):
    model.train()
    dev = x.device
    labels = torch.arange(x.shape[0], device=dev) % num_ids
    classifier = torch.nn.Linear(model.output_dim, num_ids, bias=False).to(dev)
    params = list(model.parameters()) + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def fn():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            desc = model(x)
            logits = classifier(desc.float()) * 10.0
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        _sync(dev)
        return loss

    return fn


def _run(benchmark, fn, *, label, preset, batch, device, dtype, channels_last, rounds, warmup):
    for _ in range(warmup):
        fn()
    peak = peak_bytes(fn, device)
    benchmark.extra_info.update(
        label=label, preset=preset, batch=batch, clips=batch, dtype=dtype, channels_last=channels_last,
        peak_bytes=peak, peak_method="cuda_max_memory_allocated" if device == "cuda" else "vmhwm_delta",
        device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch_version=torch.__version__,
    )
    benchmark.extra_info.update(model_work_info(preset, "fwdbwd" if label.endswith("train") else "fwd", batch,
                                                dtype, device))
    out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    assert torch.isfinite(out).all()


@pytest.mark.benchmark(group="model-cpu")
def test_model_tiny_cpu_infer(benchmark):
    model, x = _setup("tiny", 4, "cpu", channels_last=False)
    _run(benchmark, _infer_fn(model, x, None), label="model-tiny-cpu-infer", preset="tiny", batch=4,
         device="cpu", dtype="float32", channels_last=False, rounds=5, warmup=1)


@pytest.mark.benchmark(group="model-cpu")
def test_model_tiny_cpu_train(benchmark):
    model, x = _setup("tiny", 4, "cpu", channels_last=False)
    _run(benchmark, _train_fn(model, x, None, num_ids=2), label="model-tiny-cpu-train", preset="tiny", batch=4,
         device="cpu", dtype="float32", channels_last=False, rounds=3, warmup=1)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.benchmark(group="model-gpu")
def test_model_paper_gpu_infer(benchmark):
    model, x = _setup("paper", 32, "cuda", channels_last=True)
    _run(benchmark, _infer_fn(model, x, torch.bfloat16), label="model-paper-gpu-infer", preset="paper", batch=32,
         device="cuda", dtype="bfloat16", channels_last=True, rounds=10, warmup=3)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.benchmark(group="model-gpu")
def test_model_paper_gpu_train(benchmark):
    model, x = _setup("paper", 16, "cuda", channels_last=True)
    _run(benchmark, _train_fn(model, x, torch.bfloat16, num_ids=4), label="model-paper-gpu-train", preset="paper",
         batch=16, device="cuda", dtype="bfloat16", channels_last=True, rounds=10, warmup=3)
