"""Rotary position embedding (Su et al. 2021) on the first `rotary_dim` channels of each head.

`interleaved=False` ("split_half") rotates channel i with i + rotary_dim/2 (RecurrentGemma,
GPT-NeoX); `interleaved=True` rotates 2i with 2i + 1 (the original RoFormer layout).
"""
from __future__ import annotations

import torch


def rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
           interleaved: bool = False) -> torch.Tensor:
    """x (B, H, T, hd) rotated by angle positions * inv_freq; positions (B, T) or (T,) integer
    positions within each token's document, inv_freq (rotary_dim / 2,). Returns x's dtype; the
    rotation itself is computed in float32."""
    if rotary_dim == 0:
        return x
    pos = positions.to(torch.float32)
    if pos.dim() == 1:
        pos = pos[None]
    angles = pos[:, None, :, None] * inv_freq.to(pos.device)  # (B|1, 1, T, rotary_dim / 2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    if not interleaved:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out.to(x.dtype), rest], dim=-1)
