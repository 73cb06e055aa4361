"""Block-diagonal linear maps sharing one input: the RG-LRU's two gates.

    y_k[..., h-th block] = x[..., h-th block] @ weight_k[h] + bias_k[h]      (blocks of width bw)

Composed with einsum, each gate permutes x to (H, N, bw), runs a batched matmul into that
layout, permutes the result back and adds the bias in another pass. On CPU one matmul per
(gate, block) reads x's block in place (a strided row view) and writes straight into the
gate's columns with the bias, so nothing is permuted or copied; backward does the same.
The reference is `block_diagonal_linear_reference`.
"""
from __future__ import annotations

import torch

from ..numba_common import FUSED_CALLS, plain_cpu

MIN_ROWS = 64


def block_diagonal_linear_reference(x: torch.Tensor, weights: list[torch.Tensor],
                                    biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """einsum form (any device, dtype, tensor subclass). x (..., D); weights (H, bw, bw); biases (H, bw)."""
    H = weights[0].shape[0]
    xb = x.unflatten(-1, (H, -1))  # (..., H, bw)
    outs = []
    for w, b in zip(weights, biases):
        y = torch.einsum("...hi,hij->...hj", xb, w.to(x.dtype))
        outs.append((y + b.to(x.dtype) if b is not None else y).flatten(-2))
    return outs


def _fusable(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> bool:
    """Plain CPU tensors of x's dtype (any: these are torch matmuls, not numba kernels), not under
    torch.compile, and enough rows: per-block matmuls pay off over many rows; a decoding step's
    few rows stay with einsum."""
    return plain_cpu(x, *weights, *biases, dtype=x.dtype) and x.numel() >= MIN_ROWS * x.shape[-1]


class _BlockDiagonalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *params):
        n = len(params) // 2
        weights, biases = params[:n], params[n:]
        H, bw, _ = weights[0].shape
        flat = x.reshape(-1, H * bw)
        outs = []
        for w, b in zip(weights, biases):
            y = flat.new_empty(flat.shape)
            for h in range(H):
                cols = slice(h * bw, (h + 1) * bw)
                if b is None:
                    torch.mm(flat[:, cols], w[h], out=y[:, cols])
                else:
                    torch.addmm(b[h], flat[:, cols], w[h], out=y[:, cols])
            outs.append(y.view(x.shape))
        ctx.save_for_backward(flat, *weights)
        ctx.has_bias = [b is not None for b in biases]
        ctx.x_shape = x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        flat, *weights = ctx.saved_tensors
        H, bw, _ = weights[0].shape
        gs = [g.reshape(flat.shape) if g is not None else None for g in grads]
        dx = torch.zeros_like(flat) if all(g is None for g in gs) else flat.new_empty(flat.shape)
        dws, dbs = [], []
        first = True
        n = len(weights)
        for k, (w, g, has_b) in enumerate(zip(weights, gs, ctx.has_bias)):
            if g is None:
                dws.append(None)
                dbs.append(None)
                continue
            want_w = ctx.needs_input_grad[1 + k]  # a frozen gate (LoRA fine-tuning) forms no gradient
            dw = torch.empty_like(w) if want_w else None
            for h in range(H):
                cols = slice(h * bw, (h + 1) * bw)
                if first:
                    torch.mm(g[:, cols], w[h].t(), out=dx[:, cols])
                else:
                    dx[:, cols].addmm_(g[:, cols], w[h].t())
                if want_w:
                    torch.mm(flat[:, cols].t(), g[:, cols], out=dw[h])
            first = False
            dws.append(dw)
            dbs.append(g.sum(0).view(H, bw) if has_b and ctx.needs_input_grad[1 + n + k] else None)
        return (dx.view(ctx.x_shape), *dws, *dbs)


def block_diagonal_linear(x: torch.Tensor, weights: list[torch.Tensor],
                          biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """One block-diagonal linear map of x per weight.

    Args:
        x: (..., D) input, D = H * bw.
        weights: (H, bw, bw) each (block h maps x's h-th block, as x_h @ weight[h]).
        biases: (H, bw) or None, one per weight.

    Returns:
        One (..., D) tensor per weight, in x's dtype.
    """
    H, bw, bw2 = weights[0].shape
    if bw != bw2 or H * bw != x.shape[-1] or any(w.shape != weights[0].shape for w in weights):
        raise ValueError(f"block_diagonal_linear: weights must be (H, bw, bw) with H * bw = {x.shape[-1]}, "
                         f"got {[tuple(w.shape) for w in weights]}")
    if not _fusable(x, list(weights), list(biases)):
        return block_diagonal_linear_reference(x, weights, biases)
    FUSED_CALLS["block_diagonal_linear"] += 1
    return list(_BlockDiagonalLinear.apply(x, *weights, *biases))
