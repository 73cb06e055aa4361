"""Causal attention over a full sequence, global or sliding-window, document-aware.

`causal_attention` is the single entry point the model's attention layer calls for
full-sequence (training / prefill without cache) attention.

Sliding-window attention is computed blockwise, never with a T x T mask: queries are cut
into blocks of `block` positions; block j (positions [j*block, (j+1)*block)) attends to the
span of keys [j*block - P, (j+1)*block) with P = window - 1 rounded up to a multiple of
block, which holds every key any of its queries may see. All blocks go through one batched
`scaled_dot_product_attention` call with a (block, P + block) mask, so time and memory grow
as T * (window + block), not T^2. The dense masked reference is `attention_reference.py`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention_reference import attention_mask

# Query block length cap: smaller blocks waste less on masked-out keys (the span is
# P + block for block queries), larger ones amortise per-block overhead. Measured best
# around 256 for window 1024 on CPU (see BENCHMARKS.md).
DEFAULT_BLOCK = 256


def _expand_kv(k: torch.Tensor, rep: int) -> torch.Tensor:
    if rep == 1:
        return k
    B, Hkv, T, hd = k.shape
    return k.expand(B, rep, T, hd) if Hkv == 1 else k.repeat_interleave(rep, dim=1)


def _blocked_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
    q_doc_start: torch.Tensor | None, scale: float, block: int,
) -> torch.Tensor:
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    block = max(1, min(block, window, T))
    P = -(-(window - 1) // block) * block  # keys before the block, whole blocks
    n_blocks = -(-T // block)
    Tp = n_blocks * block
    # Pad queries/keys at the end to whole blocks (padded queries see themselves, never a
    # fully masked row) and keys at the front by P (masked: position < 0).
    qp = F.pad(q, (0, 0, 0, Tp - T))
    kp = F.pad(k, (0, 0, P, Tp - T))
    vp = F.pad(v, (0, 0, P, Tp - T))
    span = P + block
    rep = H // Hkv
    # One SDPA call over (B * n_blocks) "batches" of 4-D tensors: measured ~1.5-2x faster on
    # CPU than 5-D inputs or heads folded into rows (SDPA's fused CPU kernel takes this form).
    qb = qp.view(B, H, n_blocks, block, hd).transpose(1, 2).reshape(B * n_blocks, H, block, hd)

    def key_blocks(t: torch.Tensor) -> torch.Tensor:  # (B, Hkv, P + Tp, hd) -> (B*nb, H, span, hd)
        tb = t.unfold(2, span, block).permute(0, 2, 1, 4, 3).reshape(B * n_blocks, Hkv, 1, span, hd)
        return tb.expand(-1, -1, rep, -1, -1).reshape(B * n_blocks, H, span, hd) if rep > 1 else tb[:, :, 0]

    kb, vb = key_blocks(kp), key_blocks(vp)
    q_pos = torch.arange(Tp, device=q.device).view(n_blocks, block, 1)
    k_pos = (torch.arange(n_blocks, device=q.device) * block).view(n_blocks, 1, 1) - P + torch.arange(
        span, device=q.device).view(1, 1, span)
    diff = q_pos - k_pos  # (n_blocks, block, span)
    mask = (diff >= 0) & (diff < window) & (k_pos >= 0)
    if q_doc_start is not None:
        ds = F.pad(q_doc_start, (0, Tp - T)).view(B, n_blocks, block, 1)
        mask = mask[None] & (k_pos[None] >= ds)  # (B, n_blocks, block, span)
    else:
        mask = mask[None].expand(B, n_blocks, block, span)
    mask = mask.reshape(B * n_blocks, 1, block, span)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
    out = out.view(B, n_blocks, H, block, hd).transpose(1, 2).reshape(B, H, Tp, hd)
    return out[:, :, :T]


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
    q_doc_start: torch.Tensor | None = None, scale: float | None = None,
    *, block: int = DEFAULT_BLOCK, impl: str | None = None,
) -> torch.Tensor:
    """Causal multi-query attention with an optional sliding window.

    Args:
        q: (B, H, T, hd); k, v: (B, Hkv, T, hd) with Hkv dividing H (1 for MQA).
        window: keys visible per query, including itself; None for global causal attention.
        q_doc_start: optional (B, T) absolute start of each query's document.
        scale: softmax scale (default hd ** -0.5).
        block: query block length of the blocked sliding-window path.
        impl: "blocked" or "dense" (the T x T masked SDPA) to force a path; None picks:
            blocked for window < T, else SDPA with is_causal (or the dense mask with documents).

    Returns:
        (B, H, T, hd) in q's dtype.
    """
    B, H, T, hd = q.shape
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    local = window is not None and window < T
    if impl is None:
        impl = "blocked" if local else "dense"
    if impl == "blocked" and window is not None:
        return _blocked_local_attention(q, k, v, window, q_doc_start, scale, block)
    if impl not in ("blocked", "dense"):
        raise ValueError(f"causal_attention: unknown impl {impl!r}")
    rep = H // k.shape[1]
    k, v = _expand_kv(k, rep), _expand_kv(v, rep)
    if not local and q_doc_start is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    pos = torch.arange(T, device=q.device)
    mask = attention_mask(pos, pos, window, q_doc_start)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
