"""Causal attention over a full sequence, global or sliding-window, document-aware.

`causal_attention` is the single entry point the model's attention layer calls for
full-sequence (training / prefill without cache) attention.

Sliding-window attention is computed blockwise, never with a T x T mask: queries are cut
into blocks of `block` positions; block j (positions [j*block, (j+1)*block)) attends to the
span of keys [j*block - P, (j+1)*block) with P = window - 1 rounded up to a multiple of
block, which holds every key any of its queries may see. The blocks go through batched
`scaled_dot_product_attention` calls (query heads sharing a kv head folded into the rows),
masked with one (block, P + block) pattern shared by every block past the first window (and
per-block masks for the first blocks, or for all of them with documents), so time and memory
grow as T * (window + block), not T^2. On CUDA, local attention goes through flex_attention
instead (`attention/flex.py`: a sliding-window and document BlockMask, no K/V copies, no float
mask). The dense masked reference is `attention/reference.py`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import attention_mask

# Query block length: smaller blocks waste less on masked-out keys (the span is P + block
# for block queries), larger ones amortise per-block overhead. With one kv head the query
# heads fold into the rows (H * block of them), so MQA wants shorter blocks. Chosen from
# `python benchmarks/layers.py --block-sweep` (CPU, 2 threads, head dim 128, two runs): with
# MQA 32 was the best of 32..256 or within 7 % of it for windows 128..2048; with more kv
# heads 128 was within 15 % (64 within 22 %, 256 within 26 %).
MQA_BLOCK, MHA_BLOCK = 32, 128


def training_block(window: int) -> int:
    """Query block length when autograd records the call. The backward pays per block what the
    forward does not (a key-block gradient per unfolded copy, SDPA's backward on short rows), so
    longer blocks win: window / 4 clamped to [64, 256] was the best block of every training shape
    `python benchmarks/layers.py --block-sweep --backward` timed (MQA, GQA, MHA; windows
    128..2048; head dims 64 and 128; BENCHMARKS.md, Kernels)."""
    return min(256, max(64, window // 4))


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q (B, H, T, hd) against k, v (B, Hkv, S, hd) with a boolean mask (B, 1, T, S) (True:
    visible) -> (B, H, T, hd). The query heads sharing a key/value head are folded into the
    query rows, so keys are read once per kv head, never copied per query head."""
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    qg = q.reshape(B, Hkv, rep * T, hd)
    if rep > 1:
        mask = mask[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
    out = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
    return out.view(B, H, T, hd)


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
    rep = H // Hkv
    block = max(1, min(block, window, T))
    P = -(-(window - 1) // block) * block  # keys before the block, whole blocks
    n_blocks = -(-T // block)
    Tp = n_blocks * block
    span = P + block
    # Pad queries/keys at the end to whole blocks (padded queries see themselves, never a
    # fully masked row) and keys at the front by P (masked: position < 0).
    qp = F.pad(q, (0, 0, 0, Tp - T))
    kp = F.pad(k, (0, 0, P, Tp - T))
    vp = F.pad(v, (0, 0, P, Tp - T))
    # SDPA "batches" are (block, row) pairs in block-major order, so the first blocks are one
    # slice; the query heads sharing a key/value head are folded into the rows, so each key
    # block is one (span, hd) matrix per kv head and the matmuls see rep * block rows.
    qb = qp.view(B, Hkv, rep, n_blocks, block, hd).permute(3, 0, 1, 2, 4, 5).reshape(
        n_blocks * B, Hkv, rep * block, hd)
    kb, vb = (t.unfold(2, span, block).permute(2, 0, 1, 4, 3).reshape(n_blocks * B, Hkv, span, hd)
              for t in (kp, vp))
    pattern = _window_pattern(block, P, window, q.dtype, q.device)  # (block, span), 0 / -inf
    if q_doc_start is None:
        # Past the first P / block blocks every block has the same mask: one broadcast
        # pattern, nothing (T, span)-sized is built; the first blocks also hide keys before 0.
        n_head = min(P // block, n_blocks) * B
        parts = []
        if n_head:
            parts.append(_unfolded_sdpa(qb[:n_head], kb[:n_head], vb[:n_head],
                                        _head_mask(pattern, n_head // B, block, P, B), scale))
        if n_head < n_blocks * B:
            parts.append(F.scaled_dot_product_attention(qb[n_head:], kb[n_head:], vb[n_head:],
                                                        attn_mask=pattern.repeat(rep, 1), scale=scale))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
    else:
        out = _unfolded_sdpa(qb, kb, vb, _doc_mask(pattern, q_doc_start, n_blocks, block, P, T), scale)
    # (B, H, T, hd) as a view of a (B, T, H, hd) tensor: the layer's output projection wants
    # tokens-major rows, so the transpose back to them is then free.
    out = out.view(n_blocks, B, Hkv, rep, block, hd).permute(1, 0, 4, 2, 3, 5).reshape(B, Tp, H, hd)
    return out[:, :T].transpose(1, 2)


def _unfolded_sdpa(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, mask: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """SDPA of folded blocks (N, Hkv, rep * block, hd) vs (N, Hkv, span, hd) with a per-block
    (N, 1, block, span) mask: heads unfolded so the mask need not be repeated per head."""
    N, Hkv, rows, hd = qb.shape
    block, span = mask.shape[-2], kb.shape[2]
    rep = rows // block
    q = qb.reshape(N, Hkv * rep, block, hd)
    k, v = (t[:, :, None].expand(N, Hkv, rep, span, hd).reshape(N, Hkv * rep, span, hd) for t in (kb, vb))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).view(N, Hkv, rows, hd)


def _window_pattern(block: int, P: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(block, P + block) additive mask (0 visible, -inf hidden) of query i against key j of its
    span: the same in every block. Additive in the query dtype because SDPA's CPU kernel
    converts a bool mask to that anyway."""
    diff = torch.arange(block, device=device).view(block, 1) + P - torch.arange(P + block, device=device)
    visible = (diff >= 0) & (diff < window)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


def _head_mask(pattern: torch.Tensor, n_head: int, block: int, P: int, B: int) -> torch.Tensor:
    """(n_head * B, 1, block, span) mask of the first blocks, whose spans start before key 0."""
    span = pattern.shape[1]
    k_pos = (torch.arange(n_head, device=pattern.device) * block - P).view(n_head, 1, 1) + torch.arange(
        span, device=pattern.device)
    mask = pattern.masked_fill(k_pos < 0, float("-inf"))  # (n_head, block, span)
    return mask.repeat_interleave(B, dim=0)[:, None]


def _doc_mask(pattern: torch.Tensor, q_doc_start: torch.Tensor, n_blocks: int, block: int, P: int,
              T: int) -> torch.Tensor:
    """(n_blocks * B, 1, block, span) mask with documents: keys before each query's document
    start (and before position 0) hidden too."""
    B = q_doc_start.shape[0]
    span = pattern.shape[1]
    device = pattern.device
    k_pos = (torch.arange(n_blocks, device=device) * block - P).view(n_blocks, 1, 1, 1) + torch.arange(
        span, device=device)  # (nb, 1, 1, span)
    ds = F.pad(q_doc_start, (0, n_blocks * block - T)).view(B, n_blocks, block, 1).transpose(0, 1)  # (nb, B, block, 1)
    mask = pattern.masked_fill((k_pos < 0) | (k_pos < ds), float("-inf"))  # (nb, B, block, span)
    return mask.reshape(n_blocks * B, 1, block, span)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
    q_doc_start: torch.Tensor | None = None, scale: float | None = None,
    *, block: int | None = None, impl: str | None = None,
) -> torch.Tensor:
    """Causal multi-query attention with an optional sliding window.

    Args:
        q: (B, H, T, hd); k, v: (B, Hkv, T, hd) with Hkv dividing H (1 for MQA).
        window: keys visible per query, including itself; None for global causal attention.
        q_doc_start: optional (B, T) absolute start of each query's document.
        scale: softmax scale (default hd ** -0.5).
        block: query block length of the blocked sliding-window path (None: `training_block`
            when autograd records the call, else MQA_BLOCK with one kv head, MHA_BLOCK otherwise).
        impl: "flex" (`attention/flex.py`; compiled on CUDA, flex_attention's eager math
            path elsewhere), "blocked" or "dense" (the T x T masked SDPA) to force a path; None
            picks: for window < T flex on CUDA, blocked elsewhere; else SDPA with is_causal (or
            the dense mask with documents).

    Returns:
        (B, H, T, hd) in q's dtype.
    """
    B, H, T, hd = q.shape
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    local = window is not None and window < T
    if impl is None:
        impl = ("flex" if q.is_cuda else "blocked") if local else "dense"
    if impl == "flex" and window is not None:
        from .flex import flex_local_attention

        return flex_local_attention(q, k, v, window, q_doc_start, scale, compiled=q.is_cuda)
    if impl == "blocked" and window is not None:
        if block is None:
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                block = training_block(window)
            else:
                block = MQA_BLOCK if k.shape[1] == 1 else MHA_BLOCK
        return _blocked_local_attention(q, k, v, window, q_doc_start, scale, block)
    if impl not in ("flex", "blocked", "dense"):
        raise ValueError(f"causal_attention: unknown impl {impl!r}")
    rep = H // k.shape[1]
    k, v = _expand_kv(k, rep), _expand_kv(v, rep)
    if not local and q_doc_start is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    pos = torch.arange(T, device=q.device)
    mask = attention_mask(pos, pos, window, q_doc_start)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
