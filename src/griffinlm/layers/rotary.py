"""Rotary position embedding (Su et al. 2021) on a configurable fraction of the head dim.

`pairing="split_half"` rotates dim i with dim i + n/2 (RecurrentGemma, GPT-NeoX);
`"interleaved"` rotates dim 2i with 2i + 1 (the original RoFormer layout).
"""
from __future__ import annotations

import torch
import torch.nn as nn


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
        if self.rotary_dim == 0:
            return x
        pos = positions.to(torch.float32)
        if pos.dim() == 1:
            pos = pos[None]
        angles = pos[:, None, :, None] * self.inv_freq.to(pos.device)  # (B|1, 1, T, half)
        cos, sin = torch.cos(angles), torch.sin(angles)
        rot, rest = x[..., : self.rotary_dim].float(), x[..., self.rotary_dim :]
        if self.pairing == "split_half":
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        return torch.cat([out.to(x.dtype), rest], dim=-1)
