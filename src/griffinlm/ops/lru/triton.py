"""Fused RG-LRU on the GPU (Triton): gates, log-space decay, sqrt(1 - a^2) and the scan in one pass.

Per element, as `lru.rglru_gates` then `linear_scan` (the reference it must equal):

    r = sigmoid(gate_r), i = sigmoid(gate_i), log a_t = c r log_a, a_t = exp(log a_t)
    m = sqrt(1 - a_t^2) = sqrt(-expm1(2 log a_t))     (m = 1 at an unscaled reset)
    h_t = a_t h_{t-1} + m i x_t                        (a_t = 0 at a reset)

Layout as in `scan.triton`: one program per (batch row, BLOCK_D channels) walks time in tiles
of BLOCK_T steps, scanning each tile with `tl.associative_scan` and carrying the last row on.
State and arithmetic are float32; y is written in x's dtype, h_last in float32.

Memory: the forward reads gate_r, gate_i, x once and writes y, plus the state entering each
time tile, `ckpt` (B, ceil(T / BLOCK_T), D) float32, 1/BLOCK_T of an element per (token,
channel). The backward saves only x, gate_r, gate_i and `ckpt` (3 + 1/64 elements per token and
channel, against about ten fp32 tensors for the torch composition): it recomputes the gates and,
from `ckpt`, the tile's states, and runs the reverse scan
    dh_t = g_t + a_{t+1} dh_{t+1}       (a_T := 1, so dh_{T-1} = g_{T-1} + g_last)
with `tl.associative_scan(reverse=True)`. Where the numba kernel reads h_{t-1}, this one uses
a_t h_{t-1} = h_t - m i x_t (exact in real arithmetic; 0 at a reset), so no shifted load of the
states is needed; a_{t+1} comes from a second, one-row-shifted load of gate_r (and the resets).
The derivative of sqrt is clipped to MAX_SQRT_GRADIENT as in `sqrt_bounded_grad`.

Offsets are int64 and launches run under a device guard (see `scan.triton`). Registered with
`torch.library.triton_op` ("griffinlm::rglru_fwd" / "griffinlm::rglru_bwd") so that
`torch.compile` traces through it. Under TRITON_INTERPRET=1 it runs on CPU tensors (the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..scan.triton import device_guard
from . import MAX_SQRT_GRADIENT

# Time steps per tile (also the checkpoint spacing, so forward and backward must agree) and
# channels per program. The tests run the interpreter at these same sizes.
BLOCK_T = 64
BLOCK_D = 32
# The backward holds about twenty (BLOCK_T, BLOCK_D) tiles live: compiled for sm_90 (ptxas, no GPU
# needed) it takes 255 registers and spills with 4 warps, 188 and no spills with 8.
NUM_WARPS_BWD = 8


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): z -> a2 (a1 z + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _gates(gr, gi, log_a, c):
    """(r, i, a, m) from float32 gate logits; m = sqrt(1 - a^2), accurate as a -> 1."""
    r = 1.0 / (1.0 + tl.exp(-gr))
    i = 1.0 / (1.0 + tl.exp(-gi))
    la = c * r * log_a
    a = tl.exp(la)
    y = 2.0 * la
    # -expm1(y): Taylor for small |y| (1 - a^2 would cancel), 1 - a^2 elsewhere; as lru.numba.gates.
    small = -y * (1.0 + y * (0.5 + y * (1.0 / 6 + y * (1.0 / 24 + y * (
        1.0 / 120 + y * (1.0 / 720 + y * (1.0 / 5040)))))))
    u = tl.where(y > -0.25, small, 1.0 - a * a)
    return r, i, a, tl.sqrt(tl.maximum(u, 0.0))


@triton.jit
def _tile(x_row, gr_row, gi_row, reset_ptr, pid_b, t64, mask, valid_t, log_a, c, s_xt, s_rt, s_it, s_zb, s_zt,
          HAS_RESET: tl.constexpr, UNSCALED: tl.constexpr):
    """One tile's inputs and gates as the forward computes them and the backward recomputes them:
    x, r, i; the decay a and the input scale m = sqrt(1 - a^2); alpha and m_in, the same after the
    document-start rule (alpha = 0 at a reset, m_in = 1 at an unscaled one); the resets rs."""
    x = tl.load(x_row + t64 * s_xt, mask=mask, other=0.0).to(tl.float32)
    gr = tl.load(gr_row + t64 * s_rt, mask=mask, other=0.0).to(tl.float32)
    gi = tl.load(gi_row + t64 * s_it, mask=mask, other=0.0).to(tl.float32)
    r, i, a, m = _gates(gr, gi, log_a, c)
    alpha, m_in = a, m
    rs = tl.zeros_like(x) != 0.0
    if HAS_RESET:
        rs = (tl.load(reset_ptr + pid_b * s_zb + t64 * s_zt, mask=valid_t[:, None], other=0) != 0)
        alpha = tl.where(rs, 0.0, a)  # a document starts: drop the carried state
        if UNSCALED:
            m_in = tl.where(rs, 1.0, m)
    return x, r, i, a, alpha, m, m_in, rs


@triton.jit
def _rglru_fwd_kernel(
    x_ptr, gr_ptr, gi_ptr, log_a_ptr, reset_ptr, h0_ptr, y_ptr, h_last_ptr, ckpt_ptr, T, D, c,
    s_xb, s_xt, s_xd, s_rb, s_rt, s_rd, s_ib, s_it, s_id, s_zb, s_zt,
    HAS_RESET: tl.constexpr, UNSCALED: tl.constexpr, HAS_H0: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # int64 before any product with a stride or size
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    d64 = offs_d[None, :].to(tl.int64)  # (1, BLOCK_D)
    x_row = x_ptr + pid_b * s_xb + d64 * s_xd
    gr_row = gr_ptr + pid_b * s_rb + d64 * s_rd
    gi_row = gi_ptr + pid_b * s_ib + d64 * s_id
    y_row = y_ptr + pid_b * T * D + d64  # y is contiguous (B, T, D)
    n_tiles = tl.cdiv(T, BLOCK_T)
    ckpt_row = ckpt_ptr + pid_b * n_tiles * D + offs_d  # ckpt is contiguous (B, n_tiles, D)
    log_a = tl.load(log_a_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if HAS_H0:
        carry = tl.load(h0_ptr + pid_b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    last_row = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None]
    for k in range(0, n_tiles):
        offs_t = k * BLOCK_T + tl.arange(0, BLOCK_T)
        valid_t = offs_t < T
        mask = valid_t[:, None] & mask_d[None, :]
        t64 = offs_t[:, None].to(tl.int64)  # (BLOCK_T, 1)
        x, r, i, a, alpha, m, m_in, rs = _tile(x_row, gr_row, gi_row, reset_ptr, pid_b, t64, mask, valid_t, log_a, c,
                                               s_xt, s_rt, s_it, s_zb, s_zt, HAS_RESET, UNSCALED)
        # Past the end a = 1, u = 0: the state is carried unchanged to the tile's last row.
        a = tl.where(mask, alpha, 1.0)
        u = tl.where(mask, m_in * i * x, 0.0)
        tl.store(ckpt_row + k * D, carry, mask=mask_d)  # the state entering tile k, for the backward
        a_cum, u_cum = tl.associative_scan((a, u), 0, _combine)
        h = a_cum * carry[None, :] + u_cum
        tl.store(y_row + t64 * D, h.to(y_ptr.dtype.element_ty), mask=mask)
        carry = tl.sum(tl.where(last_row, h, 0.0), axis=0)
    tl.store(h_last_ptr + pid_b * D + offs_d, carry, mask=mask_d)


@triton.jit
def _rglru_bwd_kernel(
    x_ptr, gr_ptr, gi_ptr, log_a_ptr, reset_ptr, ckpt_ptr, g_ptr, g_last_ptr,
    dx_ptr, dgr_ptr, dgi_ptr, dlog_a_ptr, dh0_ptr, T, D, c, inv_max,
    s_xb, s_xt, s_xd, s_rb, s_rt, s_rd, s_ib, s_it, s_id, s_zb, s_zt, s_gb, s_gt, s_gd,
    HAS_RESET: tl.constexpr, UNSCALED: tl.constexpr, HAS_G: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # int64 before any product with a stride or size
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    d64 = offs_d[None, :].to(tl.int64)  # (1, BLOCK_D)
    x_row = x_ptr + pid_b * s_xb + d64 * s_xd
    gr_row = gr_ptr + pid_b * s_rb + d64 * s_rd
    gi_row = gi_ptr + pid_b * s_ib + d64 * s_id
    g_row = g_ptr + pid_b * s_gb + d64 * s_gd
    out_row = pid_b * T * D + d64  # dx, dgr, dgi are contiguous (B, T, D)
    n_tiles = tl.cdiv(T, BLOCK_T)
    ckpt_row = ckpt_ptr + pid_b * n_tiles * D + offs_d
    log_a = tl.load(log_a_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    # carry = dh at the first step of the tile after this one; at the end, g_last (a_T := 1).
    carry = tl.load(g_last_ptr + pid_b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dlog_a = tl.zeros([BLOCK_D], dtype=tl.float32)
    first_row = (tl.arange(0, BLOCK_T) == 0)[:, None]
    for kk in range(0, n_tiles):
        k = n_tiles - 1 - kk  # tiles from the last to the first
        offs_t = k * BLOCK_T + tl.arange(0, BLOCK_T)
        valid_t = offs_t < T
        mask = valid_t[:, None] & mask_d[None, :]
        t64 = offs_t[:, None].to(tl.int64)  # (BLOCK_T, 1)
        x, r, i, a, alpha, m, m_in, rs = _tile(x_row, gr_row, gi_row, reset_ptr, pid_b, t64, mask, valid_t, log_a, c,
                                               s_xt, s_rt, s_it, s_zb, s_zt, HAS_RESET, UNSCALED)
        # The tile's states, recomputed from the state that entered it (as the forward did).
        u = tl.where(mask, m_in * i * x, 0.0)
        a_cum, u_cum = tl.associative_scan((tl.where(mask, alpha, 1.0), u), 0, _combine)
        h = a_cum * tl.load(ckpt_row + k * D, mask=mask_d, other=0.0)[None, :] + u_cum
        # Coefficient of dh_{t+1} in dh_t: the decay of step t + 1 (1 at t = T - 1 and past the end).
        valid_n = (offs_t + 1) < T
        mask_n = valid_n[:, None] & mask_d[None, :]
        gr_n = tl.load(gr_row + (t64 + 1) * s_rt, mask=mask_n, other=0.0).to(tl.float32)
        a_n = tl.exp(c * (1.0 / (1.0 + tl.exp(-gr_n))) * log_a)
        if HAS_RESET:
            rs_n = tl.load(reset_ptr + pid_b * s_zb + (t64 + 1) * s_zt, mask=valid_n[:, None], other=0) != 0
            a_n = tl.where(rs_n, 0.0, a_n)
        a_n = tl.where(mask_n, a_n, 1.0)
        if HAS_G:
            g = tl.load(g_row + t64 * s_gt, mask=mask, other=0.0).to(tl.float32)
        else:
            g = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        # Reverse scan: row j gets g_j + a_n[j] (g_{j+1} + a_n[j+1] (... + a_n[-1] carry)).
        c_cum, g_cum = tl.associative_scan((a_n, g), 0, _combine, reverse=True)
        dh = c_cum * carry[None, :] + g_cum
        carry = tl.sum(tl.where(first_row, dh, 0.0), axis=0)
        dm = dh * x * i
        if HAS_RESET and UNSCALED:
            dm = tl.where(rs, 0.0, dm)  # m is replaced by 1 there: no gradient reaches it
        du = dm / tl.maximum(2.0 * m, inv_max)  # d/du of sqrt(u), clipped
        # d/d(log a_t): through a_t h_{t-1} (= h_t - u_t) and through u = 1 - a_t^2.
        dla = dh * (h - u) - 2.0 * a * a * du
        tl.store(dx_ptr + out_row + t64 * D, (dh * i * m_in).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dgi_ptr + out_row + t64 * D, (dh * x * m_in * i * (1.0 - i)).to(dgi_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(dgr_ptr + out_row + t64 * D, (dla * c * log_a * r * (1.0 - r)).to(dgr_ptr.dtype.element_ty),
                 mask=mask)
        dlog_a += tl.sum(tl.where(mask, dla * c * r, 0.0), axis=0)
    # carry = dh_0; the initial state's gradient is the decay of step 0 times it.
    gr0 = tl.load(gr_ptr + pid_b * s_rb + offs_d.to(tl.int64) * s_rd, mask=mask_d, other=0.0).to(tl.float32)
    a0 = tl.exp(c * (1.0 / (1.0 + tl.exp(-gr0))) * tl.reshape(log_a, [BLOCK_D]))
    if HAS_RESET:
        a0 = tl.where(tl.load(reset_ptr + pid_b * s_zb) != 0, 0.0, a0)
    tl.store(dh0_ptr + pid_b * D + offs_d, a0 * carry, mask=mask_d)
    tl.store(dlog_a_ptr + pid_b * D + offs_d, dlog_a, mask=mask_d)


def _reset_arg(reset: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The resets as uint8 (a free view of bool) and their strides; a dummy when absent."""
    if reset is None:
        return like, (0, 0)
    r = reset.view(torch.uint8) if reset.dtype == torch.bool else (reset != 0).view(torch.uint8)
    return r, (r.stride(0), r.stride(1))


@triton_op("griffinlm::rglru_fwd", mutates_args={})
def rglru_fwd(
    x: torch.Tensor, gate_r: torch.Tensor, gate_i: torch.Tensor, log_a: torch.Tensor,
    reset: torch.Tensor | None, h0: torch.Tensor | None, c: float, unscaled_reset: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, T, D) in x's dtype, h_last (B, D) float32, ckpt (B, ceil(T / BLOCK_T), D) float32."""
    B, T, D = x.shape
    n_tiles = triton.cdiv(T, BLOCK_T)
    y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    h_last = torch.empty(B, D, dtype=torch.float32, device=x.device)
    ckpt = torch.empty(B, n_tiles, D, dtype=torch.float32, device=x.device)
    reset_u8, reset_strides = _reset_arg(reset, h_last)
    h0c = h0.contiguous() if h0 is not None else h_last
    grid = (B, triton.cdiv(D, BLOCK_D))
    with device_guard(x):
        wrap_triton(_rglru_fwd_kernel)[grid](
            x, gate_r, gate_i, log_a.contiguous(), reset_u8, h0c, y, h_last, ckpt, T, D, float(c),
            *x.stride(), *gate_r.stride(), *gate_i.stride(), *reset_strides,
            HAS_RESET=reset is not None, UNSCALED=bool(unscaled_reset), HAS_H0=h0 is not None,
            BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
        )
    return y, h_last, ckpt


@triton_op("griffinlm::rglru_bwd", mutates_args={})
def rglru_bwd(
    x: torch.Tensor, gate_r: torch.Tensor, gate_i: torch.Tensor, log_a: torch.Tensor,
    reset: torch.Tensor | None, ckpt: torch.Tensor, g: torch.Tensor | None, g_last: torch.Tensor,
    c: float, unscaled_reset: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgate_r, dgate_i) (B, T, D) in their inputs' dtypes, dlog_a per batch row (B, D) and
    dh0 (B, D), both float32, for upstream gradients g (B, T, D) of y and g_last (B, D) of h_last."""
    B, T, D = x.shape
    dx = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    dgr = torch.empty(B, T, D, dtype=gate_r.dtype, device=x.device)
    dgi = torch.empty(B, T, D, dtype=gate_i.dtype, device=x.device)
    dlog_a = torch.empty(B, D, dtype=torch.float32, device=x.device)
    dh0 = torch.empty(B, D, dtype=torch.float32, device=x.device)
    reset_u8, reset_strides = _reset_arg(reset, dh0)
    gc = g if g is not None else dx  # a dummy when absent
    grid = (B, triton.cdiv(D, BLOCK_D))
    with device_guard(x):
        wrap_triton(_rglru_bwd_kernel)[grid](
            x, gate_r, gate_i, log_a.contiguous(), reset_u8, ckpt, gc, g_last.contiguous(),
            dx, dgr, dgi, dlog_a, dh0, T, D, float(c), 1.0 / MAX_SQRT_GRADIENT,
            *x.stride(), *gate_r.stride(), *gate_i.stride(), *reset_strides, *gc.stride(),
            HAS_RESET=reset is not None, UNSCALED=bool(unscaled_reset), HAS_G=g is not None,
            BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS_BWD,
        )
    return dx, dgr, dgi, dlog_a, dh0


def _setup_context(ctx, inputs, output):
    x, gate_r, gate_i, log_a, reset, h0, c, unscaled_reset = inputs
    # What the backward needs: the three (B, T, D) inputs and the per-tile states; not y, not h0.
    ctx.save_for_backward(x, gate_r, gate_i, log_a, reset, output[2])
    ctx.c, ctx.unscaled = float(c), bool(unscaled_reset)
    ctx.h0_dtype = None if h0 is None else h0.dtype


def _backward(ctx, grad_y, grad_last, _grad_ckpt):
    x, gate_r, gate_i, log_a, reset, ckpt = ctx.saved_tensors
    if grad_last is None:
        grad_last = x.new_zeros(x.shape[0], x.shape[2], dtype=torch.float32)
    dx, dgr, dgi, dlog_a, dh0 = rglru_bwd(x, gate_r, gate_i, log_a, reset, ckpt, grad_y, grad_last,
                                          ctx.c, ctx.unscaled)
    dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
    return dx, dgr, dgi, dlog_a.sum(0).to(log_a.dtype), None, dh0, None, None


rglru_fwd.register_autograd(_backward, setup_context=_setup_context)


def rglru_triton(
    x: torch.Tensor, gate_r: torch.Tensor, gate_i: torch.Tensor, log_a: torch.Tensor, c: float = 8.0,
    reset: torch.Tensor | None = None, h0: torch.Tensor | None = None, unscaled_reset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lru.rglru` through the fused kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1).

    Args: x, gate_r, gate_i (B, T, D), any strides and float dtypes; log_a (D,); reset (B, T)
    bool; h0 (B, D). Returns y (B, T, D) in x's dtype and h_last (B, D) float32.
    """
    if x.shape[1] == 0:  # no time steps: nothing to launch
        h_last = torch.zeros(x.shape[0], x.shape[2], device=x.device) if h0 is None else h0.float() + 0
        return x.new_zeros(x.shape), h_last
    y, h_last, _ = rglru_fwd(x, gate_r, gate_i, log_a, reset, h0, float(c), bool(unscaled_reset))
    return y, h_last
