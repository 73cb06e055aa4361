"""Causal depthwise Conv1D (ops/conv): numba kernels and the torch paths against a
float64 loop over every (token, lag), with document limits, carried state and all gradients."""
import sys

import pytest
import torch

from griffinlm.ops import causal_conv1d, causal_conv1d_reference
from griffinlm.ops.conv import fusable
from harness import check_against_reference, needs_numba, run_in_triton_interpreter


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


# --- Triton kernels (CUDA; on CPU through TRITON_INTERPRET=1) and the fp32-accumulating lag loop ---

# (B, T, C, W, packed, with_state, bias): odd sizes, T and C not multiples of the tiles (the
# interpreter's are 8 x 16), W = 1, documents that began in the state.
TRITON_CASES = [(1, 1, 3, 4, False, False, True), (2, 19, 20, 4, True, True, True), (3, 37, 16, 4, True, False, False),
                (2, 9, 33, 5, False, True, True), (1, 12, 7, 1, True, False, True), (2, 17, 5, 2, False, False, False)]


def run_triton_checks(device: str) -> None:
    """Every case of TRITON_CASES through impl='triton' against the float64 loop: output and
    the gradients of x, weight, bias; then bf16 input, non-contiguous x, (T,) lags."""
    from griffinlm.ops import numba_common

    for B, T, C, W, packed, with_state, bias in TRITON_CASES:
        x, w, b = inputs(B, T, C, W, bias, seed=T)
        lags = packed_lags(B, T, seed=T) if packed else None
        if lags is not None and with_state:
            lags = lags + 2 * (torch.arange(T) == lags)
        state = torch.randn(B, W - 1, C) if with_state else None
        dev = [None if t is None else t.to(device) for t in (x, w, b, lags, state)]
        before = numba_common.FUSED_CALLS["causal_conv1d_triton"]
        ins = [None if t is None else t.detach().clone().requires_grad_() for t in dev[:3]]
        y = causal_conv1d(*ins, dev[3], dev[4], impl="triton")
        assert numba_common.FUSED_CALLS["causal_conv1d_triton"] == before + 1
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
        got = torch.autograd.grad(y, [t for t in ins if t is not None], g)
        ins64 = [None if t is None else t.detach().double().cpu().requires_grad_() for t in dev[:3]]
        ref = naive(*ins64, lags, None if state is None else state.double())
        want = torch.autograd.grad(ref, [t for t in ins64 if t is not None], g.double().cpu())
        case = (B, T, C, W, packed, with_state, bias)
        torch.testing.assert_close(y.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} y: {m}")
        for name, a, r in zip(("dx", "dweight", "dbias"), got, want):
            torch.testing.assert_close(a.double().cpu(), r, rtol=1e-4, atol=1e-4, msg=lambda m: f"{case} {name}: {m}")
    # bf16 in (fp32 accumulation, bf16 out), x a non-contiguous view, lags given as (T,)
    x, w, b = inputs(2, 21, 24, 4, True, seed=3)
    xt = x.to(device).bfloat16().transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, C) view, batch stride 24
    lags = packed_lags(1, 21, seed=3)[0]
    y = causal_conv1d(xt, w.to(device), b.to(device), lags.to(device), impl="triton")
    assert y.dtype == torch.bfloat16 and y.is_contiguous()
    ref = causal_conv1d_reference(xt.double().cpu(), w.double(), b.double(), lags)
    torch.testing.assert_close(y.double().cpu(), ref, rtol=1e-2, atol=1e-2)


def run_overflow_checks(device: str) -> None:
    """impl='triton' with x, the carried state and the upstream gradient as views whose element
    offsets pass 2^31 through the batch, time and channel terms (`test_scan_triton.huge_view`:
    virtual mappings, only the touched pages committed), packed documents: the output and the
    gradients of x, weight and bias equal the float64 loop's (an int32 offset would wrap)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_scan_triton import HUGE_SHAPE, HUGE_STRIDES, huge_view

    B, T, C = HUGE_SHAPE
    W = 4
    for strides in HUGE_STRIDES:
        x, w, b = inputs(B, T, C, W, True, seed=5)
        lags = packed_lags(B, T, seed=5)
        lags = lags + 2 * (torch.arange(T) == lags)  # the first document began in the state
        gen = torch.Generator().manual_seed(6)
        state, g = torch.randn(B, W - 1, C, generator=gen), torch.randn(B, T, C, generator=gen)
        xv = huge_view(x, strides).requires_grad_()
        sv = huge_view(state, (strides[0], C, 1))  # its batch term passes 2^31
        gv = huge_view(g, strides)
        wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = causal_conv1d(xv, wl, bl, lags, sv, impl="triton")
        got = torch.autograd.grad(y, (xv, wl, bl), gv)
        ins64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
        ref = naive(*ins64, lags, state.double())
        want = torch.autograd.grad(ref, ins64, g.double())
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{strides} y: {m}")
        for name, a, r in zip(("dx", "dweight", "dbias"), got, want):
            torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4, msg=lambda m: f"{strides} {name}: {m}")


@pytest.mark.skipif(sys.platform != "linux", reason="MAP_NORESERVE mappings are Linux-only here")
def test_triton_conv_offsets_past_2_31_interpreter():
    run_in_triton_interpreter("test_conv", "run_overflow_checks", timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
def test_triton_conv_interpreter_on_cpu():
    run_in_triton_interpreter("test_conv", "run_triton_checks")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_conv_on_gpu_and_dispatch():
    run_triton_checks("cuda")
    from griffinlm.ops.conv import default_impl

    x, w, b = (t.cuda() for t in inputs(2, 300, 96, 4, True))
    assert default_impl(x, w, b, None) == "triton"
    torch.testing.assert_close(causal_conv1d(x, w, b), causal_conv1d_reference(x.double(), w.double(), b.double()).float())


def test_triton_requested_without_triton_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "griffinlm.ops.conv.triton", None)  # import fails as if missing
    x, w, b = inputs(1, 5, 4, 4, True)
    with pytest.raises(RuntimeError, match="need the Triton kernels"):
        causal_conv1d(x, w, b, impl="triton")
    with pytest.raises(ValueError, match="unknown impl"):
        causal_conv1d(x, w, b, impl="cuda")
    with pytest.raises(ValueError, match="state \\(B, W-1, C\\)"):
        causal_conv1d(x, w, b, None, torch.zeros(1, 2, 4))


def test_lag_loop_accumulates_in_fp32_for_bf16_inputs():
    """The packed torch path (the lag loop) on bf16 inputs sums in fp32 and rounds once: closer
    to the float64 result than the same loop summing in bf16."""
    B, T, C, W = 2, 256, 64, 4
    torch.manual_seed(0)
    x = torch.randn(B, T, C).bfloat16()
    w = torch.randn(W, C).bfloat16()
    b = torch.randn(C).bfloat16()
    lags = packed_lags(B, T, seed=5)
    exact = causal_conv1d_reference(x.double(), w.double(), b.double(), lags)
    got = causal_conv1d(x, w, b, lags)  # bf16 on CPU: the lag loop
    assert got.dtype == torch.bfloat16

    def bf16_loop():  # the same loop with a bf16 running sum
        xp = torch.cat([x.new_zeros(B, W - 1, C), x], dim=1)
        y = x * w[W - 1]
        for j in range(1, W):
            y = y + xp[:, W - 1 - j: W - 1 - j + T] * (lags >= j)[..., None].bfloat16() * w[W - 1 - j]
        return y + b

    err_fp32 = (got.double() - exact).abs().mean().item()
    err_bf16 = (bf16_loop().double() - exact).abs().mean().item()
    assert err_fp32 < 0.75 * err_bf16, (err_fp32, err_bf16)
