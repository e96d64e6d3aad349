"""Where the Triton kernels launch: Triton launches on the *current* CUDA
device, not on the device of the tensors it is given."""
from __future__ import annotations

import contextlib

import torch


def on_tensor_device(t: torch.Tensor):
    """A context in which launches go to ``t``'s device: ``torch.cuda.device``
    when that is not the current device, else a no-op.  (Under torch.compile
    the generated code sets the device itself; autograd's backward thread for
    a device already has it current.)"""
    if t.is_cuda and not torch.compiler.is_compiling() and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
