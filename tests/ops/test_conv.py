"""Causal depthwise Conv1D (ops/conv): numba kernels and the torch paths against a
float64 loop over every (token, lag), with document limits, carried state and all gradients."""
import pytest
import torch

from griffinlm.ops import causal_conv1d, causal_conv1d_reference
from griffinlm.ops.conv import fusable
from harness import check_against_reference, needs_numba


def naive(x, w, b, lags, state):
    """y[b, t] = bias + sum over visible lags j of w[W-1-j] * x[b, t-j], one scalar row at a time."""
    B, T, C = x.shape
    W = w.shape[0]
    rows = []
    for bi in range(B):
        for t in range(T):
            acc = b.clone() if b is not None else torch.zeros(C, dtype=x.dtype)
            for j in range(W):
                if lags is not None and j > int(lags[bi, t]):
                    break
                s = t - j
                if s >= 0:
                    acc = acc + w[W - 1 - j] * x[bi, s]
                elif state is not None:
                    acc = acc + w[W - 1 - j] * state[bi, W - 1 + s]
            rows.append(acc)
    return torch.stack(rows).view(B, T, C)


def packed_lags(B, T, seed):
    """(B, T) position of each token in its document, documents of random lengths."""
    g = torch.Generator().manual_seed(seed)
    lags = torch.empty(B, T, dtype=torch.long)
    for bi in range(B):
        pos = 0
        for t in range(T):
            if t > 0 and torch.rand(1, generator=g).item() < 0.2:
                pos = 0
            lags[bi, t] = pos
            pos += 1
    return lags


def inputs(B, T, C, W, bias, seed=0):
    torch.manual_seed(seed)
    x, w = torch.randn(B, T, C), torch.randn(W, C)
    return x, w, (torch.randn(C) if bias else None)


@needs_numba
@pytest.mark.parametrize("B,T,C,W", [(1, 1, 3, 4), (2, 3, 5, 4), (3, 37, 24, 4), (2, 130, 16, 5),
                                     (1, 9, 8, 1), (2, 70, 7, 2)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_conv_matches_float64_loop(B, T, C, W, packed, with_state, bias):
    x, w, b = inputs(B, T, C, W, bias)
    lags = packed_lags(B, T, seed=T) if packed else None
    if lags is not None and with_state:
        lags = lags + 2 * (torch.arange(T) == lags)  # documents that began in the state
    state = torch.randn(B, W - 1, C) if with_state else None
    assert fusable(x, w, b, state)
    state64 = None if state is None else state.double()
    check_against_reference("causal_conv1d", lambda *t: causal_conv1d(*t, lags, state),
                            lambda *t: naive(*t, lags, state64), [x, w, b], grad_names=("dx", "dweight", "dbias"))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_paths_match_float64_loop(packed, with_state):
    """Off the numba path (float64 here): conv1d when nothing is masked, else the lag loop; both equal the loop."""
    B, T, C, W = 2, 23, 6, 4
    x, w, b = (t.double() for t in inputs(B, T, C, W, True))
    lags = packed_lags(B, T, seed=1) if packed else None
    state = torch.randn(B, W - 1, C, dtype=torch.float64) if with_state else None
    assert not fusable(x, w, b, state)
    ref = naive(x, w, b, lags, state)
    torch.testing.assert_close(causal_conv1d(x, w, b, lags, state), ref)
    torch.testing.assert_close(causal_conv1d_reference(x, w, b, lags, state), ref)


@needs_numba
def test_fused_conv_equals_torch_conv1d_and_is_causal():
    x, w, b = inputs(2, 300, 32, 4, True)
    y = causal_conv1d(x, w, b)
    torch.testing.assert_close(y, causal_conv1d(x.double(), w.double(), b.double()).float(), rtol=1e-5, atol=1e-5)
    x2 = x.clone()
    x2[:, 150:] += 1.0
    torch.testing.assert_close(causal_conv1d(x2, w, b)[:, :150], y[:, :150], rtol=0, atol=0)


def test_conv_falls_back_and_rejects_bad_shapes():
    x, w, b = inputs(1, 5, 4, 4, True)
    state = torch.randn(1, 3, 4, requires_grad=True)
    assert not fusable(x, w, b, state)  # a gradient for the state: the differentiable torch path
    y = causal_conv1d(x, w, b, None, state)
    (gs,) = torch.autograd.grad(y.sum(), state)
    assert gs.abs().sum() > 0
    assert not fusable(x.bfloat16(), w, b, None)
    with pytest.raises(ValueError, match="weight \\(W, C\\)"):
        causal_conv1d(x, torch.randn(4, 5))


@needs_numba
def test_fused_conv_leaves_parameters_resizable_and_accepts_non_contiguous_input():
    w = torch.nn.Parameter(torch.randn(4, 8))
    b = torch.nn.Parameter(torch.randn(8))
    x = torch.randn(2, 8, 11).transpose(1, 2)  # (B, T, C) view, not contiguous
    y = causal_conv1d(x, w, b)
    y.sum().backward()
    torch.testing.assert_close(y, causal_conv1d_reference(x, w, b))
    for p in (w, b):  # FSDP frees parameters by resizing their storage
        p.untyped_storage().resize_(0)
