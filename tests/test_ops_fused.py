"""Fused CPU ops (ops/gated_activation.py, ops/rms_norm.py) against float64 references."""
import pytest
import torch

from griffinlm.ops import gated_activation, gated_activation_reference, rms_norm, rms_norm_reference
from griffinlm.ops import scan_numba
from griffinlm.ops.gated_activation import fusable as gated_fusable
from griffinlm.ops.rms_norm import fusable as norm_fusable

needs_numba = pytest.mark.skipif(not scan_numba.available(), reason="numba not installed")


def grads(fn, inputs, seed=0):
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return out, torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], g)


def leaf(t):
    return t.detach().clone().requires_grad_()


@needs_numba
@pytest.mark.parametrize("kind", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 5), (3, 33, 96)])
def test_gated_activation_matches_float64(kind, bias, shape):
    torch.manual_seed(0)
    gate, up = 3 * torch.randn(shape), torch.randn(shape)
    bg, bu = (torch.randn(shape[-1]), torch.randn(shape[-1])) if bias else (None, None)
    ins32 = [leaf(gate), leaf(up)] + ([leaf(bg), leaf(bu)] if bias else [])
    ins64 = [leaf(t.double()) for t in ins32]
    assert gated_fusable(*ins32[:2])

    def call(impl, ins):
        return lambda *t: impl(t[0], t[1], kind, *(t[2:] if bias else ()))

    calls = scan_numba.FUSED_CALLS["gated_activation"]
    out, g32 = grads(call(gated_activation, ins32), ins32)
    assert scan_numba.FUSED_CALLS["gated_activation"] == calls + 1  # the numba op ran
    ref, g64 = grads(call(gated_activation_reference, ins64), ins64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_gated_activation_formulas():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    one = torch.ones_like(x)
    k = (2 / torch.pi) ** 0.5
    torch.testing.assert_close(gated_activation(x, one, "gelu_tanh"),
                               0.5 * x * (1 + torch.tanh(k * (x + 0.044715 * x**3))))
    torch.testing.assert_close(gated_activation(x, 2 * one, "silu"), 2 * x * torch.sigmoid(x))
    with pytest.raises(ValueError, match="unknown kind"):
        gated_activation(x, one, "relu")


def test_fused_ops_fall_back_outside_float32_cpu():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert not gated_fusable(x, x) and not norm_fusable(x, torch.ones(8))
    out = gated_activation(x, x, "silu")
    assert out.dtype == torch.bfloat16
    assert rms_norm(x, torch.ones(8)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not match"):
        rms_norm(torch.randn(2, 8), torch.ones(7))


@needs_numba
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (2, 67, 96), (130, 40)])
def test_rms_norm_matches_float64(unit_offset, shape):
    torch.manual_seed(1)
    x = 2 * torch.randn(shape) + 0.5
    w = 0.3 * torch.randn(shape[-1]) + (0.0 if unit_offset else 1.0)
    ins32 = [leaf(x), leaf(w)]
    ins64 = [leaf(t.double()) for t in ins32]
    assert norm_fusable(*ins32)
    calls = scan_numba.FUSED_CALLS["rms_norm"]
    out, g32 = grads(lambda a, b: rms_norm(a, b, 1e-6, unit_offset), ins32)
    assert scan_numba.FUSED_CALLS["rms_norm"] == calls + 1  # the numba op ran
    ref, g64 = grads(lambda a, b: rms_norm_reference(a, b, 1e-6, unit_offset), ins64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@needs_numba
def test_fused_ops_accept_non_contiguous_inputs_and_leave_parameters_resizable():
    torch.manual_seed(2)
    x = torch.randn(6, 16, 10).transpose(0, 1)  # (16, 6, 10), non-contiguous
    w = torch.nn.Parameter(torch.randn(10))
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w, 1e-6, False))
    g, u = torch.randn(10, 12).t(), torch.randn(12, 10)
    torch.testing.assert_close(gated_activation(g, u, "silu", w), gated_activation_reference(g, u, "silu", w))
    w.untyped_storage().resize_(0)  # what FSDP does to an unsharded parameter after use
