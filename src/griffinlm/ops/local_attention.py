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
# P + block for block queries), larger ones amortise per-block overhead. On CPU (2 threads,
# head dim 128) 64 was within ~5 % of the best of 32..256 for windows 128..2048 at T up to
# 16384, and 1.2x faster than 256 for window 512 (`benchmarks/layers.py`).
DEFAULT_BLOCK = 64


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
    mask = _block_mask(n_blocks, block, P, window, q_doc_start, T, q.dtype, q.device)
    if q_doc_start is None and B > 1:
        mask = mask.repeat(B, 1, 1, 1)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
    # (B, H, T, hd) as a view of a (B, T, H, hd) tensor: the layer's output projection wants
    # tokens-major rows, so the transpose back to them is then free.
    out = out.view(B, n_blocks, H, block, hd).transpose(2, 3).reshape(B, Tp, H, hd)
    return out[:, :T].transpose(1, 2)


def _block_mask(
    n_blocks: int, block: int, P: int, window: int, q_doc_start: torch.Tensor | None, T: int,
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """(B * n_blocks or n_blocks, 1, block, P + block) mask of the blocked path.

    Without documents every block past the first P / block has the same (block, span) pattern,
    so only those first blocks (keys before position 0) are computed; the mask is additive
    (0 / -inf) in the query dtype because SDPA's CPU kernel converts a bool mask to that anyway,
    and building a (T, span) mask elementwise from int64 positions cost ~15 % of the attention."""
    span = P + block
    q_in = torch.arange(block, device=device).view(block, 1)
    diff = q_in + P - torch.arange(span, device=device).view(1, span)  # query - key, same in every block
    pattern = (diff >= 0) & (diff < window)  # (block, span)
    if q_doc_start is None:
        n_head = min(P // block, n_blocks)  # blocks whose span starts before position 0
        k_pos = (torch.arange(n_head, device=device) * block - P).view(n_head, 1, 1) + torch.arange(
            span, device=device).view(1, 1, span)
        head = pattern & (k_pos >= 0)  # (n_head, block, span)
        visible = torch.cat([head, pattern.expand(n_blocks - n_head, block, span)])
        add = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        return add[:, None]
    B = q_doc_start.shape[0]
    k_pos = (torch.arange(n_blocks, device=device) * block).view(n_blocks, 1, 1) - P + torch.arange(
        span, device=device).view(1, 1, span)
    ds = F.pad(q_doc_start, (0, n_blocks * block - T)).view(B, n_blocks, block, 1)
    mask = (pattern & (k_pos >= 0))[None] & (k_pos[None] >= ds)  # (B, n_blocks, block, span)
    return mask.reshape(B * n_blocks, 1, block, span)


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
