"""Multi-query attention (Shazeer 2019), global causal or local sliding-window, with RoPE.

The cache is a preallocated buffer of key/value slots, allocated once and updated in place:
for local attention a ring of exactly the keys one query sees (`config.attention_keys`: the
`local_window` under the paper's convention, window + 1 under RecurrentGemma's), slot =
position mod slots; for global attention `max_length` slots (an error past it). Keys are
stored after RoPE. A one-token step writes its key first and then attends over the slots, so
its shapes do not depend on the position (what `torch.compile` / CUDA graphs need).
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

    k, v: (B, Hkv, S, hd), keys after RoPE. `ring` (local attention): position p lives in slot
    p % S, and S is exactly the number of keys a query sees, itself included. Otherwise
    (global attention) position p lives in slot p, at most S positions.
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

    def slot_positions_at(self, last: torch.Tensor) -> torch.Tensor:
        """(S,) position held by each slot once position `last` ((1,) long tensor) is written;
        -1 for slots not written yet. Tensor-only, so a compiled step does not specialise on it."""
        s = torch.arange(self.slots, device=self.k.device)
        pos = last - torch.remainder(last - s, self.slots) if self.ring else s
        return torch.where((pos >= 0) & (pos <= last), pos, -1)

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

    def write_at(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> None:
        """Store one token's key/value (B, Hkv, 1, hd) at `position` ((1,) long tensor), in place.
        The caller checks a global cache's capacity (a tensor index cannot raise a clear error)."""
        slot = torch.remainder(position, self.slots) if self.ring else position
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/permute batch rows: row i becomes old row index[i]. In place (same storage, so a
        captured decode step stays valid) when the batch size is unchanged."""
        k, v = self.k.index_select(0, index), self.v.index_select(0, index)
        if k.shape == self.k.shape:
            self.k.copy_(k)
            self.v.copy_(v)
        else:
            self.k, self.v = k, v

    def clone(self) -> "AttentionCache":
        return AttentionCache(self.k.clone(), self.v.clone(), self.ring)


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
            # Exactly the keys one query sees (the current one included): a step writes its key
            # before attending, and a chunk attends over [slots before it, its own keys].
            return AttentionCache.init(batch, self.window, self.num_kv_heads, self.head_dim, True, device, dtype)
        return AttentionCache.init(batch, max_length, self.num_kv_heads, self.head_dim, False, device, dtype)

    def forward(self, x: torch.Tensor, pos: Positions, cache: AttentionCache | None = None,
                offset: int | None = 0) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D).

        With a cache: T == 1 is a decoding step (`pos.abs_pos` a (1,) tensor; `offset` the
        python position to bound a global cache's slots, or None to attend over all of them,
        the static shape a compiled step needs); T > 1 is a prefill chunk at int `offset`.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = self.rope(q, pos.segment_pos)
        k = self.rope(k, pos.segment_pos)
        scale = self.head_dim ** -0.5
        if cache is not None and T == 1:
            out = self._decode_step(q, k, v, pos, cache, offset, scale)
        elif cache is None or offset == 0:
            doc = pos.doc_start if pos.packed else None
            out = causal_attention(q, k, v, self.window, doc, scale)
            if cache is not None:
                cache.write(k.to(cache.k.dtype), v.to(cache.v.dtype), 0)
        else:
            out = self._attend_with_cache(q, k, v, pos, cache, offset, scale)
            cache.write(k.to(cache.k.dtype), v.to(cache.v.dtype), offset)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def _grouped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
        """q (B, H, T, hd) against k, v (B, Hkv, S, hd) with mask (B, T, S) -> (B, H, T, hd).

        The query heads sharing a key/value head are folded into the query rows, so keys are
        read once per kv head, never copied per query head."""
        B, H, T, hd = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        rep = H // Hkv
        qg = q.reshape(B, Hkv, rep * T, hd)
        m = mask[:, None, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S) if rep > 1 else mask[:, None]
        out = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype), attn_mask=m, scale=scale)
        return out.view(B, H, T, hd)

    def _decode_step(self, q, k, v, pos: Positions, cache: AttentionCache, offset: int | None, scale: float):
        """One token: write its key/value at pos.abs_pos, then attend over the slots."""
        cache.write_at(k.to(cache.k.dtype), v.to(cache.v.dtype), pos.abs_pos)
        n = cache.slots
        if offset is not None and not cache.ring:
            n = min(offset + 1, n)  # eager: only the filled prefix (a view, no copy)
        k_pos = cache.slot_positions_at(pos.abs_pos)[:n]  # (n,)
        mask = (k_pos[None, :] >= pos.doc_start)[:, None]  # (B, 1, n): empty slots hold -1
        return self._grouped_attention(q, cache.k[:, :, :n], cache.v[:, :, :n], mask, scale)

    def _attend_with_cache(self, q, k, v, pos: Positions, cache: AttentionCache, offset: int, scale: float):
        """Queries of a chunk against the cached slots (written before it) and the chunk."""
        k_all = torch.cat([cache.k.to(k.dtype), k], dim=2)  # (B, Hkv, S + T, hd)
        v_all = torch.cat([cache.v.to(v.dtype), v], dim=2)
        k_pos = torch.cat([cache.slot_positions(offset), pos.abs_pos])  # (S + T,)
        diff = pos.abs_pos[:, None] - k_pos[None, :]  # (T, S + T)
        mask = (k_pos[None, :] >= 0) & (diff >= 0)
        if self.window is not None:
            mask = mask & (diff < self.window)
        mask = mask[None] & (k_pos[None, None, :] >= pos.doc_start[:, :, None])  # (B, T, S + T)
        return self._grouped_attention(q, k_all, v_all, mask, scale)
