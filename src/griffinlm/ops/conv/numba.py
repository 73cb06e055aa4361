"""numba kernels of `causal_conv1d` (see there for the formula): float32, (B, T, C) rows.

Work is split over (row, time chunk) jobs so every job streams whole contiguous rows; the
inner loops run over channels and vectorise. Backward gathers (dx at s sums dy at s + j), so
jobs never write each other's rows, and each job keeps its own partial weight/bias gradient.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

CHUNK = 64  # time steps per job


@njit(inline="always")
def _lags(t, W, lim, has_lim, b):
    """Largest lag visible from (b, t)."""
    return min(W - 1, lim[b, t]) if has_lim else W - 1


@njit(inline="always")
def _input_row(x, state, has_state, b, s, W):
    """(True, x[b, s]); for s < 0 the carried state's row, or (False, any row) without a state."""
    if s >= 0:
        return True, x[b, s]
    if has_state:
        return True, state[b, W - 1 + s]
    return False, x[b, 0]


@njit(parallel=True, fastmath=True, cache=True, boundscheck=False)
def forward(x, state, has_state, w, bias, lim, has_lim, y):
    """y[b, t] = bias + sum_{j <= lags(b, t)} w[W-1-j] * x[b, t-j] (x[b, s < 0] = state[b, W-1+s] or 0)."""
    B, T, C = x.shape
    W = w.shape[0]
    n_chunks = (T + CHUNK - 1) // CHUNK
    for job in prange(B * n_chunks):
        b = job // n_chunks
        t0 = (job % n_chunks) * CHUNK
        for t in range(t0, min(T, t0 + CHUNK)):
            yt = y[b, t]
            xt = x[b, t]
            wl = w[W - 1]
            for c in range(C):
                yt[c] = bias[c] + wl[c] * xt[c]
            for j in range(1, _lags(t, W, lim, has_lim, b) + 1):
                ok, src = _input_row(x, state, has_state, b, t - j, W)
                if not ok:
                    break
                wj = w[W - 1 - j]
                for c in range(C):
                    yt[c] += wj[c] * src[c]


@njit(parallel=True, fastmath=True, cache=True, boundscheck=False)
def backward(x, state, has_state, w, lim, has_lim, dy, dx, dw_part, db_part):
    """dx (B, T, C); dw_part (jobs, W, C) and db_part (jobs, C) per-job partial sums."""
    B, T, C = x.shape
    W = w.shape[0]
    n_chunks = (T + CHUNK - 1) // CHUNK
    for job in prange(B * n_chunks):
        b = job // n_chunks
        t0 = (job % n_chunks) * CHUNK
        dwj = dw_part[job]
        dbj = db_part[job]
        dwj[:] = 0.0
        dbj[:] = 0.0
        for t in range(t0, min(T, t0 + CHUNK)):
            dyt = dy[b, t]
            for c in range(C):
                dbj[c] += dyt[c]
            # weight gradient: dy at t times every input it saw
            for j in range(0, _lags(t, W, lim, has_lim, b) + 1):
                ok, src = _input_row(x, state, has_state, b, t - j, W)
                if not ok:
                    break
                dwr = dwj[W - 1 - j]
                for c in range(C):
                    dwr[c] += dyt[c] * src[c]
            # input gradient at t: the outputs t + j that saw x_t
            dxt = dx[b, t]
            for c in range(C):
                dxt[c] = 0.0
            for j in range(0, min(W, T - t)):
                if j > _lags(t + j, W, lim, has_lim, b):
                    continue
                wj = w[W - 1 - j]
                dyj = dy[b, t + j]
                for c in range(C):
                    dxt[c] += wj[c] * dyj[c]


def num_jobs(B: int, T: int) -> int:
    return B * ((T + CHUNK - 1) // CHUNK)


def empty_partials(B: int, T: int, W: int, C: int) -> tuple[np.ndarray, np.ndarray]:
    n = num_jobs(B, T)
    return np.empty((n, W, C), dtype=np.float32), np.empty((n, C), dtype=np.float32)
