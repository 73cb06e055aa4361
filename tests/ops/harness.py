"""What the op tests share: checking a fast path against its reference.

A fast path's test runs it on float32 leaves, asserts that the fast path itself ran (its count
in `numba_common.FUSED_CALLS` moved, so the fallback is never compared with itself), and
compares its output and every input gradient with the reference's on float64 copies of the
same inputs.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
import torch

from griffinlm.ops import numba_common

needs_numba = pytest.mark.skipif(not numba_common.available(), reason="numba not installed")


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A fresh leaf copy of t that requires grad (None stays None)."""
    return None if t is None else t.detach().clone().requires_grad_()


@contextlib.contextmanager
def fast_path(op: str, runs: int = 1) -> Iterator[None]:
    """Assert that the block ran the fast path of `op` exactly `runs` times."""
    before = numba_common.FUSED_CALLS[op]
    yield
    ran = numba_common.FUSED_CALLS[op] - before
    assert ran == runs, f"{op}: the fast path ran {ran} times, expected {runs}"


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: float, name: str = "") -> None:
    """Max error relative to the reference's scale (at least 1: states can grow like T when a = 1)."""
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    assert err <= tol * scale, f"{name}: error {err:.3g} vs scale {scale:.3g}"


def output_and_grads(fn: Callable, inputs: Sequence, seed: int = 0) -> tuple[torch.Tensor, tuple]:
    """fn(*inputs) and its gradients, for a seeded random cotangent, to the inputs that require grad."""
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return out, torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], g)


def check_against_reference(op: str, fast: Callable, reference: Callable, inputs: Sequence,
                            out_tol: float = 1e-5, grad_tol: float = 1e-4,
                            grad_names: Sequence[str] = ()) -> None:
    """`fast` on float32 leaves of `inputs` (None entries passed through) against `reference` on
    float64 leaves of the same values: the fast path of `op` ran once, the outputs agree to
    `out_tol` and every gradient to `grad_tol` (rtol and atol)."""
    ins32 = [leaf(t) for t in inputs]
    ins64 = [None if t is None else leaf(t.double()) for t in ins32]
    with fast_path(op):
        out, g32 = output_and_grads(fast, ins32)
    ref, g64 = output_and_grads(reference, ins64)
    torch.testing.assert_close(out.double(), ref, rtol=out_tol, atol=out_tol)
    assert len(g32) == len(g64) == sum(t is not None for t in inputs)
    for i, (a, b) in enumerate(zip(g32, g64)):
        name = grad_names[i] if i < len(grad_names) else f"grad {i}"
        torch.testing.assert_close(a.double(), b, rtol=grad_tol, atol=grad_tol, msg=lambda m, name=name: f"{name}: {m}")


def run_in_triton_interpreter(module: str, fn: str, timeout: int = 600) -> None:
    """Run `module.fn('cpu')` (a test module of this folder) in a fresh interpreter with
    TRITON_INTERPRET=1 (the variable is read when triton is imported, so not in this process);
    skip without triton, fail with the child's stderr."""
    pytest.importorskip("triton")
    here = str(Path(__file__).resolve().parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import {module} as m; m.{fn}('cpu')"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr and "triton" in proc.stderr:
        pytest.skip("triton interpreter unavailable")
    assert proc.returncode == 0, proc.stderr[-4000:]
