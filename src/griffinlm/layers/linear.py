"""`Linear`: nn.Linear whose product runs through `ops.linear` (the fastest GEMM on this machine)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import linear


class Linear(nn.Linear):
    """nn.Linear (same parameters, initialisation and state-dict names; peft and tensor-parallel
    plans see an nn.Linear) computed by `ops.linear`. Shapes: (..., in) -> (..., out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
