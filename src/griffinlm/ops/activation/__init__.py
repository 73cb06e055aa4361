"""Activations: the one table of their kernel codes (`ACTIVATIONS`) with its torch reference,
and `gated_activation`.

act(gate) * up is the product at the heart of GeGLU/SwiGLU and of the recurrent block's output.

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

from .. import numba_common
from ..numba_common import numpy_copy

# Activation names -> the codes the numba kernels take (`decode_step_numba._act`, and
# `activation.numba` for the two kinds of `gated_activation`).
ACTIVATIONS = {"identity": 0, "sigmoid": 1, "relu": 2, "gelu_tanh": 3, "gelu": 4, "swish": 5}

# The kinds of `gated_activation` and their codes (silu is swish with beta 1).
KINDS = {"gelu_tanh": ACTIVATIONS["gelu_tanh"], "silu": ACTIVATIONS["swish"]}


def activation_reference(x: torch.Tensor, name: str, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The MLP nonlinearity `name` (a key of ACTIVATIONS) in torch; swish uses `beta`."""
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "relu":
        return F.relu(x)
    if name in ("gelu_tanh", "gelu"):
        return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")
    if name == "swish":
        return x * torch.sigmoid(torch.as_tensor(beta, dtype=x.dtype, device=x.device) * x)
    if name == "identity":
        return x
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")


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
    raise ValueError(f"gated_activation: unknown kind {kind!r}; expected one of {tuple(KINDS)}")


def fusable(gate: torch.Tensor, up: torch.Tensor, *biases: torch.Tensor | None) -> bool:
    """Whether the fused CPU kernels apply: float32 CPU tensors, gate and up of one shape, numba
    present, and not inside torch.compile (which fuses the composition itself, no graph break)."""
    return numba_common.cpu_fusable(gate, up, *biases) and gate.shape == up.shape and gate.numel() > 0


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gate_bias, up_bias, code):
        from .numba import forward

        M = gate.shape[-1]
        g, u = gate.contiguous().view(-1, M), up.contiguous().view(-1, M)
        out = torch.empty_like(g)
        forward(g.numpy(), u.numpy(), numpy_copy(gate_bias, M), numpy_copy(up_bias, M), out.numpy(), code)
        ctx.save_for_backward(g, u, gate_bias, up_bias)
        ctx.code = code
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, grad):
        from .numba import backward

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
        raise ValueError(f"gated_activation: unknown kind {kind!r}; expected one of {tuple(KINDS)}")
    if not fusable(gate, up, gate_bias, up_bias):
        return gated_activation_reference(gate, up, kind, gate_bias, up_bias)
    numba_common.FUSED_CALLS["gated_activation"] += 1
    return _GatedActivation.apply(gate, up, gate_bias, up_bias, KINDS[kind])
