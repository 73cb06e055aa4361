"""CPU linear scan compiled with numba: sequential over time, vectorised over channels.

    forward:   h_t = a_t * h_{t-1} + x_t
    backward:  dh_t = g_t + a_{t+1} dh_{t+1},  dx_t = dh_t,  da_t = dh_t * h_{t-1}

Work is split into (batch, channel-chunk) jobs run on all cores by `numba.prange`; each job
walks time with its state in a small L1-resident buffer, so every element of a, x and h
crosses memory once. The reference is `scan.reference.linear_scan_reference`.

This module imports numba: `linear_scan` imports it only once `numba_common.available()`.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ..buffer_pool import empty_float32
from ..numba_common import as_f32, scan_backward, scan_forward
from ..numba_common.jit import channel_job, previous_state


@njit(parallel=True, fastmath=True, cache=True, boundscheck=False)
def fwd(a, x, h0, has_h0, h, h_last, chunk):
    """a, x, h: (B, T, D) float32 contiguous; h0, h_last: (B, D)."""
    B, T, D = x.shape
    n_chunks = (D + chunk - 1) // chunk
    for job in prange(B * n_chunks):
        b, d0, d1 = channel_job(job, n_chunks, chunk, D)
        n = d1 - d0
        state = np.zeros(n, dtype=np.float32)
        if has_h0:
            state[:] = h0[b, d0:d1]
        for t in range(T):
            at = a[b, t, d0:d1]
            xt = x[b, t, d0:d1]
            ht = h[b, t, d0:d1]
            # Two loops, not one: the update alone vectorises; the store then streams.
            for d in range(n):
                state[d] = at[d] * state[d] + xt[d]
            for d in range(n):
                ht[d] = state[d]
        h_last[b, d0:d1] = state


@njit(parallel=True, fastmath=True, cache=True, boundscheck=False)
def bwd(a, h0, has_h0, h, g, has_g, g_last, da, dx, dh0, chunk):
    """Reverse scan. a, h, g, da, dx: (B, T, D) float32; h0, g_last, dh0: (B, D)."""
    B, T, D = h.shape
    n_chunks = (D + chunk - 1) // chunk
    for job in prange(B * n_chunks):
        b, d0, d1 = channel_job(job, n_chunks, chunk, D)
        n = d1 - d0
        carry = np.empty(n, dtype=np.float32)
        carry[:] = g_last[b, d0:d1]
        zeros = np.zeros(n, dtype=np.float32)
        for t in range(T - 1, -1, -1):
            at = a[b, t, d0:d1]
            dxt = dx[b, t, d0:d1]
            dat = da[b, t, d0:d1]
            hp = previous_state(h, h0, has_h0, zeros, b, t, d0, d1)
            if has_g:
                gt = g[b, t, d0:d1]
                for d in range(n):
                    c = carry[d] + gt[d]
                    dxt[d] = c
                    dat[d] = c * hp[d]
                    carry[d] = c * at[d]
            else:
                for d in range(n):
                    c = carry[d]
                    dxt[d] = c
                    dat[d] = c * hp[d]
                    carry[d] = c * at[d]
        dh0[b, d0:d1] = carry


class LinearScanNumba(torch.autograd.Function):
    """linear_scan on CPU float tensors through the numba kernels (fp32 accumulation)."""

    @staticmethod
    def forward(ctx, a, x, h0):
        h, h_last = scan_forward(fwd, (as_f32(a).numpy(), as_f32(x).numpy()), x.shape, h0)
        ctx.save_for_backward(a, h, h0)
        ctx.x_dtype = x.dtype
        return h, h_last

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        a, h, h0 = ctx.saved_tensors
        da, dx = (empty_float32(*h.shape) for _ in range(2))
        dh0 = scan_backward(bwd, (as_f32(a).numpy(),), h, h0, grad_h, grad_last, (da, dx))
        return (
            da.to(a.dtype),
            dx.to(ctx.x_dtype),
            None if h0 is None else dh0.to(h0.dtype),
        )
