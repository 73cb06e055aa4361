"""`linear_scan`: the one public entry point for the diagonal linear recurrence.

    h_t = a_t * h_{t-1} + x_t,   t = 0 .. T-1,   h_{-1} = h0 (or 0)

Fast kernels plug in behind this name (CPU: numba, `scan/numba.py`; CUDA: Triton,
`scan/triton.py`); the pure-torch Function here is the compiler-free fallback. Callers
need not pick one; `impl=` forces one for tests and benchmarks. Whatever the
input dtype, the recurrence accumulates in float32 and the states are returned in float32,
because the RG-LRU keeps its state in fp32.
"""
from __future__ import annotations

import importlib
import os

import torch

from .. import numba_common
from .reference import linear_scan_reference


def _check_inputs(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise TypeError("linear_scan: a and x must be torch.Tensors")
    if x.dim() != 3:
        raise ValueError(f"linear_scan: x must have shape (B, T, D), got {tuple(x.shape)}")
    if a.shape != x.shape:
        raise ValueError(f"linear_scan: a has shape {tuple(a.shape)} but x has {tuple(x.shape)}; they must match")
    for name, t in (("a", a), ("x", x)):
        if not t.is_floating_point():
            raise TypeError(f"linear_scan: {name} must be a floating-point tensor, got {t.dtype}")
    if h0 is not None:
        if h0.shape != (x.shape[0], x.shape[2]):
            raise ValueError(
                f"linear_scan: h0 must have shape (B, D) = {(x.shape[0], x.shape[2])}, got {tuple(h0.shape)}"
            )
        if not h0.is_floating_point():
            raise TypeError(f"linear_scan: h0 must be floating point, got {h0.dtype}")


class _LinearScanTorch(torch.autograd.Function):
    """Compiler-free fallback: a loop over time of vectorised (B, D) steps, with a backward that is
    itself a reverse scan, so autograd never records T steps."""

    @staticmethod
    def forward(ctx, a, x, h0):
        acc = torch.promote_types(a.dtype, torch.float32)
        B, T, D = x.shape
        h = torch.empty(B, T, D, dtype=acc, device=x.device)
        prev = torch.zeros(B, D, dtype=acc, device=x.device) if h0 is None else h0.to(acc)
        for t in range(T):
            prev = torch.addcmul(x[:, t].to(acc), a[:, t].to(acc), prev)
            h[:, t] = prev
        ctx.save_for_backward(a, h, h0)
        ctx.x_dtype = x.dtype
        return h, prev.clone()

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        a, h, h0 = ctx.saved_tensors
        acc = h.dtype
        B, T, D = h.shape
        g = torch.zeros(B, T, D, dtype=acc, device=h.device) if grad_h is None else grad_h.to(acc)
        carry = torch.zeros(B, D, dtype=acc, device=h.device) if grad_last is None else grad_last.to(acc)
        dx = torch.empty(B, T, D, dtype=acc, device=h.device)
        # dh_t = g_t + a_{t+1} dh_{t+1}; the final state's gradient enters at t = T-1.
        for t in range(T - 1, -1, -1):
            carry = carry + g[:, t]
            dx[:, t] = carry
            carry = carry * a[:, t].to(acc)
        dh0 = carry  # = a_0 * dh_0, the gradient of h_{-1}
        h_prev = torch.empty_like(h)
        if T:
            h_prev[:, 1:] = h[:, :-1]
            h_prev[:, 0] = 0 if h0 is None else h0.to(acc)
        da = dx * h_prev
        return (
            da.to(a.dtype),
            dx.to(ctx.x_dtype),
            None if h0 is None else dh0.to(h0.dtype),
        )


IMPLS = ("reference", "torch", "numba", "triton")


def _triton_usable(x: torch.Tensor) -> bool:
    """Whether the Triton kernels may take tensors like x: CUDA ones, or CPU ones under
    TRITON_INTERPRET=1 (the interpreter the tests use). Says nothing of whether triton imports."""
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def missing_triton(op: str, error: Exception) -> RuntimeError:
    """The error for CUDA tensors when the Triton kernels cannot be imported. On CUDA the only
    alternative is a Python loop over time, hundreds of times slower: a training run must fail
    loudly and say how to fix it, not fall back silently."""
    return RuntimeError(
        f"{op}: CUDA tensors need the Triton kernels, but importing them failed "
        f"({type(error).__name__}: {error}). Install the triton that matches this torch "
        f"(torch {torch.__version__}; `pip install triton`). The pure-torch loop over time, "
        f"linear_scan(..., impl='torch'), is for tests: it is hundreds of times slower."
    )


def available_impls(device: str | torch.device = "cpu") -> list[str]:
    """Implementations `linear_scan(..., impl=...)` can run on tensors of this device."""
    probe = torch.empty(0, device=device)
    out = ["reference", "torch"]
    if probe.device.type == "cpu" and numba_common.available():
        out.append("numba")
    if _triton_usable(probe):
        try:
            importlib.import_module(f"{__name__}.triton")
        except Exception:  # missing or broken: linear_scan raises `missing_triton` if asked
            return out
        out.append("triton")
    return out


def default_impl(x: torch.Tensor) -> str:
    """CUDA -> triton (`linear_scan` then raises if triton is missing or broken: see
    `missing_triton`); CPU -> numba; else (or for float64) the torch Function."""
    if x.dtype == torch.float64:
        return "torch"  # the fast kernels accumulate in float32
    if x.is_cuda:
        return "triton"
    if x.device.type == "cpu" and numba_common.available():
        return "numba"
    return "torch"


def linear_scan(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None, *, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal linear recurrence h_t = a_t * h_{t-1} + x_t over the time axis.

    Args:
        a: (B, T, D) decays (float32/bf16/fp16/fp64), usually in [0, 1]; any strides.
        x: (B, T, D) inputs, same shape as `a`.
        h0: optional (B, D) initial state; gradients flow to it.
        impl: force a backend ("reference", "torch", "numba", "triton"); None picks the
            fastest available for the device (see `default_impl`).

    Returns:
        h: (B, T, D) every state, float32 (float64 for float64 inputs on the torch paths).
        h_last: (B, D) the final state (equals h[:, -1] when T > 0, h0 or zeros when T == 0).
    """
    _check_inputs(a, x, h0)
    impl = default_impl(x) if impl is None else impl
    if impl == "numba":
        if not numba_common.available():
            raise RuntimeError("linear_scan: impl='numba' requested but numba is not importable")
        from .numba import LinearScanNumba

        numba_common.FUSED_CALLS["linear_scan"] += 1
        return LinearScanNumba.apply(a, x, h0)
    if impl == "triton":
        try:
            from .triton import linear_scan_triton
        except Exception as e:  # ImportError, or a broken install (a triton that does not match torch)
            raise missing_triton("linear_scan", e) from e
        return linear_scan_triton(a, x, h0)
    if impl == "torch":
        return _LinearScanTorch.apply(a, x, h0)
    if impl == "reference":
        return linear_scan_reference(a, x, h0)
    raise ValueError(f"linear_scan: unknown impl {impl!r}; expected one of {IMPLS}")
