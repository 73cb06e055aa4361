"""Cross-entropy over the tied output layer, chunked over tokens: no (N, V) logits kept.

    nats = sum over counted targets t_n of  logsumexp_v z_nv - z_{n t_n},
    z = cap * tanh(hidden @ embedding^T / cap)   (no tanh without a soft-cap)

The plain way (`loss/reference.py`, what the training step did before) materialises the
logits, copies them to fp32 and saves the log-softmax for backward: three or four (N, V) fp32
tensors, about 42 GB at 16k tokens with RecurrentGemma's 256k vocabulary. Here a custom
autograd Function walks the tokens in chunks of `chunk` rows: forward keeps only each chunk's
summed nats; backward recomputes the chunk's logits (one more GEMM per chunk, a third more
head FLOPs) and turns them into the chunk's dhidden rows and its share of dembedding at once.
At most two (chunk, V) fp32 buffers live at a time, whatever N.

Precision follows the GEMMs the model would run: under autocast the operands are rounded to
the autocast dtype (bf16 GEMM on CUDA; on CPU the same rounded operands through an fp32 GEMM,
as `ops.linear` does), logits, softmax and the sums are fp32 (float64 for float64 inputs),
and dembedding accumulates over chunks in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import IGNORE, tied_cross_entropy_reference

__all__ = ["tied_cross_entropy", "tied_cross_entropy_reference", "IGNORE", "CHUNK_ELEMENTS"]

# Logits per chunk (rows x V): 2^24 fp32 = 64 MiB per buffer, e.g. 64 rows of a 256k
# vocabulary or 512 of a 32k one. Large enough that each chunk's GEMM is efficient, small
# enough that the loss's working set is a rounding error next to the model's activations.
CHUNK_ELEMENTS = 1 << 24


def _gemm_dtypes(hidden: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(rounding dtype of the GEMM operands, dtype the GEMM runs in, accumulation dtype)."""
    acc = torch.float64 if torch.float64 in (hidden.dtype, embedding.dtype) else torch.float32
    dev = hidden.device.type
    if acc == torch.float32 and torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        # CPU: fp32 GEMM of bf16-rounded operands (fp32 out, as ops.linear's bf16 path); CUDA:
        # the low-precision GEMM itself, as autocast would run it.
        return low, (acc if dev == "cpu" else low), acc
    operand = torch.promote_types(hidden.dtype, embedding.dtype)
    return operand, operand, acc


def _logits(h: torch.Tensor, w: torch.Tensor, round_to: torch.dtype, soft_cap: float | None,
            acc: torch.dtype) -> torch.Tensor:
    """(n, D) rows against w (V, D) -> (n, V) capped logits in `acc`."""
    z = F.linear(h.to(round_to).to(w.dtype), w).to(acc)
    if soft_cap is not None:
        z = z.div_(soft_cap).tanh_().mul_(soft_cap)  # in place: one (n, V) buffer
    return z


class _TiedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, embedding, targets, soft_cap, chunk, round_to, gemm, acc):
        # hidden (N, D); embedding (V, D); targets (N,) long with IGNORE where not counted
        with torch.autocast(hidden.device.type, enabled=False):
            w = embedding.to(round_to).to(gemm)  # (V, D): cast once for every chunk
            total = torch.zeros((), dtype=acc, device=hidden.device)
            for s in range(0, hidden.shape[0], chunk):
                t = targets[s:s + chunk]
                valid = t != IGNORE  # (n,)
                z = _logits(hidden[s:s + chunk], w, round_to, soft_cap, acc)  # (n, V)
                picked = z.gather(1, t.clamp(min=0)[:, None])[:, 0]
                total += torch.where(valid, torch.logsumexp(z, dim=1) - picked, 0.0).sum()
        ctx.save_for_backward(hidden, embedding, targets)
        ctx.cfg = (soft_cap, chunk, round_to, gemm, acc)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, embedding, targets = ctx.saved_tensors
        soft_cap, chunk, round_to, gemm, acc = ctx.cfg
        want_h, want_w = ctx.needs_input_grad[:2]
        dh = torch.zeros_like(hidden) if want_h else None  # rows with no counted target stay 0
        dw = torch.zeros(embedding.shape, dtype=acc, device=embedding.device) if want_w else None
        g = grad_total.to(acc)
        with torch.autocast(hidden.device.type, enabled=False):
            w = embedding.to(round_to).to(gemm)  # (V, D)
            for s in range(0, hidden.shape[0], chunk):
                t = targets[s:s + chunk]
                valid = t != IGNORE  # (n,)
                if not bool(valid.any()):
                    continue  # padding only: no gradient, skip the GEMMs
                h = hidden[s:s + chunk]
                z = _logits(h, w, round_to, soft_cap, acc)  # (n, V), recomputed
                dz = torch.softmax(z, dim=1)  # d nats / d z = softmax - onehot(target)
                rows = torch.arange(dz.shape[0], device=dz.device)
                dz[rows, t.clamp(min=0)] -= 1.0
                dz.mul_(torch.where(valid, g, 0.0)[:, None])
                if soft_cap is not None:  # d cap*tanh(u/cap) / du = 1 - tanh^2 = 1 - (z/cap)^2
                    dz.mul_(z.div_(soft_cap).square_().neg_().add_(1.0))
                del z
                dz = dz.to(gemm)
                if want_h:
                    dh[s:s + chunk] = (dz @ w).to(hidden.dtype)  # (n, D)
                if want_w:  # (V, D), accumulated over chunks in fp32
                    h_op = h.to(round_to).to(gemm)
                    if gemm == acc:
                        dw.addmm_(dz.t(), h_op)  # in place: no (V, D) temporary
                    else:
                        dw += (dz.t() @ h_op).to(acc)
        return dh, (dw.to(embedding.dtype) if want_w else None), None, None, None, None, None, None


def tied_cross_entropy(hidden: torch.Tensor, embedding: torch.Tensor, targets: torch.Tensor,
                       mask: torch.Tensor | None = None, soft_cap: float | None = None, *,
                       chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed nats of the counted targets, without materialising the (..., V) logits.

    Args:
        hidden: (..., D) final-norm outputs (the tied output layer's input).
        embedding: (V, D) the embedding, used as the output layer.
        targets: (...) integer next-token ids in [0, V); -100 never counts.
        mask: optional (...) bool, True where the target counts.
        soft_cap: logits become cap * tanh(logits / cap) (RecurrentGemma); None: no cap.
        chunk_tokens: rows per chunk (default: CHUNK_ELEMENTS // V, at least 1).

    Returns:
        A scalar: fp32 (float64 if an input is float64), differentiable w.r.t. hidden and
        embedding. Equals `tied_cross_entropy_reference` up to summation order.
    """
    if hidden.dim() < 1 or embedding.dim() != 2 or hidden.shape[-1] != embedding.shape[1]:
        raise ValueError(f"tied_cross_entropy: hidden (..., D) and embedding (V, D) expected, got "
                         f"{tuple(hidden.shape)} and {tuple(embedding.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"tied_cross_entropy: targets {tuple(targets.shape)} must be hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"tied_cross_entropy: targets must be integer ids, got {targets.dtype}")
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"tied_cross_entropy: mask {tuple(mask.shape)} must match targets {tuple(targets.shape)}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"tied_cross_entropy: chunk_tokens must be positive, got {chunk_tokens}")
    V, D = embedding.shape
    t = targets.reshape(-1).long()
    if mask is not None:
        t = t.masked_fill(~mask.reshape(-1), IGNORE)
    if t.device.type == "cpu" and t.numel():  # on CUDA the gather asserts on the device instead (no sync)
        bad = (t != IGNORE) & ((t < 0) | (t >= V))
        if bool(bad.any()):
            raise ValueError(f"tied_cross_entropy: target id {int(t[bad][0])} out of range [0, {V})")
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // V)
    round_to, gemm, acc = _gemm_dtypes(hidden, embedding)
    return _TiedCrossEntropy.apply(hidden.reshape(-1, D), embedding, t, soft_cap, chunk, round_to, gemm, acc)
