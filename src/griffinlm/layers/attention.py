"""Multi-query attention (Shazeer 2019), global causal or local sliding-window, with RoPE.

The cache is a preallocated buffer of key/value slots: a ring of the window - 1 past keys
for local attention (slot = position mod slots), or `max_length` slots for global attention
(an error past it). Keys are stored after RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import causal_attention
from .positions import Positions
from .rotary import RotaryEmbedding


@dataclass
class AttentionCache:
    """Key/value slots of one attention block.

    k, v: (B, Hkv, S, hd). `ring`: slot of position p is p % S (local attention); otherwise
    slot p (global attention, at most S positions).
    """

    k: torch.Tensor
    v: torch.Tensor
    ring: bool

    @classmethod
    def init(cls, batch: int, slots: int, kv_heads: int, head_dim: int, ring: bool,
             device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> "AttentionCache":
        shape = (batch, kv_heads, slots, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype), ring)

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def slot_positions(self, length: int) -> torch.Tensor:
        """(S,) absolute position held by each slot after `length` tokens (-1 if empty)."""
        s = torch.arange(self.slots, device=self.k.device)
        if not self.ring:
            return torch.where(s < length, s, -1)
        pos = length - 1 - torch.remainder(length - 1 - s, self.slots)
        return torch.where(pos >= 0, pos, -1)

    def write(self, k: torch.Tensor, v: torch.Tensor, offset: int) -> None:
        """Store a chunk's keys/values (B, Hkv, T, hd) for positions offset .. offset+T-1."""
        T = k.shape[2]
        if not self.ring:
            if offset + T > self.slots:
                raise ValueError(
                    f"global attention cache holds {self.slots} positions but the sequence reached "
                    f"{offset + T}; pass a larger max_length to init_cache"
                )
            self.k[:, :, offset : offset + T] = k
            self.v[:, :, offset : offset + T] = v
            return
        keep = min(T, self.slots)  # older tokens of a long chunk would be overwritten anyway
        idx = torch.remainder(torch.arange(offset + T - keep, offset + T, device=k.device), self.slots)
        self.k.index_copy_(2, idx, k[:, :, T - keep :])
        self.v.index_copy_(2, idx, v[:, :, T - keep :])

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/permute batch rows: row i becomes old row index[i]."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class MultiQueryAttention(nn.Module):
    """Attention with `num_heads` query heads and `num_kv_heads` (1: MQA) key/value heads.

    Args:
        width: model width D. window: keys visible per query incl. itself (None: global).
    Shapes: x (B, T, D) -> (B, T, D).
    """

    def __init__(self, width: int, num_heads: int, head_dim: int, num_kv_heads: int = 1,
                 window: int | None = None, rope_fraction: float = 1.0, rope_base: float = 10000.0,
                 rope_pairing: str = "split_half", qkv_bias: bool = False, out_bias: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.window = num_heads, head_dim, num_kv_heads, window
        self.q_proj = nn.Linear(width, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(width, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(width, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, width, bias=out_bias)
        self.rope = RotaryEmbedding(head_dim, rope_fraction, rope_base, rope_pairing)

    def init_cache(self, batch: int, max_length: int, device=None, dtype=torch.float32) -> AttentionCache:
        if self.window is not None:
            # The chunk's own keys are concatenated at attention time, so the ring holds only
            # the window - 1 past keys a query can see (= local_window with RecurrentGemma's
            # window + 1 convention).
            slots = max(self.window - 1, 1)
            return AttentionCache.init(batch, slots, self.num_kv_heads, self.head_dim, True, device, dtype)
        return AttentionCache.init(batch, max_length, self.num_kv_heads, self.head_dim, False, device, dtype)

    def forward(self, x: torch.Tensor, pos: Positions, cache: AttentionCache | None = None,
                offset: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = self.rope(q, pos.segment_pos)
        k = self.rope(k, pos.segment_pos)
        scale = self.head_dim ** -0.5
        if cache is None or offset == 0:
            doc = pos.doc_start if pos.packed else None
            out = causal_attention(q, k, v, self.window, doc, scale)
        else:
            out = self._attend_with_cache(q, k, v, pos, cache, offset, scale)
        if cache is not None:
            cache.write(k.to(cache.k.dtype), v.to(cache.v.dtype), offset)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def _attend_with_cache(self, q, k, v, pos: Positions, cache: AttentionCache, offset: int, scale: float):
        """Queries of this chunk against the cached slots (written before it) and the chunk."""
        k_all = torch.cat([cache.k.to(k.dtype), k], dim=2)  # (B, Hkv, S + T, hd)
        v_all = torch.cat([cache.v.to(v.dtype), v], dim=2)
        k_pos = torch.cat([cache.slot_positions(offset), pos.abs_pos])  # (S + T,)
        diff = pos.abs_pos[:, None] - k_pos[None, :]  # (T, S + T)
        mask = (k_pos[None, :] >= 0) & (diff >= 0)
        if self.window is not None:
            mask = mask & (diff < self.window)
        mask = mask[None] & (k_pos[None, None, :] >= pos.doc_start[:, :, None])  # (B, T, S + T)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k_all = k_all.repeat_interleave(rep, dim=1)
            v_all = v_all.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None], scale=scale)
