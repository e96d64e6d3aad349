"""Deployment: ``torch.export`` programs, portable ones, and ONNX.

A model holding the fused op (the :class:`personvlad.nn.PersonVLAD` layer,
:class:`personvlad.models.PersonVLADNet`) exports with ``torch.export`` as it
is: the op stays one node, ``personvlad.person_vlad`` (or, where ``backend=
"auto"`` picked the Triton kernels on a GPU, ``personvlad.person_vlad_triton``).
Such a program runs the fused kernels, and loads only in a process that has
imported ``personvlad`` (which registers the op).

- :func:`export_program` — ``torch.export`` of a model in eval mode at an
  example input, with a dynamic batch dimension.
- :func:`decompose` — the program with every fused VLAD op replaced by the
  reference's PyTorch operations (:func:`personvlad.reference.person_vlad_ref`,
  the executable spec): a *portable* program, which ``torch.export.load``
  reads and runs with plain PyTorch, no personvlad installed, and which
  exporters that know only ATen operators (ONNX) can translate.  It computes
  what the op computes, at the reference's speed and memory (it forms the
  N x B x K x P soft-assignments the kernels never write).
- :func:`export_onnx` — a model to an ONNX file (through the decomposed
  program and ``torch.onnx.export(dynamo=True)``; needs the ``onnx`` and
  ``onnxscript`` packages: ``pip install personvlad[onnx]``).

The command line has them as ``personvlad export --checkpoint CKPT --out
model.pt2|model.onnx [--portable]``.

Only the VLAD op is decomposed.  The fused conv epilogues of
:func:`personvlad.perf.fuse_conv_relu_pool` (an
``optimize_for_inference`` model's ``personvlad.bias_relu_pool3d``, on a GPU)
have no decomposition here: :func:`decompose` refuses a program that holds
one, naming it; export the model before fusing.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from . import reference
from .engine.checkpoint import _atomic, atomic_write_bytes

__all__ = ["export_program", "decompose", "export_onnx", "save_program", "onnx_opset", "VLAD_OPS", "register"]


def _vlad_decomp(features, parts, assign_weight, assign_bias, centers, normalize=True):
    return reference.person_vlad_ref(features, parts, assign_weight, assign_bias, centers, normalize)


def _vlad_triton_decomp(features, parts, assign_weight, assign_bias, centers, normalize, keep_f32=False):
    """The Triton op's three outputs (out, norms, out_f32) from the reference:
    ``norms`` holds the K row norms of V and the norm of the
    intra-normalised vector (what the backward reads); ``out_f32`` the
    float32 output where ``keep_f32`` asked for it (half features,
    normalize), else an empty (N, 0)."""
    N = features.shape[0]
    cd = reference.compute_dtype(features)
    V = reference.person_vlad_ref(features.to(cd), parts, assign_weight, assign_bias, centers, False)
    if not normalize:
        return (V.to(features.dtype), V.new_zeros((N, 0), dtype=torch.float32),
                V.new_zeros((N, 0), dtype=torch.float32))
    r = V.norm(dim=2)
    u = (V / r.unsqueeze(2).clamp_min(reference.EPS)).flatten(1)
    R = u.norm(dim=1)
    out = u / R.unsqueeze(1).clamp_min(reference.EPS)
    norms = torch.cat([r, R.unsqueeze(1)], 1).to(torch.float32)
    keep = keep_f32 and features.dtype != torch.float32
    out_f32 = out.to(torch.float32) if keep else V.new_zeros((N, 0), dtype=torch.float32)
    return out.to(features.dtype), norms, out_f32


def _vlad_ops() -> Dict[Any, Callable]:
    table = {torch.ops.personvlad.person_vlad.default: _vlad_decomp}
    # registered when personvlad.kernels imported (a program can hold the op
    # only then): nothing to import here
    if hasattr(torch.ops.personvlad, "person_vlad_triton"):
        table[torch.ops.personvlad.person_vlad_triton.default] = _vlad_triton_decomp
    return table


VLAD_OPS = ("personvlad::person_vlad", "personvlad::person_vlad_triton")


def _personvlad_targets(ep) -> list:
    return sorted({str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("personvlad.")})


def export_program(model: torch.nn.Module, example: torch.Tensor, *, dynamic_batch: bool = True,
                   max_batch: Optional[int] = None, strict: bool = False):
    """``torch.export.export(model, (example,))`` with ``model`` in eval mode
    (restored after) and, with ``dynamic_batch``, the first dimension of the
    input dynamic (1 .. ``max_batch``, unbounded when None).  ``example`` is
    one input batch (for :class:`~personvlad.models.PersonVLADNet`: clips
    (N, 3, T, H, W), e.g. ``model.example_input(2)``)."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() < 1:
        raise ValueError(f"example: expected a tensor with a batch dimension, got "
                         f"{tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
    if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 2):
        raise ValueError(f"max_batch: expected None or an int >= 2, got {max_batch!r}")
    if dynamic_batch and example.shape[0] < 2:
        raise ValueError(f"example: a dynamic batch needs an example batch of >= 2 (torch.export specialises "
                         f"dimensions of size 1), got {example.shape[0]}")
    if max_batch is not None and example.shape[0] > max_batch:
        raise ValueError(f"max_batch: expected >= the example's batch {example.shape[0]}, got {max_batch}")
    dynamic_shapes = None
    if dynamic_batch:
        # min 1: a batch of 0 is a separate case of the op (no work) that
        # export would specialise on
        batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
        dynamic_shapes = ({0: batch},)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes, strict=strict)
    finally:
        model.train(was_training)


def decompose(ep):
    """``ep`` (a ``torch.export.ExportedProgram``) with the fused VLAD ops
    replaced by the reference's PyTorch operations (see the module
    docstring), the other operators as ``torch.export``'s default
    decompositions leave them.  Raises ``ValueError`` naming any other
    personvlad operator left in the program."""
    if not isinstance(ep, torch.export.ExportedProgram):
        raise ValueError(f"ep: expected a torch.export.ExportedProgram, got {type(ep).__name__}")
    table = torch.export.default_decompositions()
    table.update(_vlad_ops())
    out = ep.run_decompositions(table)
    left = _personvlad_targets(out)
    if left:
        raise ValueError(f"ep: personvlad operators without a decomposition: {', '.join(left)} "
                         f"(only {', '.join(VLAD_OPS)} have one; export the model before "
                         f"fuse_conv_relu_pool / optimize_for_inference)")
    return out


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str, *, dynamic_batch: bool = True,
                max_batch: Optional[int] = None, opset: Optional[int] = None,
                input_names: Sequence[str] = ("clips",), output_names: Sequence[str] = ("descriptors",)) -> str:
    """Write ``model`` as an ONNX file at ``path`` and return the path.

    :func:`export_program` (dynamic batch by default), :func:`decompose`,
    then ``torch.onnx.export(program, dynamo=True)`` (``opset``: its
    ``opset_version``; None: the exporter's default).  Needs the ``onnx``
    and ``onnxscript`` packages."""
    _check_path(path)
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"export_onnx needs the onnx and onnxscript packages (missing: {', '.join(missing)}); "
                          f"pip install 'personvlad[onnx]'")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or opset < 1):
        raise ValueError(f"opset: expected None or a positive int, got {opset!r}")
    ep = decompose(export_program(model, example, dynamic_batch=dynamic_batch, max_batch=max_batch))
    kw: Dict[str, Any] = dict(dynamo=True, input_names=list(input_names), output_names=list(output_names))
    if opset is not None:
        kw["opset_version"] = opset
    proto = torch.onnx.export(ep, (example,), **kw).model_proto  # serialised once: checked, then written
    got = onnx_opset(proto)
    if opset is not None and got != opset:
        # the exporter falls back to its own opset (with a logged traceback)
        # where it cannot convert to the one asked for
        raise ValueError(f"opset: the ONNX exporter could not produce opset {opset}; it gave {got}")
    # one self-contained file (weights inside; protobuf caps it at 2 GB),
    # written as the package's checkpoints are
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def onnx_opset(model_proto) -> Optional[int]:
    """The default-domain (``ai.onnx``) opset version of an ONNX ModelProto."""
    for imp in model_proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _check_path(path) -> None:
    if not isinstance(path, str) or not path:
        raise ValueError(f"path: expected a file name, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"path: {path} is a directory; expected a file name")


def save_program(ep, path: str) -> str:
    """``torch.export.save(ep, path)``, written as the package's checkpoints
    are (``engine.checkpoint._atomic``: a temporary file
    beside ``path``, its folder created, fsync, rename; nothing left behind on
    failure)."""
    _check_path(path)
    _atomic(path, lambda f: torch.export.save(ep, f))
    return path


# --------------------------------------------------------------------------
# personvlad export
# --------------------------------------------------------------------------
EXPORT_EPILOG = """\
examples:
  personvlad export --checkpoint runs/mars/best.pt --out reid.pt2              # runs the fused op
  personvlad export --checkpoint runs/mars/best.pt --out reid.pt2 --portable   # plain PyTorch only
  personvlad export --checkpoint runs/mars/best.pt --out reid.onnx             # ONNX (needs onnx, onnxscript)

The program takes float32 clips (N, 3, T, H, W) in [0, 1] and returns the
L2-normalised clip descriptors (N, D); N is dynamic (1 .. --max-batch) unless
--static-batch.  Load a .pt2 with torch.export.load(path).module().
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a trained model for deployment: torch.export (.pt2) or ONNX (.onnx)",
        description="A checkpoint's model as a torch.export program (.pt2; with --portable, the fused VLAD op "
                    "replaced by plain PyTorch operations, so that loading it needs no personvlad) or as an "
                    "ONNX file (.onnx, always decomposed).",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint written by personvlad train (latest.pt/best.pt)")
    p.add_argument("--out", required=True, help="output file: .pt2 or .onnx")
    p.add_argument("--portable", action="store_true", help=".pt2: decompose the fused op (loads without personvlad)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example input the export traces (default 2)")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch the program accepts (default: any)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size at --batch")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--device", default="cpu", help="cpu|cuda|cuda:N: where the program runs (default cpu)")
    p.set_defaults(func=export_main)


def export_main(args) -> int:
    from .engine.distributed import resolve_device
    from .engine.extract import load_model_from_checkpoint

    ext = os.path.splitext(args.out)[1].lower()
    if ext not in (".pt2", ".onnx"):
        raise ValueError(f"--out: expected a .pt2 or .onnx file name, got {args.out!r}")
    if os.path.isdir(args.out):
        raise ValueError(f"--out: {args.out} is a directory; expected a file name")
    lo = 1 if args.static_batch else 2
    if args.batch < lo:
        why = "" if args.static_batch else " (a dynamic batch needs an example of >= 2: torch.export fixes size-1 dims)"
        raise ValueError(f"--batch: expected >= {lo}{why}, got {args.batch}")
    if args.max_batch is not None:
        if args.static_batch:
            raise ValueError("--max-batch goes with a dynamic batch, not with --static-batch")
        if args.max_batch < args.batch:
            raise ValueError(f"--max-batch: expected >= --batch ({args.batch}), got {args.max_batch}")
    if args.opset is not None and ext != ".onnx":
        raise ValueError("--opset goes with an .onnx --out")
    if args.portable and ext == ".onnx":
        print("note: --portable is implied for .onnx", file=sys.stderr)
    device = resolve_device(args.device)
    model = load_model_from_checkpoint(args.checkpoint, device)
    example = model.example_input(args.batch).to(device)
    dyn = not args.static_batch
    if ext == ".onnx":
        export_onnx(model, example, args.out, dynamic_batch=dyn, max_batch=args.max_batch, opset=args.opset)
        kind = "ONNX (fused op decomposed)"
    else:
        ep = export_program(model, example, dynamic_batch=dyn, max_batch=args.max_batch)
        if args.portable:
            ep = decompose(ep)
        save_program(ep, args.out)
        kind = "torch.export, " + ("portable (fused op decomposed)" if args.portable
                                   else "fused op (load after importing personvlad)")
    c = model.config
    batch = str(args.batch) if args.static_batch else f"1..{args.max_batch or 'any'}"
    print(f"wrote {args.out}: {kind}; input clips (N={batch}, 3, {c.clip_len}, {c.height}, {c.width}) "
          f"on {device}, output (N, {model.output_dim})")
    return 0
