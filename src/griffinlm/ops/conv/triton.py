"""GPU causal depthwise Conv1D in Triton, in the (B, T, C) layout (formula: `ops.conv`).

Each program owns a (BLOCK_T tokens, BLOCK_C channels) tile of one batch row. Channels are
the contiguous axis, so every load and store is a coalesced row segment, and the output comes
out (B, T, C) for the RG-LRU's scan to read without a transpose (torch's conv1d wants and
returns channels-first). The W taps are unrolled (W is a compile-time constant, 4 in Griffin):
the forward reads x at t, t-1, ..., t-W+1 (tiles overlap by W-1 rows, served from cache),
masked by the document limit `lags` and taken from the carried `state` before the chunk.
Accumulation is fp32 whatever the input dtype; the output is in x's dtype.

Backward, one program per tile as well: dx at s gathers dy at s+j for the outputs that saw
x_s (no atomics, no write conflicts), and the tile's partial sums of dweight and dbias go to
a (programs, W, C) fp32 buffer summed by torch afterwards (deterministic, unlike atomics).

Offsets are 64-bit (program ids and time indices are cast to int64 before they meet a
stride), every launch runs under a device guard, inputs may have any strides, outputs are
contiguous. Registered with `torch.library.triton_op` plus `register_autograd`, so
`torch.compile` traces through it. With TRITON_INTERPRET=1 (set before triton is imported)
the kernels run on CPU tensors, which is how the tests check them. No gradient for `state`
(the callers' states are decoding caches); `ops.conv` routes a state that wants one elsewhere.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tap(x_ptr, st_ptr, b64, src, vis, offs_c, mask_c, s_xb, s_xt, s_xc, s_sb, s_st, s_sc,
         W: tl.constexpr, HAS_STATE: tl.constexpr):
    """(BLOCK_T, BLOCK_C) fp32 inputs at times `src` (BLOCK_T,) where `vis`: x for src >= 0,
    the state's row W-1+src before the chunk (or 0 without a state)."""
    c64 = offs_c.to(tl.int64)[None, :]
    in_x = vis & (src >= 0)
    v = tl.load(x_ptr + b64 * s_xb + src.to(tl.int64)[:, None] * s_xt + c64 * s_xc,
                mask=in_x[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        in_s = vis & (src < 0)
        v += tl.load(st_ptr + b64 * s_sb + (src + W - 1).to(tl.int64)[:, None] * s_st + c64 * s_sc,
                     mask=in_s[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, lag_ptr, st_ptr, y_ptr, T, C,
    s_xb, s_xt, s_xc, s_lb, s_lt, s_sb, s_st, s_sc,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LAGS: tl.constexpr, HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b64 = tl.program_id(0).to(tl.int64)  # int64 before any product with a stride or size
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < T
    mask_c = offs_c < C
    if HAS_LAGS:  # inputs each token may see: its position in its document
        lag = tl.load(lag_ptr + b64 * s_lb + offs_t.to(tl.int64) * s_lt, mask=mask_t, other=0)
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(W):  # lag j: weight row W-1-j times x_{t-j}
        vis = mask_t
        if HAS_LAGS:
            vis = vis & (lag >= j)
        v = _tap(x_ptr, st_ptr, b64, offs_t - j, vis, offs_c, mask_c, s_xb, s_xt, s_xc, s_sb, s_st, s_sc,
                 W, HAS_STATE)
        wj = tl.load(w_ptr + (W - 1 - j) * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        acc += wj[None, :] * v
    out = y_ptr + b64 * T * C + offs_t.to(tl.int64)[:, None] * C + offs_c.to(tl.int64)[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_c[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, lag_ptr, st_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, T, C, n_t,
    s_xb, s_xt, s_xc, s_lb, s_lt, s_sb, s_st, s_sc, s_gb, s_gt, s_gc,
    W: tl.constexpr, HAS_LAGS: tl.constexpr, HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b64 = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < T
    mask_c = offs_c < C
    c64 = offs_c.to(tl.int64)[None, :]
    dy_row = dy_ptr + b64 * s_gb + c64 * s_gc  # (1, BLOCK_C) pointers
    # dx_s = sum_j w[W-1-j] dy_{s+j}, over the outputs s+j that saw x_s (lag j visible there)
    dx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(W):
        tt = offs_t + j
        vis = tt < T
        if HAS_LAGS:
            vis = vis & (tl.load(lag_ptr + b64 * s_lb + tt.to(tl.int64) * s_lt, mask=vis, other=0) >= j)
        g = tl.load(dy_row + tt.to(tl.int64)[:, None] * s_gt, mask=vis[:, None] & mask_c[None, :],
                    other=0.0).to(tl.float32)
        wj = tl.load(w_ptr + (W - 1 - j) * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        dx += wj[None, :] * g
    out = dx_ptr + b64 * T * C + offs_t.to(tl.int64)[:, None] * C + c64
    tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_c[None, :])
    # this tile's share of dweight and dbias: dy_t times every input it saw
    g = tl.load(dy_row + offs_t.to(tl.int64)[:, None] * s_gt, mask=mask_t[:, None] & mask_c[None, :],
                other=0.0).to(tl.float32)
    if HAS_LAGS:
        lag = tl.load(lag_ptr + b64 * s_lb + offs_t.to(tl.int64) * s_lt, mask=mask_t, other=0)
    part = b64 * n_t + pid_t  # this program's row of the partial sums
    for j in tl.static_range(W):
        vis = mask_t
        if HAS_LAGS:
            vis = vis & (lag >= j)
        v = _tap(x_ptr, st_ptr, b64, offs_t - j, vis, offs_c, mask_c, s_xb, s_xt, s_xc, s_sb, s_st, s_sc,
                 W, HAS_STATE)
        tl.store(dw_ptr + (part * W + (W - 1 - j)) * C + offs_c, tl.sum(g * v, axis=0), mask=mask_c)
    tl.store(db_ptr + part * C + offs_c, tl.sum(g, axis=0), mask=mask_c)


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU the current device for a launch: Triton launches on the current device,
    so without this a tensor on cuda:1 would be handed to a kernel running on cuda:0."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _blocks(C: int) -> tuple[int, int]:
    if INTERPRET:  # the interpreter runs every element in Python: keep tiles tiny
        return 8, 16
    return 64, 64 if C >= 64 else triton.next_power_of_2(C)


def _lag_args(lags: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The lags tensor (any integer dtype, (B, T) or broadcastable) and its (batch, time) strides."""
    if lags is None:
        return x, 0, 0  # never read: HAS_LAGS is False
    lags = lags.expand(x.shape[0], x.shape[1])
    return lags, lags.stride(0), lags.stride(1)


def _state_args(state: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    if state is None:
        return x, 0, 0, 0  # never read: HAS_STATE is False
    return state, *state.stride()


@triton_op("griffinlm::conv_fwd", mutates_args={})
def conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lags: torch.Tensor | None,
             state: torch.Tensor | None) -> torch.Tensor:
    """y (B, T, C) in x's dtype; weight (W, C), bias (C,), lags (B, T) ints, state (B, W-1, C)."""
    B, T, C = x.shape
    W = weight.shape[0]
    y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    w = weight.contiguous()
    lag, s_lb, s_lt = _lag_args(lags, x)
    st, s_sb, s_st, s_sc = _state_args(state, x)
    block_t, block_c = _blocks(C)
    grid = (B, triton.cdiv(T, block_t), triton.cdiv(C, block_c))
    with device_guard(x):
        wrap_triton(_conv_fwd_kernel)[grid](
            x, w, bias if bias is not None else w, lag, st, y, T, C, *x.stride(), s_lb, s_lt, s_sb, s_st, s_sc,
            W=W, HAS_BIAS=bias is not None, HAS_LAGS=lags is not None, HAS_STATE=state is not None,
            BLOCK_T=block_t, BLOCK_C=block_c,
        )
    return y


@triton_op("griffinlm::conv_bwd", mutates_args={})
def conv_bwd(x: torch.Tensor, weight: torch.Tensor, lags: torch.Tensor | None, state: torch.Tensor | None,
             dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (B, T, C) in x's dtype, dweight (W, C) fp32, dbias (C,) fp32) for upstream dy (B, T, C)."""
    B, T, C = x.shape
    W = weight.shape[0]
    block_t, block_c = _blocks(C)
    n_t = triton.cdiv(T, block_t)
    dx = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    dw_part = torch.empty(B * n_t, W, C, dtype=torch.float32, device=x.device)
    db_part = torch.empty(B * n_t, C, dtype=torch.float32, device=x.device)
    w = weight.contiguous()
    lag, s_lb, s_lt = _lag_args(lags, x)
    st, s_sb, s_st, s_sc = _state_args(state, x)
    grid = (B, n_t, triton.cdiv(C, block_c))
    with device_guard(x):
        wrap_triton(_conv_bwd_kernel)[grid](
            x, w, lag, st, dy, dx, dw_part, db_part, T, C, n_t, *x.stride(), s_lb, s_lt, s_sb, s_st, s_sc,
            *dy.stride(), W=W, HAS_LAGS=lags is not None, HAS_STATE=state is not None,
            BLOCK_T=block_t, BLOCK_C=block_c,
        )
    return dx, dw_part.sum(0), db_part.sum(0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lags, state = inputs
    ctx.save_for_backward(x, weight, lags, state)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, weight, lags, state = ctx.saved_tensors
    dx, dw, db = conv_bwd(x, weight, lags, state, dy)
    return dx, dw.to(weight.dtype), (db.to(weight.dtype) if ctx.has_bias else None), None, None


conv_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         lags: torch.Tensor | None = None, state: torch.Tensor | None = None) -> torch.Tensor:
    """`ops.conv.causal_conv1d` through the Triton kernels (CUDA tensors, or CPU ones under
    TRITON_INTERPRET=1). x (B, T, C), weight (W, C), bias (C,), lags (B, T) or (T,) ints,
    state (B, W-1, C) without gradient -> (B, T, C) in x's dtype."""
    if state is not None and state.requires_grad:
        raise ValueError("causal_conv1d_triton: no gradient for state; use the torch path")
    if x.shape[1] == 0:
        return x.new_empty(x.shape)
    if lags is not None and lags.dim() == 1:
        lags = lags[None]
    return conv_fwd(x, weight, bias, lags, state)
