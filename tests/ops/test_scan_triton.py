"""Triton linear scan: on a GPU when present, else on CPU through TRITON_INTERPRET=1.

The interpreter must be switched on before triton is imported, so on a machine without a
GPU the checks run in a subprocess; they skip cleanly when triton is missing.

The overflow checks read (B, T, D) views whose element offsets pass 2^31 through the batch term,
the time term and the channel term. Such a view needs an address range of tens of GB, but only
the few pages it touches need memory: `huge_view` maps it MAP_NORESERVE (virtual, never
committed) and writes just the view's elements, so a check costs well under a MB of RAM.
"""
from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch
from harness import run_in_triton_interpreter

triton = pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
# Small shapes: the interpreter runs the scan's combine per element in Python.
CASES = [(1, 16, False, "mixed"), (7, 16, True, "one"), (9, 5, True, "zero"), (37, 20, False, "near1")]


def run_checks(device: str) -> None:
    sys.path.insert(0, str(HERE))
    from test_scan import check, make_a

    for T, D, with_h0, kind in CASES:
        gen = torch.Generator().manual_seed(T)
        a = make_a(kind, 2, T, D, gen)
        x = torch.randn(2, T, D, generator=gen, dtype=torch.float64)
        h0 = torch.randn(2, D, generator=gen, dtype=torch.float64) if with_h0 else None
        check(device, "triton", a, x, h0)
    # bf16 in, non-contiguous strides
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(12, 2, 16, generator=gen, dtype=torch.float64).transpose(0, 1)
    x = torch.randn(2, 12, 16, generator=gen, dtype=torch.float64)
    check(device, "triton", a, x, None, dtype=torch.bfloat16, tol=1e-2)


# --- offsets past 2^31 ----------------------------------------------------------------------
MAP_NORESERVE = 0x4000  # Linux x86-64 and arm64; Python's mmap module does not export it
# The view starts 2^32 elements into its mapping, so an offset that int32 arithmetic wraps
# (k -> k - 2^32) still lands inside the mapping: the bug shows as wrong values, not a crash.
HUGE_OFFSET = 2**32
# (B, T, D) = (3, 12, 16): batch b = 2 sits past 2^31 (2 * (2^30 + 4096)); time steps t >= 8 do
# (8 * 2^28 = 2^31); in the channels-strided layout, channels d >= 8 do.
HUGE_SHAPE = (3, 12, 16)
HUGE_STRIDES = [(2**30 + 4096, 2**28, 1), (2**30 + 4096, 1, 2**28)]


def huge_view(values: torch.Tensor, strides: tuple[int, ...], offset: int = HUGE_OFFSET) -> torch.Tensor:
    """A view with `strides` at element `offset` of a virtual (never committed) mapping, holding
    `values`. Its elements sit at offsets past 2^31; only the touched pages take memory."""
    need = offset + sum((n - 1) * st for n, st in zip(values.shape, strides)) + 1
    buf = mmap.mmap(-1, need * values.element_size(), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    view = torch.frombuffer(buf, dtype=values.dtype).as_strided(values.shape, strides, offset)
    view.copy_(values)
    return view


def run_overflow_checks(device: str) -> None:
    """linear_scan forward and backward on huge strided views of a, x and the upstream gradient
    equal the float64 reference (the old int32 kernels read wrapped offsets: wrong h from
    t = 8 on and for b = 2, wrong h_last and gradients)."""
    sys.path.insert(0, str(HERE))
    from harness import assert_close_scaled as close
    from test_scan import reference_grads

    from griffinlm.ops import linear_scan, linear_scan_reference

    for strides in HUGE_STRIDES:
        gen = torch.Generator().manual_seed(0)
        a64 = torch.rand(HUGE_SHAPE, generator=gen, dtype=torch.float64)
        x64 = torch.randn(HUGE_SHAPE, generator=gen, dtype=torch.float64)
        g64 = torch.randn(HUGE_SHAPE, generator=gen, dtype=torch.float64)
        h064 = torch.randn(HUGE_SHAPE[0], HUGE_SHAPE[2], generator=gen, dtype=torch.float64)
        gl64 = torch.randn(HUGE_SHAPE[0], HUGE_SHAPE[2], generator=gen, dtype=torch.float64)
        a, x, g = (huge_view(t.float(), strides).requires_grad_(t is not g64) for t in (a64, x64, g64))
        h0 = h064.float().requires_grad_()
        h, h_last = linear_scan(a, x, h0, impl="triton")
        da, dx, dh0 = torch.autograd.grad((h, h_last), (a, x, h0), (g, gl64.float()))
        ar, xr, gr, h0r = (t.detach().double() for t in (a, x, g, h0))
        hr, hlr = linear_scan_reference(ar, xr, h0r)
        want = (hr, hlr) + reference_grads(ar, hr, h0r, gr, gl64.float().double())
        for name, got, ref in zip(["h", "h_last", "da", "dx", "dh0"], (h, h_last, da, dx, dh0), want):
            close(got, ref, 1e-5, f"{name} (strides {strides})")


@pytest.mark.skipif(sys.platform != "linux", reason="MAP_NORESERVE mappings are Linux-only here")
def test_triton_scan_offsets_past_2_31_interpreter():
    run_in_triton_interpreter("test_scan_triton", "run_overflow_checks", timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_scan_on_gpu():
    run_checks("cuda")
    from test_scan import check

    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 4097, 300, generator=gen, dtype=torch.float64)
    check("cuda", "triton", a, torch.randn(2, 4097, 300, generator=gen, dtype=torch.float64), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_scan_under_torch_compile():
    from griffinlm.ops.scan.triton import linear_scan_triton

    a = torch.rand(2, 300, 64, device="cuda", requires_grad=True)
    x = torch.randn(2, 300, 64, device="cuda", requires_grad=True)

    def f(a, x):
        h, h_last = linear_scan_triton(a.sigmoid(), 2 * x)
        return h.square().sum() + h_last.sum()

    out = torch.compile(f, fullgraph=True)(a, x)
    out.backward()
    grads = a.grad.clone(), x.grad.clone()
    a.grad = x.grad = None
    torch.testing.assert_close(out, f(a, x))
    f(a, x).backward()
    torch.testing.assert_close(grads, (a.grad, x.grad))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
def test_triton_scan_interpreter_on_cpu():
    run_in_triton_interpreter("test_scan_triton", "run_checks", timeout=300)
