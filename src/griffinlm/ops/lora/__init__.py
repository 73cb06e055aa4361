"""`lora_linear`: a linear layer with one LoRA adapter, y = x W^T + b + scaling * (drop(x) A^T) B^T.

peft computes the adapter as separate torch ops after the base layer: a dropout of x through
torch's CPU `bernoulli_` (a large share of a LoRA training step: BENCHMARKS.md, Fine-tuning), then
lora_A, lora_B, a multiply by `scaling` and an add, each a new (rows, out) tensor, and autograd
sums the base's and the adapter's input gradients in another pass. Here, for a frozen base layer
(LoRA's case), every product (the base's and the adapter's rank-r ones) runs on the GEMM backend
measured fastest for its shape (`ops.linear`; MKL runs the adapter's (r, K) and (N, r) gradients
at about one thread's rate, "mkl_split" in parallel chunks), the dropout is a numba kernel with a
counter-based mask, the low-rank update is added into the base output in
place (one `addmm_`), and the backward is written out: no base weight gradient, the adapter's
input gradient added into the base's in place through the same mask (regenerated from its
seed), and only the dropped input and the (rows, r) product saved.

The reference is `lora_linear_reference` (peft's composition, given the dropout's keep mask);
`dropout_mask` returns the mask `lora_linear` draws for a seed, so that the two can be compared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..linear import forward_fp32, grad_input_fp32, grad_weight_fp32
from ..numba_common import FUSED_CALLS, cpu_fusable

_P_SCALE = float(2**32)


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float, keep: torch.Tensor | None = None,
                          p: float = 0.0) -> torch.Tensor:
    """peft's LoRA forward: x (..., K), weight (N, K), lora_a (r, K), lora_b (N, r); keep: the
    dropout's (..., K) bool mask (None: no dropout). Returns (..., N)."""
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    return F.linear(x, weight, bias) + F.linear(F.linear(xd, lora_a), lora_b) * scaling


def _threshold(p: float) -> int:
    return min(int(p * _P_SCALE), 2**32 - 1)


class _LoraLinear(torch.autograd.Function):
    """The frozen base layer plus one adapter, 2-D: x (M, K) -> (M, N). Saves the dropped input
    (M, K) and x A^T (M, r); backward adds the adapter's input gradient into the base's in place
    (through the same dropout mask, regenerated from its seed)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, bias, scaling, p, seed):
        from . import numba as kernels

        xd = x
        if p > 0:
            xd = torch.empty_like(x)
            kernels.dropout(x.numpy(), xd.numpy(), seed, _threshold(p), 1.0 / (1.0 - p))
        xa = forward_fp32(xd, lora_a, None, packable=False)  # (M, r)
        y = forward_fp32(x, weight, bias)  # (M, N)
        y.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(xd, xa, lora_a, lora_b, weight)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        return y

    @staticmethod
    def backward(ctx, g):
        from . import numba as kernels

        xd, xa, lora_a, lora_b, weight = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        g = g.contiguous()
        gb = grad_input_fp32(g, lora_b)  # (M, r)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = grad_input_fp32(g, weight)  # (M, K)
            if p > 0:
                kernels.add_dropped(dx.numpy(), grad_input_fp32(gb, lora_a).numpy(), ctx.seed, _threshold(p),
                                    s / (1.0 - p))
            else:
                dx.addmm_(gb, lora_a, alpha=s)
        da = grad_weight_fp32(gb, xd).mul_(s) if ctx.needs_input_grad[1] else None  # (r, K)
        db = grad_weight_fp32(g, xa).mul_(s) if ctx.needs_input_grad[2] else None  # (N, r)
        return dx, da, db, None, None, None, None, None


def dropout_mask(shape: tuple[int, ...], p: float, seed: int) -> torch.Tensor:
    """The keep mask (bool, `shape`) that `lora_linear`'s dropout draws for `seed`."""
    from . import numba as kernels

    ones = torch.ones(shape, dtype=torch.float32).reshape(-1, shape[-1])
    out = torch.empty_like(ones)
    kernels.dropout(ones.numpy(), out.numpy(), seed, _threshold(p), 1.0)
    return (out != 0).view(shape)


def fusable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
            lora_b: torch.Tensor) -> bool:
    """Plain float32 CPU tensors, numba present, a frozen base layer (LoRA's), not under CPU bf16
    autocast (peft's path then)."""
    return (cpu_fusable(x, weight, bias, lora_a, lora_b) and x.dim() >= 1 and x.numel() > 0
            and not weight.requires_grad and (bias is None or not bias.requires_grad)
            and not torch.is_autocast_enabled("cpu"))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, p: float = 0.0, *,
                generator: torch.Generator | None = None, stream: int = 0) -> torch.Tensor:
    """y = x W^T + b + scaling * (dropout_p(x) A^T) B^T.

    Args:
        x: (..., K) input; weight: (N, K); bias: (N,) or None; lora_a: (r, K); lora_b: (N, r).
        scaling: the adapter's alpha / r. p: dropout probability on the adapter's input (0 in eval).
        generator: where the dropout's seed is drawn from (default: torch's global generator, so
            torch.manual_seed and a restored RNG state reproduce the masks).
        stream: mixed into the drawn seed: processes that draw the same seeds (data-parallel ranks
            with one RNG state) get independent masks when their streams differ.
    Returns (..., N). Falls back to the reference composition with torch's dropout for anything
    `fusable` rejects.
    """
    if not fusable(x, weight, bias, lora_a, lora_b):
        keep = None if p == 0 else torch.rand(x.shape, generator=generator, device=x.device) >= p
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, keep, p)
    FUSED_CALLS["lora_linear"] += 1
    seed = int(torch.randint(0, 2**62, (), generator=generator)) if p > 0 else 0
    if stream:
        seed = (seed + stream * 0x9E3779B97F4A7C15) % 2**63
    y = _LoraLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), lora_a, lora_b, weight, bias, float(scaling),
                          float(p), seed)
    return y.view(*x.shape[:-1], y.shape[-1])
