"""CPU linear scan compiled with numba: sequential over time, vectorised over channels.

    forward:   h_t = a_t * h_{t-1} + x_t
    backward:  dh_t = g_t + a_{t+1} dh_{t+1},  dx_t = dh_t,  da_t = dh_t * h_{t-1}

Work is split into (batch, channel-chunk) jobs run on all cores by `numba.prange`; each job
walks time with its state in a small L1-resident buffer, so every element of a, x and h
crosses memory once. The reference is `scan_reference.linear_scan_reference`.

numba is optional: `available()` is False when it cannot be imported (or when the
environment variable GRIFFINLM_DISABLE_NUMBA=1), and `linear_scan` then uses the
pure-torch Function. Kernels are compiled on first use and cached on disk (cache=True).
"""
from __future__ import annotations

import collections
import functools
import os

import torch

from .buffer_pool import empty_float32

# Calls of each fast path by op name (numba kernels, per-block gate matmuls, Triton), so that a
# test of a fast path can assert that it ran rather than compare the fallback with itself.
FUSED_CALLS: collections.Counter[str] = collections.Counter()

# Minimum channels per job: below this the per-step loops are too short to vectorise well.
_MIN_CHUNK = 128


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when numba can be imported (and is not disabled by GRIFFINLM_DISABLE_NUMBA=1)."""
    if os.environ.get("GRIFFINLM_DISABLE_NUMBA", "0") == "1":
        return False
    try:
        import numba  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. numpy/llvmlite mismatch)
        return False
    return True


def cpu_fusable(*tensors: torch.Tensor | None) -> bool:
    """Whether a numba kernel may take these tensors (None entries skipped): numba available,
    not being traced by torch.compile (which fuses the torch composition itself), and every
    tensor a plain float32 CPU one (subclasses such as DTensor take the torch path)."""
    if torch.compiler.is_compiling() or not available():
        return False
    present = [t for t in tensors if t is not None]
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
               and t.dtype == torch.float32 for t in present)


def threads() -> int:
    """numba's thread count (the kernels take it as an argument: read inside a kernel it would
    stop numba from caching the compiled code). numba is imported here, once a kernel runs."""
    import numba

    return numba.get_num_threads()


def numpy_copy(t: torch.Tensor | None, size: int):
    """A numpy copy of a small (size,) parameter, zeros when absent. A copy because `.numpy()`
    makes a storage non-resizable for good, and FSDP frees parameters by resizing them."""
    return (torch.zeros(size) if t is None else t.detach().clone()).numpy()


def chunk_size(B: int, D: int) -> int:
    """Channels per job: whole rows when the batch alone fills the cores (longest contiguous
    streams, measured fastest), else split rows so that B * chunks is a multiple of the cores."""
    import math

    n = threads()
    chunks = n // math.gcd(B, n)
    chunks = max(1, min(chunks, D // _MIN_CHUNK))
    return -(-D // chunks)


@functools.lru_cache(maxsize=None)
def kernels():
    """Compile (or load from cache) the forward and backward kernels. Returns (fwd, bwd)."""
    import numpy as np
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=True, boundscheck=False)
    def scan_fwd(a, x, h0, has_h0, h, h_last, chunk):
        """a, x, h: (B, T, D) float32 contiguous; h0, h_last: (B, D)."""
        B, T, D = x.shape
        n_chunks = (D + chunk - 1) // chunk
        for job in prange(B * n_chunks):
            b = job // n_chunks
            d0 = (job % n_chunks) * chunk
            d1 = min(d0 + chunk, D)
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
    def scan_bwd(a, h, h0, has_h0, g, has_g, g_last, da, dx, dh0, chunk):
        """Reverse scan. a, h, g, da, dx: (B, T, D) float32; h0, g_last, dh0: (B, D)."""
        B, T, D = h.shape
        n_chunks = (D + chunk - 1) // chunk
        for job in prange(B * n_chunks):
            b = job // n_chunks
            d0 = (job % n_chunks) * chunk
            d1 = min(d0 + chunk, D)
            n = d1 - d0
            carry = np.empty(n, dtype=np.float32)
            carry[:] = g_last[b, d0:d1]
            zeros = np.zeros(n, dtype=np.float32)
            for t in range(T - 1, -1, -1):
                at = a[b, t, d0:d1]
                dxt = dx[b, t, d0:d1]
                dat = da[b, t, d0:d1]
                if t > 0:
                    hp = h[b, t - 1, d0:d1]
                elif has_h0:
                    hp = h0[b, d0:d1]
                else:
                    hp = zeros
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

    return scan_fwd, scan_bwd


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


class LinearScanNumba(torch.autograd.Function):
    """linear_scan on CPU float tensors through the numba kernels (fp32 accumulation)."""

    @staticmethod
    def forward(ctx, a, x, h0):
        fwd, _ = kernels()
        B, T, D = x.shape
        a32, x32 = _f32(a), _f32(x)
        h = empty_float32(B, T, D)
        h_last = torch.empty(B, D, dtype=torch.float32)
        h0_32 = _f32(h0) if h0 is not None else h_last  # dummy when absent
        if T == 0:
            h_last.copy_(h0_32 if h0 is not None else torch.zeros(B, D))
        else:
            fwd(a32.numpy(), x32.numpy(), h0_32.numpy(), h0 is not None, h.numpy(), h_last.numpy(),
                chunk_size(B, D))
        ctx.save_for_backward(a, h, h0)
        ctx.x_dtype = x.dtype
        return h, h_last

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        _, bwd = kernels()
        a, h, h0 = ctx.saved_tensors
        B, T, D = h.shape
        a32 = _f32(a)
        g_last = _f32(grad_last) if grad_last is not None else torch.zeros(B, D)
        g = _f32(grad_h) if grad_h is not None else torch.zeros(1, 1, 1)  # dummy when absent
        h0_32 = _f32(h0) if h0 is not None else g_last
        da = empty_float32(B, T, D)
        dx = empty_float32(B, T, D)
        dh0 = torch.empty(B, D, dtype=torch.float32)
        if T == 0:
            dh0.copy_(g_last)
        else:
            bwd(a32.numpy(), h.numpy(), h0_32.numpy(), h0 is not None, g.numpy(), grad_h is not None,
                g_last.numpy(), da.numpy(), dx.numpy(), dh0.numpy(), chunk_size(B, D))
        return (
            da.to(a.dtype),
            dx.to(ctx.x_dtype),
            None if h0 is None else dh0.to(h0.dtype),
        )
