"""Multi-query attention (Shazeer 2019), global causal or local sliding-window, with RoPE.

The cache holds, for every sequence slot of the pool, a preallocated buffer of key/value
entries, allocated once and updated in place: for local attention a ring of exactly the keys
one query sees (`config.attention_keys`: `local_window` keys as `transformers`' RecurrentGemma
counts them, window + 1 as DeepMind's recurrentgemma code does), entry = position mod entries; for global attention
`max_length` entries (an error past it). Keys are stored after RoPE. The one-token `step`
writes its key first and then attends over the entries, with shapes that do not depend on
the positions (what `torch.compile` / CUDA graphs need).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops import causal_attention
from ..ops.decode_step import KernelViews, StepRows, attention_step
from ..ops.attention import grouped_attention
from .adapters import linear_parameters
from .linear import Linear
from .norm import RMSNorm
from .positions import Positions
from .state import SlotState, StepArgs
from .rotary import RotaryEmbedding


@dataclass
class AttentionCache(SlotState):
    """Key/value entries of one attention block for every sequence slot of the pool.

    k, v: (N, Hkv, S, hd), keys after RoPE, for N sequence slots. `ring` (local attention):
    position p lives in entry p % S, and S is exactly the number of keys a query sees, itself
    included. Otherwise (global attention) position p lives in entry p, at most S positions.
    """

    k: torch.Tensor
    v: torch.Tensor
    ring: bool

    @classmethod
    def init(cls, batch: int, entries: int, kv_heads: int, head_dim: int, ring: bool,
             device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> "AttentionCache":
        shape = (batch, kv_heads, entries, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype), ring)

    @property
    def entries(self) -> int:
        """Key/value entries per sequence slot (S)."""
        return self.k.shape[2]

    def entry_positions(self, length: int) -> torch.Tensor:
        """(S,) absolute position held by each entry after `length` tokens (-1 if empty)."""
        s = torch.arange(self.entries, device=self.k.device)
        if not self.ring:
            return torch.where(s < length, s, -1)
        pos = length - 1 - torch.remainder(length - 1 - s, self.entries)
        return torch.where(pos >= 0, pos, -1)

    def write(self, k: torch.Tensor, v: torch.Tensor, offset: int) -> None:
        """Store a chunk's keys/values (B, Hkv, T, hd) for positions offset .. offset+T-1."""
        T = k.shape[2]
        if not self.ring:
            if offset + T > self.entries:
                raise ValueError(
                    f"global attention cache holds {self.entries} positions but the sequence reached "
                    f"{offset + T}; pass a larger max_length to init_cache"
                )
            self.k[:, :, offset : offset + T] = k
            self.v[:, :, offset : offset + T] = v
            return
        keep = min(T, self.entries)  # older tokens of a long chunk would be overwritten anyway
        idx = torch.remainder(torch.arange(offset + T - keep, offset + T, device=k.device), self.entries)
        self.k.index_copy_(2, idx, k[:, :, T - keep :])
        self.v.index_copy_(2, idx, v[:, :, T - keep :])


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
        self.q_proj = Linear(width, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(width, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(width, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(num_heads * head_dim, width, bias=out_bias)
        self.rope = RotaryEmbedding(head_dim, rope_fraction, rope_base, rope_pairing)
        self.step_args, self.step_views = StepArgs(), KernelViews()  # memos of the step's arguments

    def init_cache(self, batch: int, max_length: int, device=None, dtype=torch.float32) -> AttentionCache:
        if self.window is not None:
            # Exactly the keys one query sees (the current one included): a step writes its key
            # before attending, and a chunk attends over [entries before it, its own keys].
            return AttentionCache.init(batch, self.window, self.num_kv_heads, self.head_dim, True, device, dtype)
        return AttentionCache.init(batch, max_length, self.num_kv_heads, self.head_dim, False, device, dtype)

    def forward(self, x: torch.Tensor, pos: Positions, cache: AttentionCache | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); with a cache, a chunk of T tokens after `pos.offset` cached
        ones (every row at the same offset), whose keys/values are then written to the cache."""
        offset = pos.offset
        B, T, _ = x.shape
        # Head counts come from the projections' outputs (-1), not from attributes: a tensor-parallel
        # rank holds a slice of the heads and the layer never needs to be told how many.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q = self.rope(q, pos.segment_pos)
        k = self.rope(k, pos.segment_pos)
        scale = self.head_dim ** -0.5
        if cache is None or offset == 0:
            doc = pos.doc_start if pos.packed else None
            out = causal_attention(q, k, v, self.window, doc, scale)
            if cache is not None:
                cache.write(k.to(cache.k.dtype), v.to(cache.v.dtype), 0)
        else:
            out = self._attend_with_cache(q, k, v, pos, cache, offset, scale)
            cache.write(k.to(cache.k.dtype), v.to(cache.v.dtype), offset)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _attend_with_cache(self, q, k, v, pos: Positions, cache: AttentionCache, offset: int, scale: float):
        """Queries of a chunk against the cached entries (written before it) and the chunk."""
        k_all = torch.cat([cache.k.to(k.dtype), k], dim=2)  # (B, Hkv, S + T, hd)
        v_all = torch.cat([cache.v.to(v.dtype), v], dim=2)
        k_pos = torch.cat([cache.entry_positions(offset), pos.abs_pos])  # (S + T,)
        diff = pos.abs_pos[:, None] - k_pos[None, :]  # (T, S + T)
        mask = (k_pos[None, :] >= 0) & (diff >= 0)
        if self.window is not None:
            mask = mask & (diff < self.window)
        mask = mask[None] & (k_pos[None, None, :] >= pos.doc_start[:, :, None])  # (B, T, S + T)
        return grouped_attention(q, k_all, v_all, mask[:, None], scale)

    def step(self, x: torch.Tensor, state: AttentionCache, rows: StepRows, norm: RMSNorm) -> torch.Tensor:
        """One token per sequence: x (n, D) residual stream -> x + attention(norm(x)) (n, D).

        Row b writes its key/value into slot rows.slots[b] of the pool `state` at position
        rows.pos[b], then attends over that slot's keys of its document (from rows.doc_start[b])."""
        if (out := self.step_views.run(x, rows, state.k, state.v)) is not None:
            return out  # the fused op's bound call: nothing changed since the last token
        args = self.step_args.get(lambda: (
            norm.op_args(), *map(linear_parameters, (self.q_proj, self.k_proj, self.v_proj, self.o_proj)),
            self.num_heads, self.rope.op_args()), rows.unchanged)
        return attention_step(x, *args, state.k, state.v, state.ring, rows, self.step_views)
