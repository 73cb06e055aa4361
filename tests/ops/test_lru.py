"""Fused RG-LRU kernel against the pure-torch composition (rglru_gates + linear_scan) in float64."""
from __future__ import annotations

import pytest
import torch

from griffinlm.ops import rglru, rglru_step
from harness import assert_close_scaled, fast_path, needs_numba

pytestmark = needs_numba  # the fused kernel


def inputs(B, T, D, reset_p, with_h0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    gr = 3 * torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    gi = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    log_a = -torch.rand(D, generator=gen, dtype=torch.float64) * 0.5
    log_a[0] = -1e-7  # a_t ~ 1: 1 - a^2 ~ 1e-6, the sqrt's derivative hits its clip
    log_a[1] = -20.0  # a_t ~ 0
    reset = torch.rand(B, T, generator=gen) < reset_p if reset_p else None
    if reset is not None:
        reset[:, 0] = True
    h0 = torch.randn(B, D, generator=gen, dtype=torch.float64) if with_h0 else None
    return x, gr, gi, log_a, reset, h0, gen


def run(impl, dtype, x, gr, gi, log_a, reset, h0, unscaled, g, gl):
    leaves = [t.to(dtype).requires_grad_() for t in (x, gr, gi, log_a)]
    h0l = None if h0 is None else h0.to(dtype).requires_grad_()
    with fast_path("rglru", runs=int(impl == "fused")):  # the kernel asked for ran
        h, hl = rglru(*leaves, 8.0, reset, h0l, unscaled, impl=impl)
    assert h.dtype == torch.float32 or dtype == torch.float64
    ((h * g.to(h.dtype)).sum() + (hl * gl.to(hl.dtype)).sum()).backward()
    grads = [t.grad for t in leaves] + ([] if h0l is None else [h0l.grad])
    return [h, hl] + grads, leaves


@pytest.mark.parametrize("T", [1, 2, 7, 64, 1000])
@pytest.mark.parametrize("reset_p,unscaled", [(0.0, False), (0.05, False), (0.05, True)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_fused_matches_composed(T, reset_p, unscaled, with_h0):
    x, gr, gi, log_a, reset, h0, gen = inputs(2, T, 21, reset_p, with_h0, seed=T)
    g = torch.randn(2, T, 21, generator=gen, dtype=torch.float64)
    gl = torch.randn(2, 21, generator=gen, dtype=torch.float64)
    got, _ = run("fused", torch.float32, x, gr, gi, log_a, reset, h0, unscaled, g, gl)
    want, _ = run("composed", torch.float64, x, gr, gi, log_a, reset, h0, unscaled, g, gl)
    tol = 2e-5 * max(1.0, T ** 0.5 / 10)
    assert len(got) == len(want) == 6 + with_h0
    for name, a, b in zip(["h", "h_last", "dx", "dgate_r", "dgate_i", "dlog_a", "dh0"], got, want):
        assert_close_scaled(a, b, tol, name)


def test_fused_bf16_inputs():
    x, gr, gi, log_a, reset, h0, gen = inputs(2, 300, 40, 0.02, True)
    bf = [t.to(torch.bfloat16).double() for t in (x, gr, gi)]
    g = torch.randn(2, 300, 40, generator=gen, dtype=torch.float64)
    gl = torch.zeros(2, 40, dtype=torch.float64)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (x, gr, gi)]
    h, _ = rglru(*leaves, log_a.float(), 8.0, reset, h0.float(), True)
    (h * g.float()).sum().backward()
    want, _ = run("composed", torch.float64, *bf, log_a, reset, h0, True, g, gl)
    assert h.dtype == torch.float32 and all(t.grad.dtype == torch.bfloat16 for t in leaves)
    torch.testing.assert_close(h.double(), want[0], rtol=1e-4, atol=1e-4)
    for t, w in zip(leaves, want[2:5]):
        torch.testing.assert_close(t.grad.double(), w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def test_default_is_fused_on_cpu_and_step_agrees():
    x, gr, gi, log_a, reset, h0, _ = inputs(1, 5, 8, 0.3, True)
    args = [t.float() for t in (x, gr, gi, log_a)]
    h, hl = rglru(*args, 8.0, reset, h0.float(), True)
    state = h0.float()
    for t in range(5):
        state = rglru_step(args[0][:, t], args[1][:, t], args[2][:, t], args[3], state, 8.0, reset[:, t], True)
        torch.testing.assert_close(state, h[:, t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hl, state, rtol=1e-5, atol=1e-6)
