"""RMSNorm as one op: y = x * rsqrt(mean(x^2) + eps) * scale, scale = weight (or 1 + weight).

Composed in torch (`rms_norm_reference`) a norm is six elementwise passes forward and more
backward, each allocating a (B, T, D) tensor; a model has two per block plus the final one.
On CPU in float32 (with numba) one kernel does the forward (saving only the (B*T,) inverse
RMS) and one the backward:

    dx = inv * (dy * scale - x * inv^2 * mean(dy * scale * x)),   dweight = sum_rows(dy * x * inv)
"""
from __future__ import annotations

import torch

from .. import numba_common
from ..numba_common import numpy_copy


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    """The torch composition, in float32, returning x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    scale = weight.float() + 1.0 if unit_offset else weight.float()
    return (y * scale).to(x.dtype)


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Plain float32 CPU tensors, numba present, not being traced by torch.compile."""
    return numba_common.cpu_fusable(x, weight) and x.numel() > 0


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        from .numba import forward

        D = x.shape[-1]
        x2 = x.contiguous().view(-1, D)
        y = torch.empty_like(x2)
        inv = torch.empty(x2.shape[0], dtype=torch.float32)
        forward(x2.numpy(), numpy_copy(weight, D), eps, unit_offset, y.numpy(), inv.numpy())
        ctx.save_for_backward(x2, weight, inv)
        ctx.unit_offset = unit_offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        from .numba import CHUNK_ROWS, backward

        x2, weight, inv = ctx.saved_tensors
        g = grad.contiguous().view(x2.shape)
        dx = torch.empty_like(x2)
        partial = torch.empty(-(-x2.shape[0] // CHUNK_ROWS), x2.shape[1], dtype=torch.float32)
        backward(x2.numpy(), numpy_copy(weight, x2.shape[1]), ctx.unit_offset, inv.numpy(), g.numpy(), dx.numpy(),
                 partial.numpy())
        return dx.view(grad.shape), partial.sum(0), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, unit_offset: bool = False) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D) in x's dtype. Fused for float32 CPU tensors (numba)."""
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if not fusable(x, weight):
        return rms_norm_reference(x, weight, eps, unit_offset)
    numba_common.FUSED_CALLS["rms_norm"] += 1
    return _RMSNorm.apply(x, weight, float(eps), bool(unit_offset))
