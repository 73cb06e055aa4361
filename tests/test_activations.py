"""Activations and the GLU family against their formulas, computed by hand from the weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from griffinlm.layers import MLP, GatedMLP, Swish, make_activation, swish


def test_swish_formula_and_limits():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    for beta in (0.0, 0.5, 1.0, 2.0):
        expected = x / (1 + torch.exp(-beta * x))
        torch.testing.assert_close(swish(x, beta), expected)
    torch.testing.assert_close(swish(x, 1.0), F.silu(x))
    torch.testing.assert_close(swish(x, 0.0), x / 2)
    torch.testing.assert_close(swish(x, 200.0), torch.relu(x), atol=1e-3, rtol=0)
    # non-monotonic bump below zero: minimum of x*sigmoid(x) near x = -1.278
    assert swish(torch.tensor(-1.278), 1.0) < swish(torch.tensor(-3.0), 1.0)


def test_swish_module_fixed_and_learnable():
    x = torch.randn(4, 7)
    fixed = Swish(1.5)
    assert not list(fixed.parameters())
    torch.testing.assert_close(fixed(x), x * torch.sigmoid(1.5 * x))
    learn = Swish(1.0, learnable=True)
    (p,) = list(learn.parameters())
    learn(x).sum().backward()
    assert p.grad is not None and p.grad.abs() > 0
    torch.testing.assert_close(Swish(1.0)(x), F.silu(x))


ACTS = {
    "glu": torch.sigmoid,
    "bilinear": lambda z: z,
    "reglu": torch.relu,
    "geglu": lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "swiglu": lambda z: z * torch.sigmoid(z),
}


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_equals_hand_formula(name, bias):
    mlp = GatedMLP(8, 12, name, bias=bias).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    W, V, W2 = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    gate, up = x @ W.T, x @ V.T
    if bias:
        gate, up = gate + mlp.gate_proj.bias, up + mlp.up_proj.bias
    expected = (ACTS[name](gate) * up) @ W2.T
    if bias:
        expected = expected + mlp.down_proj.bias
    torch.testing.assert_close(mlp(x), expected)


def test_glu_with_bias_is_seed_formula():
    # GLU(x, W, V, b, c) = sigmoid(xW + b) * (xV + c)
    mlp = GatedMLP(4, 6, "glu", bias=True).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    glu = torch.sigmoid(x @ mlp.gate_proj.weight.T + mlp.gate_proj.bias) * (x @ mlp.up_proj.weight.T + mlp.up_proj.bias)
    torch.testing.assert_close(mlp.down_proj(glu), mlp(x))


@pytest.mark.parametrize("name,fn", [("relu", torch.relu), ("gelu", lambda z: F.gelu(z, approximate="tanh")),
                                     ("swish", F.silu)])
def test_plain_mlp(name, fn):
    mlp = MLP(8, 16, name).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), fn(x @ mlp.up_proj.weight.T) @ mlp.down_proj.weight.T)


def test_bad_activation_names():
    with pytest.raises(ValueError, match="GatedMLP activation"):
        GatedMLP(4, 4, "relu")
    with pytest.raises(ValueError, match="MLP activation"):
        MLP(4, 4, "swiglu")
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("tanhh")
