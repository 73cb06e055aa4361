"""Fused RG-LRU on CPU (numba): gates, log-space decay, sqrt(1 - a^2) and the scan in one pass.

Per element (see `lru.rglru_gates` for the reference composition it must equal):

    r = sigmoid(gate_r), i = sigmoid(gate_i), log a_t = c r log_a, a_t = exp(log a_t)
    m = sqrt(1 - a_t^2) = sqrt(-expm1(2 log a_t))     (m = 1 at an unscaled reset)
    h_t = a_t h_{t-1} + m i x_t                        (a_t = 0 at a reset)

The unfused composition makes about a dozen full passes over (B, T, D) tensors and saves
as many for backward; here forward reads gate_r, gate_i, x once and writes h, and
backward recomputes the gates from them. exp is `numba_common.jit.exp32`.
The derivative of sqrt is clipped to MAX_SQRT_GRADIENT as in `sqrt_bounded_grad`.

This module imports numba: `rglru` imports it only once `numba_common.available()`.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ..buffer_pool import empty_float32
from ..numba_common import as_f32, scan_backward, scan_forward
from ..numba_common.jit import FASTMATH as fm
from ..numba_common.jit import channel_job, exp32, f32, previous_state
from . import MAX_SQRT_GRADIENT


@njit(fastmath=fm, inline="always")
def gates(gr, gi, log_a, c):
    """-> (r, i, a, m) with m = sqrt(1 - a^2) accurate as a -> 1."""
    r = f32(1.0) / (f32(1.0) + exp32(-gr))
    i = f32(1.0) / (f32(1.0) + exp32(-gi))
    la = c * r * log_a
    a = exp32(la)
    y = f32(2.0) * la
    # -expm1(y): Taylor for small |y| (no cancellation), 1 - a^2 elsewhere.
    small = -y * (f32(1.0) + y * (f32(0.5) + y * (f32(1.0 / 6) + y * (f32(1.0 / 24) + y * (
        f32(1.0 / 120) + y * (f32(1.0 / 720) + y * f32(1.0 / 5040)))))))
    u = small if y > f32(-0.25) else f32(1.0) - a * a
    return r, i, a, np.sqrt(max(u, f32(0.0)))


@njit(parallel=True, fastmath=fm, cache=True, boundscheck=False)
def fwd(x, gr, gi, log_a, c, reset, has_reset, unscaled, h0, has_h0, h, h_last, chunk):
    """x, gr, gi, h: (B, T, D) float32; log_a (D,); reset (B, T) bool; h0, h_last (B, D)."""
    B, T, D = x.shape
    n_chunks = (D + chunk - 1) // chunk
    c = f32(c)
    for job in prange(B * n_chunks):
        b, d0, d1 = channel_job(job, n_chunks, chunk, D)
        n = d1 - d0
        la = log_a[d0:d1]
        state = np.zeros(n, dtype=np.float32)
        if has_h0:
            state[:] = h0[b, d0:d1]
        for t in range(T):
            rs = has_reset and reset[b, t]
            xt = x[b, t, d0:d1]
            grt = gr[b, t, d0:d1]
            git = gi[b, t, d0:d1]
            ht = h[b, t, d0:d1]
            keep = f32(0.0) if rs else f32(1.0)
            unit = rs and unscaled
            for d in range(n):
                _, i, a, m = gates(grt[d], git[d], la[d], c)
                if unit:
                    m = f32(1.0)
                state[d] = keep * a * state[d] + m * i * xt[d]
            for d in range(n):
                ht[d] = state[d]
        h_last[b, d0:d1] = state


@njit(parallel=True, fastmath=fm, cache=True, boundscheck=False)
def bwd(x, gr, gi, log_a, c, reset, has_reset, unscaled, h0, has_h0, h, g, has_g, g_last,
        dx, dgr, dgi, dlog_a, dh0, chunk):
    """Reverse pass. dx, dgr, dgi: (B, T, D) float32; dlog_a, dh0: (B, D) (summed over T)."""
    B, T, D = x.shape
    n_chunks = (D + chunk - 1) // chunk
    c = f32(c)
    inv_max = f32(1.0 / MAX_SQRT_GRADIENT)
    for job in prange(B * n_chunks):
        b, d0, d1 = channel_job(job, n_chunks, chunk, D)
        n = d1 - d0
        la = log_a[d0:d1]
        carry = np.empty(n, dtype=np.float32)
        carry[:] = g_last[b, d0:d1]
        acc = np.zeros(n, dtype=np.float64)
        zeros = np.zeros(n, dtype=np.float32)
        for t in range(T - 1, -1, -1):
            rs = has_reset and reset[b, t]
            keep = f32(0.0) if rs else f32(1.0)
            unit = rs and unscaled
            hp = previous_state(h, h0, has_h0, zeros, b, t, d0, d1)
            if has_g:
                gt = g[b, t, d0:d1]
                for d in range(n):
                    carry[d] += gt[d]
            xt = x[b, t, d0:d1]
            grt = gr[b, t, d0:d1]
            git = gi[b, t, d0:d1]
            dxt = dx[b, t, d0:d1]
            dgrt = dgr[b, t, d0:d1]
            dgit = dgi[b, t, d0:d1]
            for d in range(n):
                r, i, a, m = gates(grt[d], git[d], la[d], c)
                dh = carry[d]
                if unit:
                    m = f32(1.0)
                xv = xt[d]
                dxt[d] = dh * i * m
                dgit[d] = dh * xv * m * i * (f32(1.0) - i)
                dm = f32(0.0) if unit else dh * xv * i
                du = dm / max(f32(2.0) * m, inv_max)
                dla = keep * dh * hp[d] * a - f32(2.0) * a * a * du
                dgrt[d] = dla * c * la[d] * r * (f32(1.0) - r)
                acc[d] += dla * c * r
                carry[d] = keep * a * dh
        for d in range(n):
            dlog_a[b, d0 + d] = acc[d]
        dh0[b, d0:d1] = carry


def _inputs(x, gate_r, gate_i, log_a, c, reset, unscaled) -> tuple:
    """The kernels' leading arguments (before h0): float32 arrays, c, the resets (a dummy when
    absent) and the flags."""
    reset_np = (reset.contiguous() if reset is not None else torch.zeros(1, 1, dtype=torch.bool)).numpy()
    return (as_f32(x).numpy(), as_f32(gate_r).numpy(), as_f32(gate_i).numpy(), as_f32(log_a).numpy(), float(c),
            reset_np, reset is not None, bool(unscaled))


class RGLRUNumba(torch.autograd.Function):
    """Fused RG-LRU over (B, T, D) CPU tensors; gradients to x, gate_r, gate_i, log_a, h0."""

    @staticmethod
    def forward(ctx, x, gate_r, gate_i, log_a, c, reset, h0, unscaled_reset):
        h, h_last = scan_forward(fwd, _inputs(x, gate_r, gate_i, log_a, c, reset, unscaled_reset), x.shape, h0)
        ctx.save_for_backward(x, gate_r, gate_i, log_a, reset, h0, h)
        ctx.c, ctx.unscaled = float(c), bool(unscaled_reset)
        return h, h_last

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        x, gate_r, gate_i, log_a, reset, h0, h = ctx.saved_tensors
        B, T, D = x.shape
        dx, dgr, dgi = (empty_float32(B, T, D) for _ in range(3))
        dlog_a = torch.zeros(B, D, dtype=torch.float32)
        inputs = _inputs(x, gate_r, gate_i, log_a, ctx.c, reset, ctx.unscaled)
        dh0 = scan_backward(bwd, inputs, h, h0, grad_h, grad_last, (dx, dgr, dgi, dlog_a))
        return (
            dx.to(x.dtype), dgr.to(gate_r.dtype), dgi.to(gate_i.dtype),
            dlog_a.sum(0).to(log_a.dtype), None, None,
            None if h0 is None else dh0.to(h0.dtype), None,
        )
