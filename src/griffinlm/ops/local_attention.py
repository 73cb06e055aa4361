"""Causal attention over a full sequence, global or sliding-window, document-aware.

`causal_attention` is the single entry point the model's attention layer calls for
full-sequence (training / prefill without cache) attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention_reference import attention_mask


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
    q_doc_start: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Causal multi-query attention with an optional sliding window.

    Args:
        q: (B, H, T, hd); k, v: (B, Hkv, T, hd) with Hkv dividing H (1 for MQA).
        window: keys visible per query, including itself; None for global causal attention.
        q_doc_start: optional (B, T) absolute start of each query's document.
        scale: softmax scale (default hd ** -0.5).

    Returns:
        (B, H, T, hd) in q's dtype.
    """
    B, H, T, hd = q.shape
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    rep = H // k.shape[1]
    if rep > 1:
        k = k.expand(B, k.shape[1] * rep, T, hd) if k.shape[1] == 1 else k.repeat_interleave(rep, dim=1)
        v = v.expand(B, v.shape[1] * rep, T, hd) if v.shape[1] == 1 else v.repeat_interleave(rep, dim=1)
    if window is None and q_doc_start is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    pos = torch.arange(T, device=q.device)
    mask = attention_mask(pos, pos, window, q_doc_start)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
