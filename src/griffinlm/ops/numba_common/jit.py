"""Jitted helpers the numba kernels share (inlined into each kernel that calls them).

numba is imported here, at module level, so that the kernels calling these helpers can be
cached (cache=True: closures over other jitted functions are not cached); only kernel
modules import this one, once numba is known to exist (`numba_common.available`).
"""
from __future__ import annotations

import numpy as np
from numba import njit

f32 = np.float32

# Fast-math flags of the kernels that call `exp32`. No 'reassoc': it would fold the two-part
# ln 2 of exp32's range reduction back together.
FASTMATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}
# Those of the kernels whose inner loops are dot products: 'reassoc' lets LLVM split each one
# over several vector accumulators.
DOT_FASTMATH = FASTMATH | {"reassoc"}


@njit(fastmath=FASTMATH, inline="always")
def exp32(x):
    """exp in float32: a Cody-Waite range reduction and a polynomial, in arithmetic numba can
    vectorise (numba has no vector libm unless Intel SVML is installed)."""
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


@njit(inline="always")
def row_chunk(size, parts, c):
    """[lo, hi): chunk c of `parts` near-equal chunks of range(size) (empty past the end)."""
    step = (size + parts - 1) // parts
    lo = min(size, c * step)
    return lo, min(size, lo + step)


@njit(inline="always")
def channel_job(job, n_chunks, chunk, D):
    """(b, d0, d1): the batch row and channels [d0, d1) of job `job` of a recurrence split into
    (batch row, channel chunk) jobs, `n_chunks` chunks of `chunk` channels per row."""
    b = job // n_chunks
    d0 = (job % n_chunks) * chunk
    return b, d0, min(d0 + chunk, D)


@njit(inline="always")
def previous_state(h, h0, has_h0, zeros, b, t, d0, d1):
    """h_{t-1} of row b, channels [d0, d1): the state before step t, which before the first
    step is h0 (`zeros` without one)."""
    if t > 0:
        return h[b, t - 1, d0:d1]
    if has_h0:
        return h0[b, d0:d1]
    return zeros
