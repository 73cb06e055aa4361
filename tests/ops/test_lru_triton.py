"""Fused RG-LRU Triton kernels (`lru.triton`) against the float64 composition (rglru_gates +
linear_scan): on a GPU when present, else on CPU through TRITON_INTERPRET=1, at the kernels'
real tile sizes (64 steps x 32 channels), so the checks below cross tile boundaries in time
and in channels.

The interpreter must be switched on before triton is imported, so on a machine without a GPU
the checks run in a subprocess; they skip cleanly when triton is missing.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from griffinlm.ops import linear_scan, numba_common, rglru
from harness import run_in_triton_interpreter

HERE = Path(__file__).resolve().parent
NAMES = ["y", "h_last", "dx", "dgate_r", "dgate_i", "dlog_a", "dh0"]

# (B, T, D, resets, unscaled_reset, with_h0): T = 130 is two full time tiles and a partial one,
# D = 40 a full channel block and a partial one; "mid" resets leave t = 0 without one, so the
# initial state's gradient is not trivially zero.
CASES = [
    (2, 130, 40, "mid", False, True),
    (1, 64, 32, None, False, False),
    (3, 7, 5, "mid", True, True),
    (2, 65, 33, "start", True, False),
]


def make_inputs(B: int, T: int, D: int, resets: str | None, with_h0: bool, seed: int = 0) -> dict:
    """float64 inputs: gates wide enough to saturate, log_a with a ~1 channel (the sqrt's
    derivative hits its clip) and a ~0 one, resets (None, "start": at t = 0 and random, "mid":
    random but never at t = 0), upstream gradients g (B, T, D) and g_last (B, D)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    gate_r = 3 * torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    gate_i = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    log_a = -torch.rand(D, generator=gen, dtype=torch.float64) * 0.5
    log_a[0] = -1e-7
    if D > 1:
        log_a[1] = -20.0
    reset = None
    if resets is not None:
        reset = torch.rand(B, T, generator=gen) < 0.05
        reset[:, 0] = resets == "start"
        reset[0, min(T - 1, 3)] = True
    h0 = torch.randn(B, D, generator=gen, dtype=torch.float64) if with_h0 else None
    g = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    g_last = torch.randn(B, D, generator=gen, dtype=torch.float64)
    return dict(x=x, gate_r=gate_r, gate_i=gate_i, log_a=log_a, reset=reset, h0=h0, g=g, g_last=g_last)


def outputs_and_grads(impl: str, inp: dict, dtype: torch.dtype, device: str, unscaled: bool,
                      use_g: bool = True, use_g_last: bool = True) -> list[torch.Tensor]:
    """[y, h_last, dx, dgate_r, dgate_i, dlog_a, (dh0)] of rglru(impl=impl) on copies of `inp` in
    `dtype` on `device` (log_a and h0 in float32 unless dtype is float64)."""
    small = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [inp[k].to(device, dtype).requires_grad_() for k in ("x", "gate_r", "gate_i")]
    leaves.append(inp["log_a"].to(device, small).requires_grad_())
    h0 = None if inp["h0"] is None else inp["h0"].to(device, small).requires_grad_()
    reset = None if inp["reset"] is None else inp["reset"].to(device)
    y, h_last = rglru(*leaves, 8.0, reset, h0, unscaled, impl=impl)
    loss = 0
    if use_g:
        loss = loss + (y * inp["g"].to(device, y.dtype)).sum()
    if use_g_last:
        loss = loss + (h_last * inp["g_last"].to(device, h_last.dtype)).sum()
    wrt = leaves + ([] if h0 is None else [h0])
    return [y, h_last] + list(torch.autograd.grad(loss, wrt))


def reference(inp: dict, unscaled: bool, use_g: bool = True, use_g_last: bool = True,
              round_to: torch.dtype | None = None) -> list[torch.Tensor]:
    """The float64 composition on the same inputs (first rounded through `round_to`, if given)."""
    if round_to is not None:
        inp = dict(inp, **{k: inp[k].to(round_to).double() for k in ("x", "gate_r", "gate_i")})
    return outputs_and_grads("composed", inp, torch.float64, "cpu", unscaled, use_g, use_g_last)


def compare(got: list[torch.Tensor], want: list[torch.Tensor], tol: float, label: str) -> None:
    sys.path.insert(0, str(HERE))
    from harness import assert_close_scaled

    assert len(got) == len(want)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, f"{label} {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert_close_scaled(a.detach().cpu(), b.detach(), tol, f"{label} {name}")


def check_case(device: str, B: int, T: int, D: int, resets: str | None, unscaled: bool, with_h0: bool,
               use_g: bool = True, use_g_last: bool = True) -> None:
    sys.path.insert(0, str(HERE))
    from harness import fast_path

    inp = make_inputs(B, T, D, resets, with_h0, seed=T + D)
    with fast_path("rglru_triton"):  # the Triton path itself ran, not a fallback
        got = outputs_and_grads("triton", inp, torch.float32, device, unscaled, use_g, use_g_last)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    tol = 2e-5 * max(1.0, math.sqrt(T) / 10)  # fp32 rounding accumulates like a random walk
    compare(got, reference(inp, unscaled, use_g, use_g_last), tol, f"{(B, T, D, resets, unscaled, with_h0)}")


def check_bf16_strided(device: str) -> None:
    """bf16 inputs as non-contiguous views (time-major storage, gates split from one buffer):
    y and the input gradients come back in bf16, h_last in float32."""
    sys.path.insert(0, str(HERE))
    from harness import fast_path

    B, T, D = 2, 70, 36
    inp = make_inputs(B, T, D, "mid", True, seed=3)
    x = inp["x"].transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, D) with strides (D, B D, 1)
    gates = torch.stack([inp["gate_r"], inp["gate_i"]], dim=-1)  # (B, T, D, 2): gates interleaved
    leaves = [t.to(device, torch.bfloat16).requires_grad_() for t in (x, gates)]
    log_a = inp["log_a"].to(device, torch.float32).requires_grad_()
    h0 = inp["h0"].to(device, torch.float32).requires_grad_()
    xb, gb = leaves
    assert not xb.is_contiguous() and not gb[..., 0].is_contiguous()
    with fast_path("rglru_triton"):
        y, h_last = rglru(xb, gb[..., 0], gb[..., 1], log_a, 8.0, inp["reset"].to(device), h0, False, impl="triton")
    assert y.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    loss = (y * inp["g"].to(device, y.dtype)).sum() + (h_last * inp["g_last"].to(device)).sum()
    dx, dgates, dlog_a, dh0 = torch.autograd.grad(loss, [xb, gb, log_a, h0])
    assert dx.dtype == torch.bfloat16 and dgates.dtype == torch.bfloat16
    got = [y, h_last, dx, dgates[..., 0], dgates[..., 1], dlog_a, dh0]
    # The reference sees the same bf16-rounded inputs and upstream gradient; y and the input
    # gradients are rounded to bf16 on the way out (relative 2^-8).
    inp = dict(inp, g=inp["g"].to(torch.bfloat16).double())
    compare(got, reference(inp, False, round_to=torch.bfloat16), 1e-2, "bf16 strided")


def check_saved_tensors(device: str) -> None:
    """The fused path saves at most 4 (token, channel)-sized elements for its backward (goal of
    issue 20): x, gate_r, gate_i and the per-tile states (1/64 of an element)."""
    inp = make_inputs(2, 130, 40, "mid", True)
    B, T, D = inp["x"].shape
    args = [inp[k].to(device, torch.float32).requires_grad_() for k in ("x", "gate_r", "gate_i", "log_a")]
    h0 = inp["h0"].to(device, torch.float32).requires_grad_()
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # only what rglru itself saves
        y, h_last = rglru(*args, 8.0, inp["reset"].to(device), h0, False, impl="triton")
    (y.sum() + h_last.sum()).backward()  # and the backward runs from what was saved
    per_element = sum(saved) / (B * T * D)
    assert per_element <= 4, f"the Triton RG-LRU saves {per_element:.2f} elements per token and channel"
    assert per_element < 3.1, f"expected x, gate_r, gate_i and the tile states only, got {per_element:.3f}"


def check_offsets_past_2_31(device: str) -> None:
    """x, gate_r, gate_i and the upstream gradient as views whose element offsets pass 2^31
    (batch, time and channel terms; see `test_scan_triton.huge_view`) give the reference's result."""
    sys.path.insert(0, str(HERE))
    from test_scan_triton import HUGE_SHAPE, HUGE_STRIDES, huge_view

    for strides in HUGE_STRIDES:
        inp = make_inputs(*HUGE_SHAPE, "mid", True, seed=1)
        views = {k: huge_view(inp[k].float(), strides) for k in ("x", "gate_r", "gate_i", "g")}
        leaves = [views[k].requires_grad_() for k in ("x", "gate_r", "gate_i")]
        log_a = inp["log_a"].float().requires_grad_()
        h0 = inp["h0"].float().requires_grad_()
        y, h_last = rglru(*leaves, log_a, 8.0, inp["reset"], h0, False, impl="triton")
        got = [y, h_last] + list(torch.autograd.grad((y, h_last), leaves + [log_a, h0],
                                                     (views["g"], inp["g_last"].float())))
        ref_inp = dict(inp, **{k: v.detach().double() for k, v in views.items()})
        compare(got, reference(ref_inp, False), 1e-5, f"strides {strides}")


def run_checks(device: str) -> None:
    for case in CASES:
        check_case(device, *case)
    check_case(device, 2, 70, 33, "mid", False, True, use_g=False)  # gradient through h_last only
    check_case(device, 2, 70, 33, None, True, True, use_g_last=False)  # through y only
    check_bf16_strided(device)
    check_saved_tensors(device)
    if device == "cpu" and sys.platform == "linux":
        check_offsets_past_2_31(device)


def _run_interpreter(fn: str) -> None:
    run_in_triton_interpreter("test_lru_triton", fn)


@pytest.mark.slow
def test_rglru_triton_interpreter_on_cpu():
    _run_interpreter("run_checks")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rglru_triton_on_gpu():
    run_checks("cuda")
    check_case("cuda", 4, 4097, 300, "mid", True, True)
    # On CUDA rglru picks the Triton kernels by default.
    inp = make_inputs(1, 10, 8, None, False)
    before = numba_common.FUSED_CALLS["rglru_triton"]
    rglru(inp["x"].cuda().float(), inp["gate_r"].cuda().float(), inp["gate_i"].cuda().float(), inp["log_a"].cuda().float())
    assert numba_common.FUSED_CALLS["rglru_triton"] == before + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rglru_triton_under_torch_compile():
    inp = make_inputs(2, 300, 64, "mid", True)
    args = [inp[k].cuda().float().requires_grad_() for k in ("x", "gate_r", "gate_i", "log_a")]
    reset = inp["reset"].cuda()

    def f(x, gate_r, gate_i, log_a):
        y, h_last = rglru(x, gate_r, gate_i, log_a, 8.0, reset, None, False, impl="triton")
        return y.square().sum() + h_last.sum()

    out = torch.compile(f, fullgraph=True)(*args)
    grads = torch.autograd.grad(out, args)
    torch.testing.assert_close(out, f(*args))
    torch.testing.assert_close(grads, torch.autograd.grad(f(*args), args))


@pytest.mark.parametrize("op", ["linear_scan", "rglru"])
def test_missing_triton_is_a_loud_error(op, monkeypatch):
    """A broken or missing triton raises a RuntimeError that names the fix, instead of a silent
    Python loop over time (forced here with impl="triton", the path CUDA tensors take)."""
    module = {"linear_scan": "griffinlm.ops.scan.triton", "rglru": "griffinlm.ops.lru.triton"}[op]
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    x = torch.randn(1, 4, 3)
    with pytest.raises(RuntimeError, match="need the Triton kernels.*pip install triton"):
        if op == "linear_scan":
            linear_scan(torch.rand(1, 4, 3), x, impl="triton")
        else:
            rglru(x, x, x, -torch.rand(3), impl="triton")
