"""linear_scan backends (torch fallback, numba, Triton on CUDA) against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from griffinlm.ops import linear_scan, linear_scan_reference, numba_common
from griffinlm.ops.scan import available_impls, default_impl
from harness import assert_close_scaled as close
from harness import fast_path

CPU_IMPLS = [i for i in available_impls("cpu") if i in ("torch", "numba")]
CUDA_IMPLS = [i for i in available_impls("cuda") if i in ("torch", "triton")] if torch.cuda.is_available() else []
IMPLS = [("cpu", i) for i in CPU_IMPLS] + [("cuda", i) for i in CUDA_IMPLS]


def make_a(kind: str, B: int, T: int, D: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(B, T, D, generator=gen, dtype=torch.float64)
    return {"near0": u * 1e-3, "near1": 1 - u * 1e-3, "zero": torch.zeros_like(u), "one": torch.ones_like(u),
            "mixed": u}[kind]


def reference_grads(a, h, h0, g, g_last):
    """Independent float64 reverse loop: dh_t = g_t + a_{t+1} dh_{t+1}; da_t = dh_t h_{t-1}; dx_t = dh_t."""
    B, T, D = a.shape
    dx = torch.zeros_like(a)
    carry = g_last.clone()
    for t in range(T - 1, -1, -1):
        carry = carry + g[:, t]
        dx[:, t] = carry
        carry = carry * a[:, t]
    h_prev = torch.cat([(torch.zeros_like(g_last) if h0 is None else h0)[:, None], h[:, :-1]], 1)
    return dx * h_prev, dx, carry


def check(device, impl, a64, x64, h064, dtype=torch.float32, tol=None, gen=None):
    # fp32 rounding errors accumulate like a random walk over time.
    tol = tol if tol is not None else 3e-6 * max(1.0, a64.shape[1] ** 0.5 / 10)
    gen = gen or torch.Generator().manual_seed(1)
    a = a64.to(device, dtype).requires_grad_()
    x = x64.to(device, dtype).requires_grad_()
    h0 = None if h064 is None else h064.to(device, dtype).requires_grad_()
    with fast_path("linear_scan", runs=int(impl == "numba")):  # the kernel asked for ran
        h, h_last = linear_scan(a, x, h0, impl=impl)
    assert h.dtype == torch.float32 and h_last.dtype == torch.float32
    # The reference sees exactly the (possibly rounded) inputs the kernel saw.
    ar, xr = a.detach().cpu().double(), x.detach().cpu().double()
    h0r = None if h0 is None else h0.detach().cpu().double()
    hr, hlr = linear_scan_reference(ar, xr, h0r)
    close(h.cpu(), hr, tol, "h")
    close(h_last.cpu(), hlr, tol, "h_last")
    g = torch.randn(h.shape, generator=gen, dtype=torch.float64)
    gl = torch.randn(h_last.shape, generator=gen, dtype=torch.float64)
    ((h * g.to(device, h.dtype)).sum() + (h_last * gl.to(device, h.dtype)).sum()).backward()
    da, dx, dh0 = reference_grads(ar, hr, h0r, g, gl)
    assert a.grad.dtype == dtype and x.grad.dtype == dtype
    close(a.grad.cpu(), da, tol, "da")
    close(x.grad.cpu(), dx, tol, "dx")
    if h0 is not None:
        close(h0.grad.cpu(), dh0, tol, "dh0")


def test_reference_grads_match_autograd():
    gen = torch.Generator().manual_seed(0)
    a, x, h0 = (torch.rand(2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)), None, None
    a, x = list(a)
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    h, hl = linear_scan_reference(a, x, h0)
    g, gl = torch.randn_like(h), torch.randn_like(hl)
    ((h * g).sum() + (hl * gl).sum()).backward()
    for got, want in zip(reference_grads(a.detach(), h.detach(), h0.detach(), g, gl), (a.grad, x.grad, h0.grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("T", [1, 2, 7, 64, 1000, 4097])
@pytest.mark.parametrize("kind", ["near0", "near1", "zero", "one", "mixed"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_matches_reference(device, impl, T, kind, with_h0):
    if impl == "torch" and T == 4097 and kind != "mixed":
        pytest.skip("the Python-loop fallback is slow at T=4097; one case suffices")
    gen = torch.Generator().manual_seed(T)
    B, D = 2, 19  # D odd and not a multiple of any vector width
    a = make_a(kind, B, T, D, gen)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    h0 = torch.randn(B, D, generator=gen, dtype=torch.float64) if with_h0 else None
    check(device, impl, a, x, h0)


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_half_inputs(device, impl, dtype):
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(3, 300, 40, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 300, 40, generator=gen, dtype=torch.float64)
    h0 = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    # Accumulation is fp32; only the returned gradients are rounded to the input dtype.
    check(device, impl, a, x, h0, dtype=dtype, tol=1e-2)


@pytest.mark.parametrize("device,impl", IMPLS)
def test_scan_non_contiguous_and_wide(device, impl):
    gen = torch.Generator().manual_seed(4)
    base = torch.rand(300, 3, 1100, generator=gen, dtype=torch.float64)  # D > one numba chunk
    a = base.transpose(0, 1)
    x = torch.randn(3, 1100, 300, generator=gen, dtype=torch.float64).transpose(1, 2)
    assert not a.is_contiguous() and not x.is_contiguous()
    check(device, impl, a, x, None)
    check(device, impl, a[:1], x[:1], torch.randn(1, 1100, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("device,impl", IMPLS)
def test_scan_only_last_state_or_only_states(device, impl):
    gen = torch.Generator().manual_seed(5)
    a = torch.rand(2, 50, 8, generator=gen, device=device, requires_grad=True)
    x = torch.randn(2, 50, 8, generator=gen, device=device, requires_grad=True)
    _, hl = linear_scan(a, x, impl=impl)
    hl.sum().backward()
    ar, xr = a.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    linear_scan_reference(ar, xr)[1].sum().backward()
    close(a.grad.cpu(), ar.grad.cpu(), 1e-6)
    close(x.grad.cpu(), xr.grad.cpu(), 1e-6)
    h, _ = linear_scan(a.detach(), x.detach().requires_grad_(), impl=impl)
    assert h.requires_grad


@pytest.mark.parametrize("device,impl", IMPLS)
def test_scan_long_sequence_finite(device, impl):
    if impl == "torch":
        pytest.skip("Python-loop fallback: too slow for T = 65536 in CI")
    T = 65536
    gen = torch.Generator().manual_seed(6)
    a = 1 - torch.rand(1, T, 16, generator=gen, dtype=torch.float64) * 1e-4
    a[..., 0] = 1.0  # the state grows like T: no overflow in fp32 (65536 * 4 << 3e38)
    x = torch.randn(1, T, 16, generator=gen, dtype=torch.float64) + 1.0
    check(device, impl, a, x, None)


@pytest.mark.parametrize("device,impl", IMPLS)
def test_scan_empty_time(device, impl):
    a = torch.rand(2, 0, 4, device=device)
    h0 = torch.randn(2, 4, device=device)
    h, hl = linear_scan(a, a, h0, impl=impl)
    assert h.shape == (2, 0, 4)
    torch.testing.assert_close(hl, h0)


def test_dispatch_defaults_and_fallback(monkeypatch):
    x = torch.zeros(1, 2, 3)
    assert default_impl(x) == ("numba" if numba_common.available() else "torch")
    assert default_impl(x.double()) == "torch"
    monkeypatch.setattr(numba_common, "available", lambda: False)
    assert default_impl(x) == "torch"
    h, _ = linear_scan(torch.full((1, 3, 2), 0.5), torch.ones(1, 3, 2))
    torch.testing.assert_close(h[0, :, 0], torch.tensor([1.0, 1.5, 1.75]))
    with pytest.raises(RuntimeError):
        linear_scan(x, x, impl="numba")
    with pytest.raises(ValueError):
        linear_scan(x, x, impl="bogus")


def test_buffer_pool_reuses_only_buffers_no_tensor_views():
    from griffinlm.ops.buffer_pool import MIN_BYTES, BufferPool

    pool = BufferPool(max_idle_bytes=MIN_BYTES)
    shape = (MIN_BYTES // 4 // 1024, 1024)  # exactly MIN_BYTES
    a = pool.empty(*shape)
    first = a.data_ptr()
    view = a[1:]  # a view keeps the storage, so the buffer is still in use
    del a
    b = pool.empty(*shape)
    assert b.data_ptr() != first
    del view
    c = pool.empty(*shape)
    assert c.data_ptr() == first  # idle again: reused, no fresh mapping
    assert c.shape == shape and c.dtype == torch.float32 and c.is_contiguous()
    del b, c
    d = pool.empty(2 * shape[0], 1024)  # another size: idle buffers trimmed to max_idle_bytes
    assert sum(x.nbytes for x in pool._buffers) == MIN_BYTES + d.numel() * 4
    small = pool.empty(3, 5)  # below MIN_BYTES: plain torch.empty
    assert small.shape == (3, 5) and len(pool._buffers) == 2
    pool.clear()  # forgets every buffer; d keeps its memory
    assert pool._buffers == [] and d.shape == (2 * shape[0], 1024)


@pytest.mark.skipif("numba" not in available_impls("cpu"), reason="numba not installed")
def test_numba_scan_outputs_from_the_pool_stay_correct():
    """Large outputs come from reused buffers: results held from one call must not change
    when the next call runs, and every call must match the reference."""
    torch.manual_seed(0)
    B, T, D = 2, 4096, 1024  # 32 MiB outputs: pooled
    a, x = torch.rand(B, T, D), torch.randn(B, T, D)
    h1, _ = linear_scan(a, x, impl="numba")
    keep = h1.clone()
    h2, _ = linear_scan(a.flip(1), x, impl="numba")
    assert h2.data_ptr() != h1.data_ptr()
    torch.testing.assert_close(h1, keep, rtol=0, atol=0)
    del h1
    h3, _ = linear_scan(a, x, impl="numba")
    ref, _ = linear_scan_reference(a.double(), x.double())
    torch.testing.assert_close(h3.double(), ref, rtol=1e-4, atol=1e-4)
