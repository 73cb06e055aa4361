"""What the CPU fast paths share: eligibility, the fast-path counter, numba's threads and job
sizes, and the autograd plumbing of the numba recurrences (the linear scan and the RG-LRU).

numba is optional: `available()` is False when it cannot be imported (or when the
environment variable GRIFFINLM_DISABLE_NUMBA=1), and every op then takes its torch path.
This module never imports numba itself; the kernel modules (`<family>/numba.py`, and
`numba_common.jit` with the jitted helpers they share) do, and are imported only once a
kernel runs. Kernels are compiled on first use and cached on disk (cache=True).
"""
from __future__ import annotations

import collections
import ctypes
import functools
import math
import os
from typing import Callable, Sequence

import numpy as np
import torch

from ..buffer_pool import empty_float32

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


def plain_cpu(*tensors: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Not being traced by torch.compile (which fuses the torch composition itself), and every
    tensor (None entries skipped) a plain CPU one of `dtype` (subclasses such as DTensor take
    the torch path)."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == dtype
               for t in tensors if t is not None)


def cpu_fusable(*tensors: torch.Tensor | None) -> bool:
    """Whether a numba kernel may take these tensors (None entries skipped): `plain_cpu` float32
    tensors (checked first: under torch.compile `available` is not even traced), numba available."""
    return plain_cpu(*tensors, dtype=torch.float32) and available()


def threads() -> int:
    """numba's thread count (the kernels take it as an argument: read inside a kernel it would
    stop numba from caching the compiled code). numba is imported here, once a kernel runs."""
    import numba

    return numba.get_num_threads()


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous float32 CPU tensor's memory (no copy). Not `.numpy()`, which
    would make a parameter's storage non-resizable for good (FSDP frees parameters by resizing)."""
    return np.ctypeslib.as_array(ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float)), shape=tuple(t.shape))


def numpy_copy(t: torch.Tensor | None, size: int):
    """A numpy copy of a small (size,) parameter, zeros when absent. A copy because `.numpy()`
    makes a storage non-resizable for good, and FSDP frees parameters by resizing them."""
    return (torch.zeros(size) if t is None else t.detach().clone()).numpy()


def chunk_size(B: int, D: int) -> int:
    """Channels per job: whole rows when the batch alone fills the cores (longest contiguous
    streams, measured fastest), else split rows so that B * chunks is a multiple of the cores."""
    n = threads()
    chunks = n // math.gcd(B, n)
    chunks = max(1, min(chunks, D // _MIN_CHUNK))
    return -(-D // chunks)


def as_f32(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous float32 tensor (itself when it already is one)."""
    return t.to(torch.float32).contiguous()


# --- autograd plumbing of a numba recurrence over (B, T, D) -----------------------------------
# The kernels split (batch, channel-chunk) jobs (`jit.channel_job`) and walk time, reading the
# initial state h0 (B, D) and writing every state h (B, T, D) and the last one (B, D), float32.
# Their arguments end alike, after the op's own inputs:
#   forward:  (*inputs, h0, has_h0, h, h_last, chunk)
#   backward: (*inputs, h0, has_h0, h, g, has_g, g_last, *grads, dh0, chunk)
# An absent h0 or g goes as a dummy array with its flag False.


def scan_forward(kernel: Callable, inputs: Sequence, shape: tuple[int, int, int],
                 h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a forward kernel: returns h (B, T, D) and h_last (B, D), float32. With T == 0 the
    kernel is not called and h_last is h0 (zeros without one)."""
    B, T, D = shape
    h = empty_float32(B, T, D)
    h_last = torch.empty(B, D, dtype=torch.float32)
    if T == 0:
        h_last.copy_(h0 if h0 is not None else torch.zeros(B, D))
    else:
        h0_32 = as_f32(h0) if h0 is not None else h_last  # dummy when absent
        kernel(*inputs, h0_32.numpy(), h0 is not None, h.numpy(), h_last.numpy(), chunk_size(B, D))
    return h, h_last


def scan_backward(kernel: Callable, inputs: Sequence, h: torch.Tensor, h0: torch.Tensor | None,
                  grad_h: torch.Tensor | None, grad_last: torch.Tensor | None,
                  grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Run a backward kernel from the upstream gradients of h and h_last (None: zero), filling
    `grads` (float32 tensors the caller allocated, passed on as numpy arrays); returns dh0 (B, D)
    float32, the gradient of the initial state (g_last itself when T == 0, no kernel call)."""
    B, T, D = h.shape
    g_last = as_f32(grad_last) if grad_last is not None else torch.zeros(B, D)
    g = as_f32(grad_h) if grad_h is not None else torch.zeros(1, 1, 1)  # dummy when absent
    h0_32 = as_f32(h0) if h0 is not None else g_last
    dh0 = g_last.clone()
    if T > 0:
        kernel(*inputs, h0_32.numpy(), h0 is not None, h.numpy(), g.numpy(), grad_h is not None, g_last.numpy(),
               *(t.numpy() for t in grads), dh0.numpy(), chunk_size(B, D))
    return dh0
