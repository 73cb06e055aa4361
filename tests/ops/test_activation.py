"""Fused gated activation (ops/activation) against the float64 torch reference."""
import pytest
import torch

from griffinlm.ops import gated_activation, gated_activation_reference
from griffinlm.ops.activation import fusable
from harness import check_against_reference, needs_numba


@needs_numba
@pytest.mark.parametrize("kind", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 5), (3, 33, 96)])
def test_gated_activation_matches_float64(kind, bias, shape):
    torch.manual_seed(0)
    gate, up = 3 * torch.randn(shape), torch.randn(shape)
    ins = [gate, up] + ([torch.randn(shape[-1]), torch.randn(shape[-1])] if bias else [])
    assert fusable(gate, up)

    def call(impl):
        return lambda *t: impl(t[0], t[1], kind, *t[2:])

    check_against_reference("gated_activation", call(gated_activation), call(gated_activation_reference), ins)


def test_gated_activation_formulas():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    one = torch.ones_like(x)
    k = (2 / torch.pi) ** 0.5
    torch.testing.assert_close(gated_activation(x, one, "gelu_tanh"),
                               0.5 * x * (1 + torch.tanh(k * (x + 0.044715 * x**3))))
    torch.testing.assert_close(gated_activation(x, 2 * one, "silu"), 2 * x * torch.sigmoid(x))
    with pytest.raises(ValueError, match="unknown kind"):
        gated_activation(x, one, "relu")


def test_gated_activation_falls_back_outside_float32_cpu():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert not fusable(x, x)
    out = gated_activation(x, x, "silu")
    assert out.dtype == torch.bfloat16


@needs_numba
def test_gated_activation_accepts_non_contiguous_inputs_and_leaves_parameters_resizable():
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(10))
    g, u = torch.randn(10, 12).t(), torch.randn(12, 10)
    torch.testing.assert_close(gated_activation(g, u, "silu", w), gated_activation_reference(g, u, "silu", w))
    w.untyped_storage().resize_(0)  # what FSDP does to an unsharded parameter after use
