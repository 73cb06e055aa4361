"""numba kernels of `lora_linear`'s dropout: a counter-based keep mask (so backward regenerates the
forward's mask instead of storing it), applied to (N, K) float32 rows in parallel chunks; torch's
CPU `bernoulli_` costs many times more per element (BENCHMARKS.md, Fine-tuning).

Element (r, k) of the mask for `seed` hashes a per-row key (splitmix64 of seed and row, once per
row) with the column through murmur3's 32-bit finaliser of a Weyl sequence. 32-bit lanes: half the
cost of a 64-bit hash per element, and rows keep masks distinct past 2^32 elements."""
from __future__ import annotations

import numpy as np
from numba import njit, prange, uint32, uint64

CHUNK_ROWS = 16


@njit(inline="always")
def _row_key(seed, r):
    """splitmix64 of row r of the mask `seed`, its high 32 bits."""
    z = seed + uint64(r) * uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB)
    return uint32((z ^ (z >> uint64(31))) >> uint64(32))


@njit(inline="always")
def _keep(key, k, threshold):
    """True with probability 1 - p (threshold = p * 2^32) for column k of the row `key`."""
    z = uint32(uint32(k) * uint32(0x9E3779B9) + key)
    z = uint32((z ^ (z >> uint32(16))) * uint32(0x85EBCA6B))
    z = uint32((z ^ (z >> uint32(13))) * uint32(0xC2B2AE35))
    return uint32(z ^ (z >> uint32(16))) >= threshold


@njit(parallel=True, fastmath=True, cache=True)
def dropout(x, out, seed, threshold, scale):
    """out = x * keep / (1 - p) (scale = 1 / (1 - p))."""
    N, K = x.shape
    s, th = uint64(seed), uint32(threshold)
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(N, (c + 1) * CHUNK_ROWS)):
            key = _row_key(s, r)
            for k in range(K):
                out[r, k] = x[r, k] * scale if _keep(key, k, th) else np.float32(0.0)


@njit(parallel=True, fastmath=True, cache=True)
def add_dropped(dx, t, seed, threshold, scale):
    """dx += t * keep * scale, with the keep mask of `dropout(.., seed, ..)`."""
    N, K = dx.shape
    s, th = uint64(seed), uint32(threshold)
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(N, (c + 1) * CHUNK_ROWS)):
            key = _row_key(s, r)
            for k in range(K):
                if _keep(key, k, th):
                    dx[r, k] += t[r, k] * scale
