"""Triton linear scan: on a GPU when present, else on CPU through TRITON_INTERPRET=1.

The interpreter must be switched on before triton is imported, so on a machine without a
GPU the checks run in a subprocess; they skip cleanly when triton is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_scan_triton as m; m.run_checks('cpu')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr and "triton" in proc.stderr:
        pytest.skip("triton interpreter unavailable")
    assert proc.returncode == 0, proc.stderr[-4000:]
