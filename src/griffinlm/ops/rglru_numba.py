"""Fused RG-LRU on CPU (numba): gates, log-space decay, sqrt(1 - a^2) and the scan in one pass.

Per element (see `rglru.rglru_gates` for the reference composition it must equal):

    r = sigmoid(gate_r), i = sigmoid(gate_i), log a_t = c r log_a, a_t = exp(log a_t)
    m = sqrt(1 - a_t^2) = sqrt(-expm1(2 log a_t))     (m = 1 at an unscaled reset)
    h_t = a_t h_{t-1} + m i x_t                        (a_t = 0 at a reset)

The unfused composition makes about a dozen full passes over (B, T, D) tensors and saves
as many for backward; here forward reads gate_r, gate_i, x once and writes h, and
backward recomputes the gates from them. exp is a Cody-Waite + polynomial written in
arithmetic numba can vectorise (numba has no vector libm unless Intel SVML is installed).
The derivative of sqrt is clipped to MAX_SQRT_GRADIENT as in `sqrt_bounded_grad`.
"""
from __future__ import annotations

import torch

from . import scan_numba
from .buffer_pool import empty_float32

MAX_SQRT_GRADIENT = 1000.0


# numba is imported here, at module level, so that cache=True works (closures over other
# jitted functions are not cached); this module is only imported once numba is known to exist.
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

# No 'reassoc': it would fold the two-part ln 2 of the range reduction back together.
fm = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}
f32 = np.float32


@njit(fastmath=fm, inline="always")
def exp32(x):
    x = min(max(x, f32(-87.0)), f32(88.0))
    n = np.floor(x * f32(1.44269504) + f32(0.5))
    r = x - n * f32(0.693359375) - n * f32(-2.12194440e-4)
    p = f32(1.9875691500e-4)
    p = p * r + f32(1.3981999507e-3)
    p = p * r + f32(8.3334519073e-3)
    p = p * r + f32(4.1665795894e-2)
    p = p * r + f32(1.6666665459e-1)
    p = p * r + f32(5.0000001201e-1)
    p = p * r * r + r + f32(1.0)
    return p * np.int32((np.int32(n) + 127) << 23).view(np.float32)


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
        b = job // n_chunks
        d0 = (job % n_chunks) * chunk
        d1 = min(d0 + chunk, D)
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
        b = job // n_chunks
        d0 = (job % n_chunks) * chunk
        d1 = min(d0 + chunk, D)
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
            if t > 0:
                hp = h[b, t - 1, d0:d1]
            elif has_h0:
                hp = h0[b, d0:d1]
            else:
                hp = zeros
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



def kernels():
    """The fused forward and backward kernels (compiled on first call, then cached on disk)."""
    return fwd, bwd


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


class RGLRUNumba(torch.autograd.Function):
    """Fused RG-LRU over (B, T, D) CPU tensors; gradients to x, gate_r, gate_i, log_a, h0."""

    @staticmethod
    def forward(ctx, x, gate_r, gate_i, log_a, c, reset, h0, unscaled_reset):
        fwd, _ = kernels()
        B, T, D = x.shape
        h = empty_float32(B, T, D)
        h_last = torch.empty(B, D, dtype=torch.float32)
        reset_np = (reset.contiguous() if reset is not None else torch.zeros(1, 1, dtype=torch.bool)).numpy()
        h0_32 = _f32(h0) if h0 is not None else h_last
        if T == 0:
            h_last.copy_(h0_32 if h0 is not None else torch.zeros(B, D))
        else:
            fwd(_f32(x).numpy(), _f32(gate_r).numpy(), _f32(gate_i).numpy(), _f32(log_a).numpy(), float(c),
                reset_np, reset is not None, bool(unscaled_reset), h0_32.numpy(), h0 is not None,
                h.numpy(), h_last.numpy(), scan_numba.chunk_size(B, D))
        ctx.save_for_backward(x, gate_r, gate_i, log_a, reset, h0, h)
        ctx.c, ctx.unscaled = float(c), bool(unscaled_reset)
        return h, h_last

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        _, bwd = kernels()
        x, gate_r, gate_i, log_a, reset, h0, h = ctx.saved_tensors
        B, T, D = x.shape
        g_last = _f32(grad_last) if grad_last is not None else torch.zeros(B, D)
        g = _f32(grad_h) if grad_h is not None else torch.zeros(1, 1, 1)
        reset_np = (reset.contiguous() if reset is not None else torch.zeros(1, 1, dtype=torch.bool)).numpy()
        h0_32 = _f32(h0) if h0 is not None else g_last
        dx, dgr, dgi = (empty_float32(B, T, D) for _ in range(3))
        dlog_a = torch.zeros(B, D, dtype=torch.float32)
        dh0 = g_last.clone()
        if T > 0:
            bwd(_f32(x).numpy(), _f32(gate_r).numpy(), _f32(gate_i).numpy(), _f32(log_a).numpy(), ctx.c,
                reset_np, reset is not None, ctx.unscaled, h0_32.numpy(), h0 is not None, h.numpy(),
                g.numpy(), grad_h is not None, g_last.numpy(), dx.numpy(), dgr.numpy(), dgi.numpy(),
                dlog_a.numpy(), dh0.numpy(), scan_numba.chunk_size(B, D))
        return (
            dx.to(x.dtype), dgr.to(gate_r.dtype), dgi.to(gate_i.dtype),
            dlog_a.sum(0).to(log_a.dtype), None, None,
            None if h0 is None else dh0.to(h0.dtype), None,
        )
