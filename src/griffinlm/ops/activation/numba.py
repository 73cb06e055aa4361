"""numba kernels of `gated_activation` (see there for the formulas): (N, M) float32 arrays,
rows in parallel chunks, (M,) biases (zeros when absent: a branch in the loop stops it from
vectorising, an add of a cached vector costs nothing), the sigmoid through
`numba_common.jit.exp32` (a polynomial LLVM vectorises; numba has no vector libm). `code` is
the kind's code in `ACTIVATIONS`: gelu_tanh, else silu (swish with beta 1)."""
from __future__ import annotations

from numba import njit, prange

from ..numba_common.jit import exp32, f32
from . import ACTIVATIONS

GELU_TANH = ACTIVATIONS["gelu_tanh"]
K2 = f32(2.0 * 0.7978845608028654)  # 2 sqrt(2 / pi)
A = f32(0.044715)
CHUNK_ROWS = 16


@njit(fastmath=True, inline="always")
def _sig_arg(g, code):
    """The argument z of sigmoid(z) in act(g) = g * sigmoid(z), and dz/dg."""
    if code == GELU_TANH:
        return K2 * (g + A * g * g * g), K2 * (f32(1.0) + f32(3.0) * A * g * g)
    return g, f32(1.0)


@njit(fastmath=True, inline="always")
def _point(g, u, bg, bu, r, m, code):
    """(x, v, s, dz/dx) at [r, m]: x = g + bg, v = u + bu, s = sigmoid(z(x))."""
    x = g[r, m] + bg[m]
    z, dz = _sig_arg(x, code)
    return x, u[r, m] + bu[m], f32(1.0) / (f32(1.0) + exp32(-z)), dz


@njit(parallel=True, fastmath=True, cache=True)
def forward(g, u, bg, bu, out, code):
    """out = act(g + bg) * (u + bu)."""
    N, M = g.shape
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(N, (c + 1) * CHUNK_ROWS)):
            for m in range(M):
                x, v, s, _ = _point(g, u, bg, bu, r, m, code)
                out[r, m] = x * v * s


@njit(parallel=True, fastmath=True, cache=True)
def backward(g, u, bg, bu, dh, dg, du, code):
    """du = dh act(x); dg = dh v act'(x), act'(x) = s + x s (1 - s) dz/dx (x = g + bg, v = u + bu)."""
    N, M = g.shape
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(N, (c + 1) * CHUNK_ROWS)):
            for m in range(M):
                x, v, s, dz = _point(g, u, bg, bu, r, m, code)
                du[r, m] = dh[r, m] * x * s
                dg[r, m] = dh[r, m] * v * (s + x * s * (f32(1.0) - s) * dz)
