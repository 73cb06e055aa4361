"""The RG-LRU recurrence (De et al. 2024, eq. 1-4) given its gate pre-activations.

    r_t = sigmoid(gate_r_t)                 recurrence gate
    i_t = sigmoid(gate_i_t)                 input gate
    log a_t = c * r_t * log_a               (log_a = log sigmoid(Lambda) = -softplus(-Lambda))
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)

At a document start (reset) the carried state is dropped (a_t = 0); with `unscaled_reset`
the first input is also not multiplied by sqrt(1 - a_t^2), as RecurrentGemma does.
Everything is computed in float32 and the state is float32 whatever the input dtype
(float64 inputs stay float64: that is how the tests build their reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import numba_common
from ..scan import linear_scan, missing_triton

# Gradient of sqrt(u) at u -> 0 is unbounded; a_t -> 1 drives 1 - a_t^2 -> 0. Clip it (here and
# in the fused kernels, `lru.numba` and `lru.triton`).
MAX_SQRT_GRADIENT = 1000.0


class _SqrtBoundedGrad(torch.autograd.Function):
    """sqrt(u) whose derivative 1 / (2 sqrt(u)) is clipped to MAX_SQRT_GRADIENT."""

    @staticmethod
    def forward(ctx, u):
        y = torch.sqrt(u)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad / torch.clamp(2.0 * y, min=1.0 / MAX_SQRT_GRADIENT)


def sqrt_bounded_grad(u: torch.Tensor) -> torch.Tensor:
    """sqrt(u) with its derivative bounded by MAX_SQRT_GRADIENT (finite at u = 0)."""
    return _SqrtBoundedGrad.apply(u)


def rglru_gates(
    gate_r: torch.Tensor, gate_i: torch.Tensor, x: torch.Tensor, log_a: torch.Tensor,
    c: float, reset: torch.Tensor | None = None, unscaled_reset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise part of the RG-LRU: the decays a_t and the normalised inputs.

    Args:
        gate_r, gate_i, x: (..., D) recurrence-gate logits, input-gate logits, inputs.
        log_a: (D,) log of the base decay a = sigmoid(Lambda), negative.
        c: the decay exponent constant (8 in the paper).
        reset: optional (...) bool, True where a document starts.
        unscaled_reset: at a reset, feed x_t * i_t without the sqrt(1 - a_t^2) factor.

    Returns:
        a_t and normalised inputs, both (..., D) float32 (float64 if x is float64).
    """
    acc = torch.promote_types(x.dtype, torch.float32)  # float64 only for float64 (test references)
    r = torch.sigmoid(gate_r.to(acc))
    i = torch.sigmoid(gate_i.to(acc))
    log_at = (c * r) * log_a.to(acc)
    a_t = torch.exp(log_at)
    mult = sqrt_bounded_grad(-torch.expm1(2.0 * log_at))  # sqrt(1 - a_t^2), accurate near a_t = 1
    if reset is not None:
        reset = reset[..., None]
        a_t = torch.where(reset, torch.zeros_like(a_t), a_t)
        if unscaled_reset:
            mult = torch.where(reset, torch.ones_like(mult), mult)
    return a_t, x.to(acc) * i * mult


def fusable(x: torch.Tensor) -> bool:
    """Whether `rglru` picks the fused kernel by default: numba available and x on the CPU, in
    any dtype but float64 (the kernel converts to float32 and back; float64 is the tests'
    reference). Wider than `numba_common.cpu_fusable`, which wants float32 only."""
    return x.device.type == "cpu" and x.dtype != torch.float64 and numba_common.available()


def rglru(
    x: torch.Tensor, gate_r: torch.Tensor, gate_i: torch.Tensor, log_a: torch.Tensor,
    c: float = 8.0, reset: torch.Tensor | None = None, h0: torch.Tensor | None = None,
    unscaled_reset: bool = False, *, impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RG-LRU over a sequence.

    Args:
        x: (B, T, D) inputs; gate_r, gate_i: (B, T, D) gate logits (pre-sigmoid).
        log_a: (D,) log base decay, log sigmoid(Lambda).
        c: decay exponent constant.
        reset: optional (B, T) bool, True at document starts.
        h0: optional (B, D) float32 state carried in from a cache.
        unscaled_reset: see `rglru_gates`.
        impl: "fused" (one-pass numba kernel, CPU), "triton" (fused Triton kernels: CUDA, or
            CPU under TRITON_INTERPRET=1), "composed" (`rglru_gates` then `linear_scan`, the
            reference), or None: fused on CPU when numba is available, triton on CUDA (a
            RuntimeError if triton is missing or broken), composed otherwise and for float64.

    Returns:
        y: (B, T, D) states h_t (the RG-LRU output): float32, except on the triton path, where
            y is in x's dtype (half the writes for bf16; the state is still float32 inside);
        h_last: (B, D) float32.
    """
    if impl is None:
        if fusable(x):
            impl = "fused"
        elif x.is_cuda and x.dtype != torch.float64:  # the kernels compute in float32
            impl = "triton"
        else:
            impl = "composed"
    if impl == "fused":
        from .numba import RGLRUNumba

        if reset is not None and reset.dtype != torch.bool:
            reset = reset.bool()
        numba_common.FUSED_CALLS["rglru"] += 1
        return RGLRUNumba.apply(x, gate_r, gate_i, log_a, c, reset, h0, unscaled_reset)
    if impl == "triton":
        try:
            from .triton import rglru_triton
        except Exception as e:  # ImportError, or a broken install (a triton that does not match torch)
            raise missing_triton("rglru", e) from e
        if reset is not None and reset.dtype != torch.bool:
            reset = reset.bool()
        if not torch.compiler.is_compiling():  # a traced counter would be a side effect in the graph
            numba_common.FUSED_CALLS["rglru_triton"] += 1
        return rglru_triton(x, gate_r, gate_i, log_a, c, reset, h0, unscaled_reset)
    if impl != "composed":
        raise ValueError(f"rglru: unknown impl {impl!r}; expected 'fused', 'triton' or 'composed'")
    a_t, u = rglru_gates(gate_r, gate_i, x, log_a, c, reset, unscaled_reset)
    return linear_scan(a_t, u, h0)


def log_a_from_lambda(lambda_: torch.Tensor) -> torch.Tensor:
    """(D,) log a = log sigmoid(Lambda) = -softplus(-Lambda), in float32."""
    return -F.softplus(-lambda_.float())


def rglru_step(
    x: torch.Tensor, gate_r: torch.Tensor, gate_i: torch.Tensor, log_a: torch.Tensor,
    h: torch.Tensor, c: float = 8.0, reset: torch.Tensor | None = None,
    unscaled_reset: bool = False,
) -> torch.Tensor:
    """One decoding step: x, gates (B, D), state h (B, D) float32, reset (B,). Returns new h."""
    a_t, u = rglru_gates(gate_r, gate_i, x, log_a, c, reset, unscaled_reset)
    return a_t * h + u
