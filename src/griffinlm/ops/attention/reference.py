"""Dense masked reference for causal (optionally sliding-window, document-aware) attention.

Builds the full (T_q, T_k) mask, so memory is quadratic: the blocked kernel in
`attention/__init__.py` is tested against this.
"""
from __future__ import annotations

import math

import torch


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
    q_doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, T_q, T_k): True where query may attend to key.

    Args:
        q_pos: (T_q,) absolute stream position of each query.
        k_pos: (T_k,) absolute stream position of each key.
        window: number of keys a query sees including itself (None: unbounded, global causal).
        q_doc_start: optional (B, T_q) absolute position where each query's document starts;
            keys before it are hidden (documents packed in one row never see each other).
    """
    diff = q_pos[:, None] - k_pos[None, :]  # (T_q, T_k)
    mask = diff >= 0
    if window is not None:
        mask = mask & (diff < window)
    mask = mask[None]
    if q_doc_start is not None:
        mask = mask & (k_pos[None, None, :] >= q_doc_start[:, :, None])
    return mask


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
    q_doc_start: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention in float32 with the dense mask of `attention_mask`.

    Args:
        q: (B, H, T, hd) queries; k, v: (B, Hkv, T, hd) keys/values (Hkv divides H; 1 for MQA).
        window: keys visible per query including itself, or None for global causal attention.
        q_doc_start: optional (B, T) document start positions (see `attention_mask`).
        scale: softmax scale, default hd ** -0.5.

    Returns:
        (B, H, T, hd) in q's dtype.
    """
    B, H, T, hd = q.shape
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    pos = torch.arange(T, device=q.device)
    mask = attention_mask(pos, pos, window, q_doc_start)[:, None]  # (B|1, 1, T, T)
    rep = H // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), kf) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, vf).to(q.dtype)
