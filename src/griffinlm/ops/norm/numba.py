"""numba kernels of `rms_norm` (see there for the formulas): rows of a (N, D) float32 array in
parallel chunks of CHUNK_ROWS; the weight gradient is summed per chunk into `partial`
(n_chunks, D), which the caller reduces."""
from __future__ import annotations

import math

from numba import njit, prange

from ..numba_common.jit import f32

CHUNK_ROWS = 64


@njit(fastmath=True, inline="always")
def norm_row(x, r, weight, eps, unit_offset, y):
    """y[r] = RMSNorm of x[r]; returns the inverse RMS. Also the fused decoding step's norm."""
    D = x.shape[1]
    ss = f32(0.0)
    for d in range(D):
        ss += x[r, d] * x[r, d]
    v = f32(1.0) / f32(math.sqrt(ss / D + eps))
    for d in range(D):
        s = weight[d] + f32(1.0) if unit_offset else weight[d]
        y[r, d] = x[r, d] * v * s
    return v


@njit(parallel=True, fastmath=True, cache=True)
def forward(x, weight, eps, unit_offset, y, inv):
    N = x.shape[0]
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(N, (c + 1) * CHUNK_ROWS)):
            inv[r] = norm_row(x, r, weight, eps, unit_offset, y)


@njit(parallel=True, fastmath=True, cache=True)
def backward(x, weight, unit_offset, inv, g, dx, partial):
    N, D = x.shape
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for d in range(D):
            partial[c, d] = 0.0
        for r in range(c * CHUNK_ROWS, min(N, (c + 1) * CHUNK_ROWS)):
            v = inv[r]
            dot = f32(0.0)
            for d in range(D):
                s = weight[d] + f32(1.0) if unit_offset else weight[d]
                dot += g[r, d] * s * x[r, d]
            k = v * v * v * dot / D
            for d in range(D):
                s = weight[d] + f32(1.0) if unit_offset else weight[d]
                dx[r, d] = v * g[r, d] * s - k * x[r, d]
                partial[c, d] += g[r, d] * x[r, d] * v
