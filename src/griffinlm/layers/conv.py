"""Causal depthwise temporal convolution (the Conv1D of the recurrent block).

    y_t = bias + sum_{j=0}^{W-1} weight[W-1-j] * x_{t-j}

`weight` is time-major (W, C): weight[W-1] multiplies the current token. Inputs before a
token's document start count as zeros. The decoding state is the last W-1 inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.conv import causal_conv1d
from .positions import Positions


class Conv1D(nn.Module):
    """Depthwise causal convolution over time. Shapes: (B, T, C) -> (B, T, C)."""

    def __init__(self, channels: int, width: int = 4, bias: bool = True, init_std: float | None = None) -> None:
        super().__init__()
        self.width = width
        # N(0, init_std^2), default 1 / sqrt(width): a unit-gain filter at init
        self.weight = nn.Parameter(torch.randn(width, channels) * (init_std or 1.0 / math.sqrt(width)))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """(B, W-1, C) zeros: the inputs before the stream starts."""
        return torch.zeros(batch, self.width - 1, self.weight.shape[1], device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, pos: Positions,
                state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C); state: optional (B, W-1, C) previous inputs. Returns y and the new state."""
        T, W = x.shape[1], self.width
        lags = pos.abs_pos[None] - pos.doc_start if pos.packed else None  # (B, T) inputs each token sees
        y = causal_conv1d(x, self.weight, self.bias, lags, state)
        if state is None:
            return y, None
        # the last W-1 inputs, reaching into the old state when the chunk is shorter
        new_state = torch.cat([state.to(x.dtype), x], dim=1)[:, T:] if T < W - 1 else x[:, T - (W - 1):]
        return y, new_state

    def op_args(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias): this convolution as the arguments of the decoding ops."""
        return self.weight, self.bias
