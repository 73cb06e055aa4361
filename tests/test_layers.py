"""Building blocks: scan reference, RG-LRU properties, RMSNorm, RoPE, Conv1D."""
import math

import pytest
import torch

from griffinlm.layers import RGLRU, Conv1D, Positions, RMSNorm, RotaryEmbedding, lambda_init
from griffinlm.ops import linear_scan, linear_scan_reference


def _naive_scan(a, x, h0):
    h = h0.clone()
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + x[:, t]
        out.append(h)
    return torch.stack(out, 1), h


@pytest.mark.parametrize("T", [1, 2, 7, 33])
@pytest.mark.parametrize("with_h0", [False, True])
def test_linear_scan_matches_float64_reference(T, with_h0):
    a = torch.rand(2, T, 5, dtype=torch.float64)
    x = torch.randn(2, T, 5, dtype=torch.float64)
    h0 = torch.randn(2, 5, dtype=torch.float64) if with_h0 else None
    h, last = linear_scan(a, x, h0)
    ref, ref_last = _naive_scan(a, x, h0 if with_h0 else torch.zeros(2, 5, dtype=torch.float64))
    torch.testing.assert_close(h, ref)
    torch.testing.assert_close(last, ref_last)
    r2, l2 = linear_scan_reference(a, x, h0)
    torch.testing.assert_close(r2, ref)
    torch.testing.assert_close(l2, ref_last)


@pytest.mark.parametrize("regime", ["near0", "near1", "uniform"])
def test_linear_scan_gradcheck(regime):
    T = 9
    a = {"near0": torch.rand(2, T, 3) * 1e-3, "near1": 1 - torch.rand(2, T, 3) * 1e-3,
         "uniform": torch.rand(2, T, 3)}[regime].double().requires_grad_()
    x = torch.randn(2, T, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    # use both outputs so the gradient of h_last is checked too
    assert torch.autograd.gradcheck(lambda a, x, h0: sum(o.sum() * w for o, w in zip(linear_scan(a, x, h0), (1.0, 0.5))) + linear_scan(a, x, h0)[0].pow(2).sum(), (a, x, h0))


def test_linear_scan_bad_input():
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        linear_scan(torch.rand(3, 4), torch.rand(3, 4))
    with pytest.raises(ValueError, match="must match"):
        linear_scan(torch.rand(1, 3, 4), torch.rand(1, 3, 5))
    with pytest.raises(ValueError, match="h0"):
        linear_scan(torch.rand(1, 3, 4), torch.rand(1, 3, 4), torch.rand(2, 4))
    with pytest.raises(TypeError, match="floating"):
        linear_scan(torch.ones(1, 3, 4, dtype=torch.long), torch.rand(1, 3, 4))


def test_lambda_inits():
    c = 8.0
    lam = lambda_init(20000, "paper", c=c)
    ac = torch.sigmoid(lam) ** c
    assert 0.9 - 1e-5 <= ac.min() and ac.max() <= 0.999 + 1e-5
    assert abs(ac.mean().item() - (0.9 + 0.999) / 2) < 0.002  # uniform in a^c
    lam = lambda_init(20000, "recurrentgemma")
    a2 = torch.sigmoid(lam) ** 2
    assert 0.81 - 1e-5 <= a2.min() and a2.max() <= 0.998 + 1e-5
    assert abs(a2.mean().item() - (0.81 + 0.998) / 2) < 0.002  # uniform in a^2


def _rglru(D=32, blocks=4, init="paper"):
    return RGLRU(D, blocks, init=init).double()


def test_rglru_decay_in_unit_interval_and_matches_formula():
    lru = _rglru()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    y, last = lru(x)
    # recompute by hand, sequentially
    W_a = torch.block_diag(*lru.gate_r_weight)
    W_x = torch.block_diag(*lru.gate_i_weight)
    r = torch.sigmoid(x @ W_a + lru.gate_r_bias.flatten())
    i = torch.sigmoid(x @ W_x + lru.gate_i_bias.flatten())
    a = torch.sigmoid(lru.lambda_)
    a_t = a ** (8 * r)
    assert (a_t > 0).all() and (a_t < 1).all()
    h = torch.zeros(2, 32, dtype=torch.float64)
    for t in range(11):
        h = a_t[:, t] * h + torch.sqrt(1 - a_t[:, t] ** 2) * (i[:, t] * x[:, t])
        torch.testing.assert_close(y[:, t].double(), h, atol=1e-5, rtol=1e-5)  # state is float32
    torch.testing.assert_close(last.double(), h, atol=1e-5, rtol=1e-5)


def test_rglru_state_bounded_and_variance_preserved():
    lru = RGLRU(64, 4)
    with torch.no_grad():
        lru.lambda_.fill_(6.0)  # a = sigmoid(6); with r = 1/2, a_t = a^4 ~ 0.990
        lru.gate_i_bias.fill_(20.0)  # input gate open: i = 1
        lru.gate_r_weight.zero_()  # r = sigmoid(0) = 1/2
    x = torch.full((1, 5000, 64), 3.0)
    y, _ = lru(x)
    # constant input: a_t is constant per channel and h converges to its fixed point
    # x * sqrt(1 - a^2) / (1 - a), which bounds every h_t
    r = torch.sigmoid(lru.gates(x[:, :1])[0])[0, 0].detach()
    a = torch.sigmoid(torch.tensor(6.0)) ** (8 * r)
    bound = 3.0 * torch.sqrt(1 - a**2) / (1 - a)
    assert torch.isfinite(y).all()
    assert (y[0].abs() <= bound * (1 + 1e-4)).all()
    torch.testing.assert_close(y[0, -1].detach(), bound, rtol=1e-3, atol=0)
    # white-noise input: sqrt(1 - a^2) keeps the stationary variance at the input's when the
    # gates are fixed (here r = 1/2, i = 1), and near it with random, input-dependent gates
    xr = torch.randn(4, 6000, 64)
    y, _ = lru(xr)
    assert 0.9 < y[:, 3000:].var().item() < 1.1
    with torch.no_grad():
        lru.reset_parameters()
        lru.lambda_.fill_(6.0)
        lru.gate_i_bias.fill_(20.0)
    y, _ = lru(xr)
    assert 0.5 < y[:, 3000:].var().item() < 2.0


def test_rglru_fp32_state_under_bf16():
    lru = RGLRU(16, 2).to(torch.bfloat16)
    x = torch.randn(2, 7, 16, dtype=torch.bfloat16)
    y, last = lru(x)
    assert y.dtype == torch.float32 and last.dtype == torch.float32


def test_rmsnorm():
    x = torch.randn(3, 8, dtype=torch.float64)
    n = RMSNorm(8).double()
    with torch.no_grad():
        n.weight.uniform_()
    torch.testing.assert_close(n(x), x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * n.weight)
    n1 = RMSNorm(8, unit_offset=True).double()
    assert (n1.weight == 0).all()
    torch.testing.assert_close(n1(x), x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("pairing", ["split_half", "interleaved"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_relative_and_partial(pairing, fraction):
    rope = RotaryEmbedding(16, fraction, pairing=pairing)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    dots = []
    for shift in (0, 5):
        qp = rope(q, torch.tensor([7 + shift])).double()
        kp = rope(k, torch.tensor([3 + shift])).double()
        dots.append((qp * kp).sum())
    torch.testing.assert_close(dots[0], dots[1], atol=1e-5, rtol=1e-5)  # only the offset matters (RoPE runs in fp32)
    rotated = rope(q, torch.tensor([3]))
    rd = int(16 * fraction)
    torch.testing.assert_close(rotated[..., rd:], q[..., rd:])
    assert torch.allclose(rotated.norm(), q.norm())
    if pairing == "split_half":  # dim 0 pairs with dim rd/2
        theta = 3.0
        e0 = torch.zeros(1, 1, 1, 16, dtype=torch.float64)
        e0[..., 0] = 1
        r = rope(e0, torch.tensor([3]))
        assert math.isclose(r[..., 0].item(), math.cos(theta), abs_tol=1e-6)
        assert math.isclose(r[..., rd // 2].item(), math.sin(theta), abs_tol=1e-6)


def test_conv1d_causal_and_time_major():
    conv = Conv1D(3, 4).double()
    x = torch.randn(1, 10, 3, dtype=torch.float64)
    pos = Positions.build(1, 10, 0, x.device)
    y, _ = conv(x, pos)
    t = 6
    expected = conv.bias + sum(conv.weight[3 - j] * x[0, t - j] for j in range(4))
    torch.testing.assert_close(y[0, t], expected)
    # masked path (documents) equals the fast path on one document
    y2, _ = conv(x, pos, conv.init_state(1, dtype=torch.float64))
    torch.testing.assert_close(y, y2)


@pytest.mark.parametrize("activation", ["geglu", "swiglu", "reglu", "glu"])
def test_gated_mlp_row_chunks_equal_one_pass(monkeypatch, activation):
    """No-grad forwards over many tokens run in row chunks; the result equals the one-pass forward."""
    from griffinlm.layers import activations

    torch.manual_seed(0)
    mlp = activations.GatedMLP(16, 24, activation, bias=True)
    x = torch.randn(3, 250, 16)
    whole = mlp(x)  # grad enabled: one pass
    monkeypatch.setattr(activations, "CHUNK_BYTES", 3 * 24 * 4 * 256)  # 256-row chunks
    assert activations.chunk_rows(x, mlp.gate_proj) is None  # grad mode never chunks
    with torch.no_grad():
        assert activations.chunk_rows(x, mlp.gate_proj) == 256
        torch.testing.assert_close(mlp(x), whole.detach(), rtol=1e-6, atol=1e-6)
        assert activations.chunk_rows(x[:, :100], mlp.gate_proj) is None  # too few rows to split
