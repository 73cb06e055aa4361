"""Causal depthwise convolution over time, in the (B, T, C) layout the recurrent block uses.

    y_t = bias + sum_{j=0}^{min(W-1, lags_t)} weight[W-1-j] * x_{t-j}

`weight` is time-major (W, C): weight[W-1] multiplies the current token. `lags` (B, T) is how
many past inputs each token may see (its position in its document; None: all of them), and
inputs before the chunk come from `state` (B, W-1, C) (None: zeros).

On CUDA the Triton kernels (`conv/triton.py`) do it in the (B, T, C) layout with fp32
accumulation, documents or not; a CUDA tensor without a working triton is an error, not a
silent fallback. On CPU in float32 (with numba) one kernel does the forward and one the
backward, in place in the (B, T, C) layout; torch's conv1d wants (B, C, T), and the two
transposes around it cost four times the convolution. Elsewhere: conv1d when nothing is
masked, else the lag loop `causal_conv1d_reference` (any dtype and device, accumulating in
fp32 or wider; the tests' float64 reference).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import numba_common
from ..numba_common import numpy_copy

IMPLS = ("numba", "triton", "torch")


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            lags: torch.Tensor | None = None, state: torch.Tensor | None = None) -> torch.Tensor:
    """The convolution with one masked multiply-add per lag (torch ops, differentiable).

    Sums in fp32 (float64 for float64 inputs) and rounds to x's dtype once at the end: a bf16
    running sum would round after every lag, W times the error of the fp32 one."""
    B, T, C = x.shape
    W = weight.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    prev = state.to(x.dtype) if state is not None else x.new_zeros(B, W - 1, C)
    xp = torch.cat([prev, x], dim=1)  # (B, W-1+T, C): xp[:, W-1+t] = x_t
    y = x.to(acc) * weight[W - 1].to(acc)  # (B, T, C) in acc
    for j in range(1, W):
        lagged = xp[:, W - 1 - j : W - 1 - j + T]  # x_{t-j}
        if lags is not None:
            lagged = lagged * (lags >= j)[..., None].to(x.dtype)  # 0 or 1: exact in any dtype
        y = y + lagged.to(acc) * weight[W - 1 - j].to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def fusable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None) -> bool:
    """Whether the numba kernels apply: float32 CPU plain tensors, numba present, no gradient
    wanted for `state`, and not inside torch.compile (which fuses the composition itself)."""
    if state is not None and state.requires_grad:
        return False
    return numba_common.cpu_fusable(x, weight, bias, state) and x.shape[1] > 0


def _lags_np(lags: torch.Tensor | None, B: int, T: int):
    if lags is None:
        return torch.zeros(1, 1, dtype=torch.int64).numpy(), False
    return lags.to(torch.int64).expand(B, T).contiguous().numpy(), True


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lags, state):
        from .numba import forward

        B, T, C = x.shape
        x = x.contiguous()
        w = weight.detach().clone()  # a copy for numba, as `numpy_copy` explains
        st = state.contiguous() if state is not None else torch.zeros(1, 1, 1)
        lags_np, has_lags = _lags_np(lags, B, T)
        y = torch.empty_like(x)
        forward(x.numpy(), st.numpy(), state is not None, w.numpy(), numpy_copy(bias, C), lags_np, has_lags, y.numpy())
        ctx.save_for_backward(x, w, st)
        ctx.lags, ctx.has_state, ctx.has_bias = lags_np if has_lags else None, state is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        from .numba import backward, empty_partials

        x, w, st = ctx.saved_tensors
        B, T, C = x.shape
        W = w.shape[0]
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dw_part, db_part = empty_partials(B, T, W, C)
        has_lags = ctx.lags is not None
        lags_np = ctx.lags if has_lags else torch.zeros(1, 1, dtype=torch.int64).numpy()
        backward(x.numpy(), st.numpy(), ctx.has_state, w.numpy(), lags_np, has_lags, dy.numpy(), dx.numpy(),
                 dw_part, db_part)
        dw = torch.from_numpy(dw_part).sum(0)
        db = torch.from_numpy(db_part).sum(0) if ctx.has_bias else None
        return dx, dw, db, None, None


def _missing_triton(error: Exception) -> RuntimeError:
    """On CUDA the alternative to the kernel is the lag loop (W passes over (B, T, C) in fp32):
    a training run should fail and say how to fix it rather than run slowly unnoticed."""
    return RuntimeError(
        f"causal_conv1d: CUDA tensors need the Triton kernels, but importing them failed "
        f"({type(error).__name__}: {error}). Install the triton that matches this torch (torch "
        f"{torch.__version__}; `pip install triton`), or pass impl='torch' for the slow torch path.")


def default_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 state: torch.Tensor | None) -> str:
    """triton on CUDA (unless `state` wants a gradient: the kernels give none), numba for
    fusable CPU float32, else torch."""
    if x.is_cuda and not (state is not None and state.requires_grad):
        return "triton"
    return "numba" if fusable(x, weight, bias, state) else "torch"


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  lags: torch.Tensor | None = None, state: torch.Tensor | None = None, *,
                  impl: str | None = None) -> torch.Tensor:
    """Causal depthwise convolution (see the module docstring).

    Args:
        x: (B, T, C) inputs. weight: (W, C), weight[W-1] for the current token. bias: (C,).
        lags: optional (B, T) or (T,) integer count of past inputs each token may see (its
            position in its document); None: no limit.
        state: optional (B, W-1, C) inputs before the chunk (a decoding cache); None: zeros.
        impl: force "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "numba" or "torch";
            None: `default_impl`.

    Returns:
        (B, T, C) in x's dtype.
    """
    if x.dim() != 3 or weight.dim() != 2 or x.shape[2] != weight.shape[1]:
        raise ValueError(f"causal_conv1d: x (B, T, C) and weight (W, C) expected, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if state is not None and tuple(state.shape) != (x.shape[0], weight.shape[0] - 1, x.shape[2]):
        raise ValueError(f"causal_conv1d: state (B, W-1, C) = {(x.shape[0], weight.shape[0] - 1, x.shape[2])} "
                         f"expected, got {tuple(state.shape)}")
    impl = impl or default_impl(x, weight, bias, state)
    if impl not in IMPLS:
        raise ValueError(f"causal_conv1d: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "triton":
        if not (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
            raise ValueError("causal_conv1d: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        try:
            from .triton import causal_conv1d_triton
        except Exception as e:  # ImportError, or a triton that does not match this torch
            raise _missing_triton(e) from e
        numba_common.FUSED_CALLS["causal_conv1d_triton"] += 1
        return causal_conv1d_triton(x, weight, bias, lags, state)
    if impl == "numba":
        if not fusable(x, weight, bias, state):
            raise ValueError("causal_conv1d: impl='numba' needs float32 CPU tensors, numba, and no state gradient")
        numba_common.FUSED_CALLS["causal_conv1d"] += 1
        return _CausalConv1d.apply(x, weight, bias, lags, state)
    if lags is None and state is None:
        W, C = weight.shape
        w = weight.t()[:, None, :].to(x.dtype)  # (C, 1, W); conv1d correlates, so w[..., W-1] hits x_t
        y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), w, groups=C).transpose(1, 2)
        return y + bias.to(x.dtype) if bias is not None else y
    return causal_conv1d_reference(x, weight, bias, lags, state)


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                       slots: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """One token per row through a pool of conv states (torch ops; any dtype, compilable).

    x (n, C) this step's inputs; state (N, W-1, C) the pool's last W-1 inputs per slot, rows
    `slots` (n,) read and then overwritten in place with the shifted window; seen (n,) long the
    inputs of the current document already seen (lag j is visible when j <= seen).
    Returns y (n, C)."""
    W = weight.shape[0]
    xp = torch.cat([state.index_select(0, slots).to(x.dtype), x[:, None]], dim=1)  # (n, W, C): xp[:, W-1-j] = x_{t-j}
    lags = torch.arange(W - 1, -1, -1, device=x.device)  # lag of each row of xp
    visible = (lags[None, :] <= seen[:, None]).to(x.dtype)  # (n, W)
    y = torch.einsum("nwc,wc,nw->nc", xp, weight.to(x.dtype), visible)
    state.index_copy_(0, slots, xp[:, 1:].to(state.dtype))
    return y + bias.to(x.dtype) if bias is not None else y
