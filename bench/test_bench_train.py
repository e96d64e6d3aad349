"""Training-step throughput of the engine (issue 8): clips/s of one full step.

One step = forward (autocast bf16 + channels_last_3d + cuDNN benchmark mode
on CUDA, fp32 on CPU) + OIM loss (LUT + queue update) + backward + Adam
(eps 1e-4; fused on CUDA),
through the same ``_TrainModule`` / ``build_optimizer`` the trainer uses, on a
fixed uint8 clip batch moved/normalised as the trainer does (so data loading
is not measured; see bench/test_bench_data.py for that).

- ``train-tiny-cpu``: tiny preset (8x64x32), batch 8 (4 ids x 2), CPU float32.
- ``train-paper-gpu``: paper preset (16x180x90), batch 15 (5 ids x 3), bf16,
  skipped without CUDA.  ``train-paper-gpu-step1`` freezes the VLAD centers
  (the paper's step 1), ``train-paper-gpu-step2`` trains everything.

extra_info: label, preset, batch, clips (-> clips_per_s in bench/conftest.py),
dtype, step, peak_bytes / peak_method, device_name, torch_version, flops / flops_per_clip
(fwd+bwd, :func:`personvlad.roofline.model_work_info`) and on a GPU with known
peaks roofline_s / bound_by.
"""
from __future__ import annotations

import pytest
import torch

from personvlad._memory import peak_bytes
from personvlad.roofline import model_work_info
from personvlad.engine.config import TrainConfig
from personvlad.engine.trainer import _TrainModule, _step_params, build_optimizer
from personvlad.losses import OIMLoss
from personvlad.models import build_model
from personvlad.perf import cudnn_benchmark_scope

HAS_CUDA = torch.cuda.is_available()


def _step_fn(preset: str, num_ids: int, per_id: int, device: str, step: int):
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(preset).to(dev)
    c = model.config
    amp = torch.bfloat16 if dev.type == "cuda" else None
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    cfg = TrainConfig()
    crit = OIMLoss(model.output_dim, 625, queue_size=5000).to(dev)
    params = _step_params(model, crit, step, cfg)
    opt = build_optimizer(params, cfg, 3e-4, dev)
    net = _TrainModule(model, crit, None, 0.0, amp)
    n = num_ids * per_id
    g = torch.Generator().manual_seed(0)
    clips_u8 = torch.randint(0, 256, (n, 3, c.clip_len, c.height, c.width), dtype=torch.uint8, generator=g)
    if dev.type == "cuda":
        # the trainer's loaders hand over pinned batches: a pageable 11.7 MB
        # copy would time the host's memcpy, not the step
        clips_u8 = clips_u8.pin_memory()
    # host labels, as the trainer's loaders give them: OIMLoss decides on them
    # without a device sync (device labels would cost one sync per step, in
    # the middle of it, before the backward is queued)
    pids = torch.arange(n) // per_id

    def fn():
        x = clips_u8.to(dev, non_blocking=True).float().div_(255.0)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        # cuDNN's benchmark mode on a GPU, which the trainer turns on for
        # every run that is not deterministic
        with cudnn_benchmark_scope(dev.type == "cuda"):
            loss = net(x, pids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach()

    return fn, n


def _run(benchmark, fn, n, *, label, preset, device, dtype, step, rounds, warmup):
    for _ in range(warmup):
        fn()
    peak = peak_bytes(fn, device)
    benchmark.extra_info.update(
        label=label, preset=preset, batch=n, clips=n, dtype=dtype, step=step, peak_bytes=peak,
        peak_method="cuda_max_memory_allocated" if device == "cuda" else "vmhwm_delta",
        device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch_version=torch.__version__,
    )
    benchmark.extra_info.update(model_work_info(preset, "fwdbwd", n, dtype, device))
    if device == "cuda":
        benchmark.extra_info["target_clips_per_s"] = 1500.0  # issue 10: a full step, batch >= 15
    out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    assert torch.isfinite(out).all()


@pytest.mark.benchmark(group="train-cpu")
def test_train_step_tiny_cpu(benchmark):
    fn, n = _step_fn("tiny", 4, 2, "cpu", step=2)
    _run(benchmark, fn, n, label="train-tiny-cpu", preset="tiny", device="cpu", dtype="float32", step=2,
         rounds=5, warmup=1)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.benchmark(group="train-gpu")
@pytest.mark.parametrize("step", [1, 2])
def test_train_step_paper_gpu(benchmark, step):
    fn, n = _step_fn("paper", 5, 3, "cuda", step=step)
    _run(benchmark, fn, n, label=f"train-paper-gpu-step{step}", preset="paper", device="cuda", dtype="bfloat16",
         step=step, rounds=20, warmup=5)


# --------------------------------------------------------------------------
# The whole schedule: a probe of the real trainer, projected (issue 10: the
# paper's schedule, 50K + 10K iterations of 15 clips, in under 30 minutes)
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_tiny(tmp_path_factory):
    from personvlad.data.synth import generate

    root = tmp_path_factory.mktemp("synth") / "tiny"
    generate(str(root), preset="tiny", seed=0)
    return str(root)


def _schedule_case(benchmark, cfg, iters, label, device, target_s=None):
    from personvlad.engine.estimate import estimate, format_projection

    result = {}

    def probe():
        result.update(estimate(cfg, iters))

    benchmark.pedantic(probe, rounds=1, iterations=1, warmup_rounds=0)
    p = result["projection"]
    print("\n" + format_projection(result, label))
    benchmark.extra_info.update(
        label=label, preset=cfg.model["preset"], batch=p["batch"], dtype="bfloat16" if device == "cuda" else "float32",
        probe_iterations=result["probe"]["iterations"], probe_timings=result["probe"]["timings"],
        schedule_projection_s=p["total_s"], schedule_projection_min=p["total_min"],
        schedule_components_s=p["components"], schedule_iterations=p["iterations"],
        schedule_clips_per_s=p["clips_per_s"], schedule_notes=p["notes"], schedule_target_s=target_s,
        device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
    )
    assert p["total_s"] > 0 and all(v > 0 for v in p["clips_per_s"].values())


@pytest.mark.benchmark(group="schedule-cpu")
def test_schedule_projection_tiny_cpu(benchmark, synth_tiny):
    """configs/synthetic-tiny.yaml on CPU (its own 200 + 40 iterations),
    probed with 40 iterations."""
    import os

    from personvlad.engine.config import TrainConfig

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = TrainConfig.from_yaml(os.path.join(repo, "configs", "synthetic-tiny.yaml")).apply_overrides(
        [f"data.root={synth_tiny}", "device=cpu", "log.progress=false", "log.tensorboard=false"])
    _schedule_case(benchmark, cfg, 40, "schedule-synthetic-tiny-cpu", "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.benchmark(group="schedule-gpu")
@pytest.mark.parametrize("loader", ["shards", "shards-compile", "jpeg"])
def test_schedule_projection_paper_gpu(benchmark, synth_tiny, tmp_path_factory, loader):
    """The paper's schedule (TrainConfig defaults: paper model, 16x180x90
    clips, batch 5 ids x 3, 50K + 10K iterations, k-means on 100K
    descriptors, a checkpoint every 1000), probed with 200 iterations of the
    real trainer on synthetic data: ``shards`` reads clips from a
    `personvlad pack` store at 180x90 (the fast path), ``shards-compile``
    also compiles the model (``compile=default``; compilation is part of the
    warm-up), ``jpeg`` decodes JPEGs in 8 loader processes."""
    import os

    from personvlad.engine.config import TrainConfig

    workers = min(8, os.cpu_count() or 1)
    over = ["data.dataset=synthetic", f"data.root={synth_tiny}", f"data.workers={workers}", "device=cuda",
            "log.progress=false", "log.tensorboard=false"]
    if loader.startswith("shards"):
        from personvlad.data import MARS
        from personvlad.data.shards import pack_dataset

        store = tmp_path_factory.mktemp("shards") / "paper"
        pack_dataset(MARS(synth_tiny), str(store), size=(180, 90), workers=workers)
        over.append(f"data.shards={store}")
    if loader.endswith("compile"):
        over.append("compile=default")
    cfg = TrainConfig().apply_overrides(over)
    _schedule_case(benchmark, cfg, 200, f"schedule-paper-gpu-{loader}", "cuda", target_s=1800.0)
