"""Reused large CPU output buffers for the numba kernels.

glibc serves allocations above its largest mmap threshold (32 MiB on 64-bit) with a fresh
mmap every time, and the kernel faults them in 4 KiB at a time on first touch: for the scan's
(B, T, D) output at B=4, T=4096, D=1024 (64 MiB) that page-faulting took longer than the scan
itself (BENCHMARKS.md, Kernels). This pool keeps such
buffers after their tensors die and hands them out again, as CUDA's caching allocator does.
Smaller buffers are left to torch (glibc reuses them from its heap without faulting).
PyTorch's own switch THP_MEM_ALLOC_ENABLE=1 was measured and rejected (BENCHMARKS.md, Kernels):
huge-page faults with synchronous compaction made fresh allocations mostly slower.
"""
from __future__ import annotations

import math
import sys
import threading

import numpy as np
import torch

MIN_BYTES = 32 << 20  # below this glibc's heap already reuses memory
MAX_IDLE_BYTES = 1 << 30  # idle buffers kept at most


class BufferPool:
    """float32 CPU buffers of at least MIN_BYTES, reused once no tensor views them any more.

    A buffer is a numpy array; the tensors handed out (and all their views) hold a reference
    to it through their storage, so it is idle exactly when the pool's is the only reference.
    """

    def __init__(self, max_idle_bytes: int = MAX_IDLE_BYTES) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    @staticmethod
    def _idle(arr: np.ndarray) -> bool:
        # references: the pool's list, the caller's loop name, this parameter, getrefcount's argument
        return sys.getrefcount(arr) <= 4

    def empty(self, *shape: int) -> torch.Tensor:
        """An uninitialised float32 tensor of `shape` (contiguous)."""
        n = math.prod(shape)
        if 4 * n < MIN_BYTES:
            return torch.empty(shape, dtype=torch.float32)
        with self._lock:
            found = self._find_idle(n)
            if found is None:
                self._trim()
                found = np.empty(n, dtype=np.float32)
                self._buffers.append(found)
            return torch.from_numpy(found).view(shape)

    def _find_idle(self, n: int) -> np.ndarray | None:
        # A function of its own so that no stray local keeps a buffer referenced afterwards.
        for arr in self._buffers:
            if arr.size == n and self._idle(arr):
                return arr
        return None

    def _trim(self) -> None:
        """Drop idle buffers, oldest first, until at most max_idle_bytes are idle."""
        idle = [a for a in self._buffers if self._idle(a)]
        excess = sum(a.nbytes for a in idle) - self.max_idle_bytes
        for a in idle:
            if excess <= 0:
                break
            self._buffers.remove(a)
            excess -= a.nbytes

    def clear(self) -> None:
        """Forget every buffer (those still in use live on with their tensors)."""
        with self._lock:
            self._buffers.clear()


POOL = BufferPool()


def empty_float32(*shape: int) -> torch.Tensor:
    """`POOL.empty(*shape)`: an uninitialised float32 CPU tensor, reusing a large idle buffer."""
    return POOL.empty(*shape)
