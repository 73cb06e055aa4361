"""Causal depthwise temporal convolution (the Conv1D of the recurrent block).

    y_t = bias + sum_{j=0}^{W-1} weight[W-1-j] * x_{t-j}

`weight` is time-major (W, C): weight[W-1] multiplies the current token. Inputs before a
token's document start count as zeros. The decoding state is the last W-1 inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .positions import Positions


class Conv1D(nn.Module):
    """Depthwise causal convolution over time. Shapes: (B, T, C) -> (B, T, C)."""

    def __init__(self, channels: int, width: int = 4, bias: bool = True) -> None:
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.randn(width, channels) / math.sqrt(width))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """(B, W-1, C) zeros: the inputs before the stream starts."""
        return torch.zeros(batch, self.width - 1, self.weight.shape[1], device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, pos: Positions,
                state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C); state: optional (B, W-1, C) previous inputs. Returns y and the new state."""
        B, T, C = x.shape
        W = self.width
        if state is None and not pos.packed:
            # One fused call when nothing is masked: conv1d with left zero padding.
            w = self.weight.t()[:, None, :].to(x.dtype)  # (C, 1, W); conv1d correlates, so w[..., W-1] hits x_t
            y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), w, groups=C).transpose(1, 2)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            return y, None
        if state is not None and T == 1:
            return self._step(x, pos, state)
        prev = state.to(x.dtype) if state is not None else x.new_zeros(B, W - 1, C)
        xp = torch.cat([prev, x], dim=1)  # (B, W-1+T, C): xp[:, W-1+t] = x_t
        y = x * self.weight[W - 1].to(x.dtype)
        for j in range(1, W):
            lagged = xp[:, W - 1 - j : W - 1 - j + T]  # x_{t-j}
            visible = (pos.abs_pos[None, :] - j) >= pos.doc_start  # (B, T): x_{t-j} in t's document
            y = y + lagged * visible[..., None].to(x.dtype) * self.weight[W - 1 - j].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        new_state = xp[:, -(W - 1):] if state is not None and W > 1 else None
        return y, new_state

    def _step(self, x: torch.Tensor, pos: Positions, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding token: x (B, 1, C), state (B, W-1, C) -> y (B, 1, C), new state (B, W-1, C).

        A handful of ops whatever W (the per-lag loop above costs ~5 ops per lag per layer);
        `pos.abs_pos` may be a tensor, so a compiled step does not specialise on the position."""
        W = self.width
        xp = torch.cat([state.to(x.dtype), x], dim=1)  # (B, W, C): xp[:, W-1-j] = x_{t-j}
        lags = torch.arange(W - 1, -1, -1, device=x.device)  # lag of each row of xp
        visible = (pos.abs_pos[:, None] - lags[None, :]) >= pos.doc_start  # (B, W)
        w = self.weight.to(x.dtype)[None] * visible[..., None].to(x.dtype)  # (B, W, C)
        y = (xp * w).sum(dim=1, keepdim=True)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y, xp[:, 1:]
