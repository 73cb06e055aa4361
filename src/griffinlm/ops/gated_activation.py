"""act(gate) * up, the product at the heart of GeGLU/SwiGLU and of the recurrent block's output.

    gelu_tanh(g) = g * sigmoid(2 k (g + 0.044715 g^3)),  k = sqrt(2 / pi)   (= the tanh form)
    silu(g)      = g * sigmoid(g)

Composed in torch this is an activation, a product and, for backward, two more products and
the activation's derivative: five passes over (.., M) tensors that each allocate their output.
On CPU in float32 (with numba) one kernel does the forward and one the backward (dg and du
together), recomputing the activation from the saved gate. The reference is
`gated_activation_reference` (plain torch ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import scan_numba
from .scan_numba import numpy_copy

KINDS = ("gelu_tanh", "silu")


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor, kind: str,
                               gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """act(gate + gate_bias) * (up + up_bias) with torch ops (any dtype and device)."""
    if gate_bias is not None:
        gate = gate + gate_bias
    if up_bias is not None:
        up = up + up_bias
    if kind == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if kind == "silu":
        return F.silu(gate) * up
    raise ValueError(f"gated_activation: unknown kind {kind!r}; expected one of {KINDS}")


def fusable(gate: torch.Tensor, up: torch.Tensor, *biases: torch.Tensor | None) -> bool:
    """Whether the fused CPU kernels apply: float32 CPU tensors, gate and up of one shape, numba
    present, and not inside torch.compile (which fuses the composition itself, no graph break)."""
    return scan_numba.cpu_fusable(gate, up, *biases) and gate.shape == up.shape and gate.numel() > 0


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gate_bias, up_bias, code):
        from .gated_activation_numba import forward

        M = gate.shape[-1]
        g, u = gate.contiguous().view(-1, M), up.contiguous().view(-1, M)
        out = torch.empty_like(g)
        forward(g.numpy(), u.numpy(), numpy_copy(gate_bias, M), numpy_copy(up_bias, M), out.numpy(), code)
        ctx.save_for_backward(g, u, gate_bias, up_bias)
        ctx.code = code
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, grad):
        from .gated_activation_numba import backward

        g, u, gate_bias, up_bias = ctx.saved_tensors
        dh = grad.contiguous().view(g.shape)
        dg, du = torch.empty_like(g), torch.empty_like(u)
        M = g.shape[1]
        backward(g.numpy(), u.numpy(), numpy_copy(gate_bias, M), numpy_copy(up_bias, M), dh.numpy(), dg.numpy(), du.numpy(), ctx.code)
        return (dg.view(grad.shape), du.view(grad.shape), None if gate_bias is None else dg.sum(0),
                None if up_bias is None else du.sum(0), None)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str,
                     gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """act(gate + gate_bias) * (up + up_bias): (..., M) tensors, optional (M,) biases -> (..., M);
    kind "gelu_tanh" or "silu".

    Fused (one pass forward, one backward; the biases folded in, so a bias-free matmul can feed
    it) for float32 CPU tensors when numba is available, else the torch composition."""
    if kind not in KINDS:
        raise ValueError(f"gated_activation: unknown kind {kind!r}; expected one of {KINDS}")
    if not fusable(gate, up, gate_bias, up_bias):
        return gated_activation_reference(gate, up, kind, gate_bias, up_bias)
    scan_numba.FUSED_CALLS["gated_activation"] += 1
    return _GatedActivation.apply(gate, up, gate_bias, up_bias, KINDS.index(kind))
