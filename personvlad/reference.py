"""Pure-PyTorch executable form of SPEC §1 (the fused PersonVLAD op).

This module is the *reference* every kernel is compared against.  It uses the
matmul formulation:

    G        = W F                         (K x P)  GEMM 1
    logit    = M[b,s] * G[k,s] + z[k]      (B x K x P)
    a        = softmax_k(logit)            (max-subtracted, fp32)
    A'[k,s]  = sum_b a[b,k,s] M[b,s]       (K x P)
    s[k]     = sum_{b,s} a[b,k,s]          (K)
    V        = A' F^T - s c                (K x C)  GEMM 2

so nothing of size ``N*B*K*C*P`` or ``N*B*C*P`` is ever materialised (the
largest temporary is the ``N*B*K*P`` soft-assignment).  Half-precision inputs
are accumulated in float32; float64 inputs stay float64 (for gradcheck).

``person_vlad_ref`` is differentiable through PyTorch autograd, so it doubles as
the reference for gradients.  ``person_vlad_naive`` is the unfused, broadcast
form (materialises the per-part residuals) used only by benchmarks and tests as
the "naive NetVLAD per part" baseline.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F_

EPS = 1e-12


def compute_dtype(features: torch.Tensor) -> torch.dtype:
    """The accumulation dtype used for ``features``' dtype."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def normalize_vlad(V: torch.Tensor) -> torch.Tensor:
    """Intra-normalise each cluster row of ``V`` (N, K, C), flatten k-major,
    then L2-normalise the whole vector.  Returns (N, K*C)."""
    V = V / V.norm(dim=2, keepdim=True).clamp_min(EPS)
    v = V.flatten(1)
    return v / v.norm(dim=1, keepdim=True).clamp_min(EPS)


def soft_assign_ref(
    F: torch.Tensor, M: Optional[torch.Tensor], W: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """Soft-assignment ``a`` of shape (N, B, K, P) from flattened inputs.

    F: (N, C, P), M: (N, B, P) or None, W: (K, C), z: (K,), all in the compute
    dtype.  ``M=None`` is one part equal to 1 everywhere.
    """
    G = torch.matmul(W, F)  # (N, K, P)
    if M is None:
        logits = (G + z[None, :, None]).unsqueeze(1)
    else:
        logits = M.unsqueeze(2) * G.unsqueeze(1) + z[None, None, :, None]
    return torch.softmax(logits, dim=2)  # softmax max-subtracts internally


def person_vlad_ref(
    features: torch.Tensor,
    parts: Optional[torch.Tensor],
    assign_weight: torch.Tensor,
    assign_bias: torch.Tensor,
    centers: torch.Tensor,
    normalize: bool = True,
) -> torch.Tensor:
    """Reference PersonVLAD (SPEC §1).  Inputs are assumed validated.

    features (N, C, *S), parts (N, B, *S) or None, assign_weight (K, C),
    assign_bias (K,), centers (K, C).  Returns (N, K*C) if ``normalize`` else
    (N, K, C), in ``features.dtype``.
    """
    N, C = features.shape[:2]
    P = math.prod(features.shape[2:])
    K = assign_weight.shape[0]
    cd = compute_dtype(features)
    F = features.reshape(N, C, P).to(cd)
    M = None if parts is None else parts.reshape(N, parts.shape[1], P).to(cd)
    W = assign_weight.to(cd)
    z = assign_bias.to(cd)
    c = centers.to(cd)

    a = soft_assign_ref(F, M, W, z)  # (N, B, K, P)
    if M is None:
        Ap = a.squeeze(1)  # (N, K, P)
    else:
        Ap = (a * M.unsqueeze(2)).sum(dim=1)
    s = a.sum(dim=(1, 3))  # (N, K)
    V = torch.matmul(Ap, F.transpose(1, 2)) - s.unsqueeze(2) * c.unsqueeze(0)
    out = normalize_vlad(V) if normalize else V
    if N == 0:
        out = out.reshape((0, K * C) if normalize else (0, K, C))
    return out.to(features.dtype)


def person_vlad_naive(
    features: torch.Tensor,
    parts: Optional[torch.Tensor],
    assign_weight: torch.Tensor,
    assign_bias: torch.Tensor,
    centers: torch.Tensor,
    normalize: bool = True,
) -> torch.Tensor:
    """Unfused per-part NetVLAD with broadcast residuals (the textbook form).

    Materialises x (N, B, C, P) and residuals (N, B, K, C, P): benchmark
    baseline only, never used by the package itself.
    """
    N, C = features.shape[:2]
    P = math.prod(features.shape[2:])
    cd = compute_dtype(features)
    F = features.reshape(N, C, P).to(cd)
    if parts is None:
        M = F.new_ones(N, 1, P)
    else:
        M = parts.reshape(N, parts.shape[1], P).to(cd)
    x = M.unsqueeze(2) * F.unsqueeze(1)  # (N, B, C, P)
    W = assign_weight.to(cd)
    logits = torch.einsum("kc,nbcp->nbkp", W, x) + assign_bias.to(cd)[None, None, :, None]
    a = F_.softmax(logits, dim=2)
    resid = x.unsqueeze(2) - centers.to(cd)[None, None, :, :, None]  # (N,B,K,C,P)
    V = (a.unsqueeze(3) * resid).sum(dim=(1, 4))
    out = normalize_vlad(V) if normalize else V
    return out.to(features.dtype)


def person_vlad_backward_ref(
    grad_output: torch.Tensor,
    features: torch.Tensor,
    parts: Optional[torch.Tensor],
    assign_weight: torch.Tensor,
    assign_bias: torch.Tensor,
    centers: torch.Tensor,
    normalize: bool = True,
):
    """Gradients of ``person_vlad_ref`` w.r.t. its five inputs, by autograd.

    Returns (d_features, d_parts or empty tensor, d_weight, d_bias, d_centers),
    each in its input's dtype.  Used as the pure-PyTorch fallback backward of
    the registered op when the C++ extension is not built.
    """
    with torch.enable_grad():
        ins = [features, parts, assign_weight, assign_bias, centers]
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in ins]
        out = person_vlad_ref(*leaves, normalize=normalize)
        req = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out, req, grad_output.to(out.dtype), allow_unused=True)
    grads = list(grads)
    result = []
    for t, leaf in zip(ins, leaves):
        if t is None:
            result.append(features.new_empty(0))
            continue
        g = grads.pop(0)
        result.append(torch.zeros_like(t) if g is None else g.to(t.dtype))
    return tuple(result)
