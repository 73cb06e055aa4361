"""GPU linear scan in Triton: channels across programs, time inside each program.

Each program owns (one batch row, BLOCK_D channels) and walks time in tiles of BLOCK_T
steps: it loads a (BLOCK_T, BLOCK_D) tile of a and x, scans it with `tl.associative_scan`
(combine (a1, x1), (a2, x2) -> (a1 a2, a2 x1 + x2)), adds the carried state, stores h and
carries the tile's last row on. Every element is read or written once; the tile loads give
the memory-level parallelism a purely sequential loop would lack.

The backward scan loads its tiles in descending time order, so the same forward
`associative_scan` computes the reverse recurrence dh_t = g_t + a_{t+1} dh_{t+1}.

Offsets are 64-bit: program ids and time indices are cast to int64 before they meet a stride,
because `(B - 1) * T * D` or `(T - 1) * stride` passes 2^31 at long-context sizes (griffin-7b,
D = 5632: one prefill of about 381k tokens) and int32 arithmetic would wrap into unrelated memory.
Inputs may have any strides; outputs are allocated contiguous. Every launch runs under a
device guard, since Triton launches on the *current* CUDA device whatever the pointers say.

Registered with `torch.library.triton_op` ("griffinlm::scan_fwd" / "griffinlm::scan_bwd")
plus `register_autograd`, so `torch.compile` traces through it. With TRITON_INTERPRET=1
(set before triton is imported) the kernels also run on CPU tensors, which is how the
tests check them without a GPU. Reference: `scan.reference.linear_scan_reference`.
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
def _combine(a1, x1, a2, x2):
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _scan_fwd_kernel(
    a_ptr, x_ptr, h0_ptr, h_ptr, h_last_ptr, T, D,
    s_ab, s_at, s_ad, s_xb, s_xt, s_xd,
    HAS_H0: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # int64 before any product with a stride or a size: see the module docstring.
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    a_row = a_ptr + pid_b * s_ab + offs_d[None, :].to(tl.int64) * s_ad  # (1, BLOCK_D) pointers
    x_row = x_ptr + pid_b * s_xb + offs_d[None, :].to(tl.int64) * s_xd
    h_row = h_ptr + pid_b * T * D + offs_d[None, :]
    if HAS_H0:
        carry = tl.load(h0_ptr + pid_b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    last_row = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None]
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & mask_d[None, :]
        t64 = offs_t[:, None].to(tl.int64)  # (BLOCK_T, 1)
        # Past the end a = 1, x = 0: the state is carried unchanged to the tile's last row.
        a = tl.load(a_row + t64 * s_at, mask=mask, other=1.0).to(tl.float32)
        x = tl.load(x_row + t64 * s_xt, mask=mask, other=0.0).to(tl.float32)
        a_cum, x_cum = tl.associative_scan((a, x), 0, _combine)
        h = a_cum * carry[None, :] + x_cum
        tl.store(h_row + t64 * D, h, mask=mask)
        carry = tl.sum(tl.where(last_row, h, 0.0), axis=0)
    tl.store(h_last_ptr + pid_b * D + offs_d, carry, mask=mask_d)


@triton.jit
def _scan_bwd_kernel(
    a_ptr, h_ptr, h0_ptr, g_ptr, g_last_ptr, da_ptr, dx_ptr, dh0_ptr, T, D,
    s_ab, s_at, s_ad, s_gb, s_gt, s_gd,
    HAS_H0: tl.constexpr, HAS_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # int64: see the module docstring
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    a_row = a_ptr + pid_b * s_ab + offs_d[None, :].to(tl.int64) * s_ad  # (1, BLOCK_D) pointers
    g_row = g_ptr + pid_b * s_gb + offs_d[None, :].to(tl.int64) * s_gd
    out_row = pid_b * T * D + offs_d[None, :]  # contiguous (B, T, D) outputs and h
    carry = tl.load(g_last_ptr + pid_b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    last_row = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None]
    n_tiles = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_tiles):
        # Row j of the tile is time t = end - 1 - j: a forward scan over rows runs backwards in time.
        offs_t = T - 1 - i * BLOCK_T - tl.arange(0, BLOCK_T)
        t64 = offs_t[:, None].to(tl.int64)  # (BLOCK_T, 1)
        valid_t = offs_t >= 0
        mask = valid_t[:, None] & mask_d[None, :]
        # Coefficient of dh_{t+1} is a_{t+1}; a_T := 1 lets g_last enter at t = T - 1.
        mask_next = (valid_t & (offs_t + 1 < T))[:, None] & mask_d[None, :]
        c = tl.load(a_row + (t64 + 1) * s_at, mask=mask_next, other=1.0).to(tl.float32)
        if HAS_G:
            g = tl.load(g_row + t64 * s_gt, mask=mask, other=0.0).to(tl.float32)
        else:
            g = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        c_cum, g_cum = tl.associative_scan((c, g), 0, _combine)
        dh = c_cum * carry[None, :] + g_cum
        # h_{t-1}: the previous state, h0 (or 0) before the first step.
        mask_prev = (valid_t & (offs_t >= 1))[:, None] & mask_d[None, :]
        h_prev = tl.load(h_ptr + out_row + (t64 - 1) * D, mask=mask_prev, other=0.0)
        if HAS_H0:
            h0 = tl.load(h0_ptr + pid_b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            h_prev = tl.where((offs_t == 0)[:, None], h0[None, :], h_prev)
        out = out_row + t64 * D
        tl.store(dx_ptr + out, dh, mask=mask)
        tl.store(da_ptr + out, dh * h_prev, mask=mask)
        carry = tl.sum(tl.where(last_row, dh, 0.0), axis=0)
    # carry = dh_0 (rows past t = 0 pass it through with c = 1, g = 0); dh0 = a_0 dh_0.
    a0 = tl.load(a_ptr + pid_b * s_ab + offs_d.to(tl.int64) * s_ad, mask=mask_d, other=1.0).to(tl.float32)
    tl.store(dh0_ptr + pid_b * D + offs_d, a0 * carry, mask=mask_d)


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU the current device for a launch: Triton launches on the current device and
    stream, so without this a tensor on cuda:1 would be handed to a kernel running on cuda:0."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _blocks(T: int, D: int) -> tuple[int, int]:
    if INTERPRET:  # the interpreter runs the scan's combine per element in Python: keep tiles tiny
        return 8, 16
    block_d = 32 if D <= 2048 else 64
    return 64, block_d


@triton_op("griffinlm::scan_fwd", mutates_args={})
def scan_fwd(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """h (B, T, D) float32 and h_last (B, D) float32 for h_t = a_t h_{t-1} + x_t."""
    B, T, D = x.shape
    h = torch.empty(B, T, D, dtype=torch.float32, device=x.device)
    h_last = torch.empty(B, D, dtype=torch.float32, device=x.device)
    h0c = h0.contiguous() if h0 is not None else h_last
    block_t, block_d = _blocks(T, D)
    grid = (B, triton.cdiv(D, block_d))
    with device_guard(x):
        wrap_triton(_scan_fwd_kernel)[grid](
            a, x, h0c, h, h_last, T, D, *a.stride(), *x.stride(),
            HAS_H0=h0 is not None, BLOCK_T=block_t, BLOCK_D=block_d,
        )
    return h, h_last


@triton_op("griffinlm::scan_bwd", mutates_args={})
def scan_bwd(
    a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, g: torch.Tensor | None,
    g_last: torch.Tensor, x_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da in a's dtype, dx in x_dtype, dh0 float32 (B, D)) for upstream g (B, T, D), g_last (B, D)."""
    B, T, D = h.shape
    da = torch.empty(B, T, D, dtype=a.dtype, device=h.device)
    dx = torch.empty(B, T, D, dtype=x_dtype, device=h.device)
    dh0 = torch.empty(B, D, dtype=torch.float32, device=h.device)
    h0c = h0.contiguous() if h0 is not None else dh0
    gc = g if g is not None else h
    block_t, block_d = _blocks(T, D)
    grid = (B, triton.cdiv(D, block_d))
    with device_guard(h):
        wrap_triton(_scan_bwd_kernel)[grid](
            a, h, h0c, gc, g_last.contiguous(), da, dx, dh0, T, D, *a.stride(), *gc.stride(),
            HAS_H0=h0 is not None, HAS_G=g is not None, BLOCK_T=block_t, BLOCK_D=block_d,
        )
    return da, dx, dh0


def _setup_context(ctx, inputs, output):
    a, x, h0 = inputs
    h, _ = output
    ctx.save_for_backward(a, h, h0)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad_h, grad_last):
    a, h, h0 = ctx.saved_tensors
    if grad_last is None:
        grad_last = h.new_zeros(h.shape[0], h.shape[2])
    da, dx, dh0 = scan_bwd(a, h, h0, grad_h, grad_last, ctx.x_dtype)
    return da, dx, None if h0 is None else dh0.to(h0.dtype)


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_scan_triton(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_scan through the Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    if x.shape[1] == 0:  # no time steps: nothing to launch
        h_last = torch.zeros(x.shape[0], x.shape[2], device=x.device) if h0 is None else h0.float() + 0
        return x.new_zeros(x.shape, dtype=torch.float32), h_last
    return scan_fwd(a, x, h0)
