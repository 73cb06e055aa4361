"""numba kernels of `lora_linear`'s dropout: a counter-based keep mask (splitmix64 of seed +
element index, so backward regenerates the forward's mask instead of storing it), applied to
(N, K) float32 rows in parallel chunks; torch's CPU `bernoulli_` costs many times more per element
(BENCHMARKS.md, Fine-tuning)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

CHUNK_ROWS = 16


@njit(inline="always")
def _keep(seed, i, threshold):
    """True with probability 1 - p (threshold = p * 2^32) for element i of the mask `seed`."""
    z = seed + uint64(i) * uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB)
    z = z ^ (z >> uint64(31))
    return (z >> uint64(32)) >= threshold


@njit(parallel=True, fastmath=True, cache=True)
def dropout(x, out, seed, threshold, scale):
    """out = x * keep / (1 - p) (scale = 1 / (1 - p))."""
    N, K = x.shape
    s = uint64(seed)
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(N, (c + 1) * CHUNK_ROWS)):
            base = r * K
            for k in range(K):
                out[r, k] = x[r, k] * scale if _keep(s, base + k, threshold) else np.float32(0.0)


@njit(parallel=True, fastmath=True, cache=True)
def add_dropped(dx, t, seed, threshold, scale):
    """dx += t * keep * scale, with the keep mask of `dropout(.., seed, ..)`."""
    N, K = dx.shape
    s = uint64(seed)
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(N, (c + 1) * CHUNK_ROWS)):
            base = r * K
            for k in range(K):
                if _keep(s, base + k, threshold):
                    dx[r, k] += t[r, k] * scale
