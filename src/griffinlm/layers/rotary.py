"""Rotary position embedding (Su et al. 2021) on a configurable fraction of the head dim.

`pairing="split_half"` rotates dim i with dim i + n/2 (RecurrentGemma, GPT-NeoX);
`"interleaved"` rotates dim 2i with 2i + 1 (the original RoFormer layout).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.attention.rotary import rotary


class RotaryEmbedding(nn.Module):
    """Applies RoPE to the first `rotary_dim = fraction * head_dim` channels of q or k."""

    def __init__(self, head_dim: int, fraction: float = 1.0, base: float = 10000.0,
                 pairing: str = "split_half") -> None:
        super().__init__()
        self.rotary_dim = int(head_dim * fraction)
        self.pairing = pairing
        half = self.rotary_dim // 2
        inv_freq = base ** (-torch.arange(half, dtype=torch.float32) * 2.0 / max(self.rotary_dim, 1))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, hd); positions: (B, T) or (T,) integer positions. Returns x rotated."""
        return rotary(x, positions, *self.op_args())

    def op_args(self) -> tuple[torch.Tensor, int, bool]:
        """(inv_freq, rotary_dim, interleaved): this embedding as the arguments of `ops.rotary`."""
        return self.inv_freq, self.rotary_dim, self.pairing == "interleaved"
