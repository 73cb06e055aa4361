"""RMSNorm (Zhang & Sennrich 2019), computed in float32 (`ops.rms_norm`: one fused op on CPU)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import rms_norm


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale, with scale = weight or (1 + weight).

    `unit_offset=True` is RecurrentGemma's parameterisation (weight initialised to 0).
    Shapes: (..., D) -> (..., D), same dtype as the input.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.unit_offset)

    def op_args(self) -> tuple[torch.Tensor, float, bool]:
        """(weight, eps, unit_offset): this norm as the trailing arguments of `ops.rms_norm`, for
        the fused decoding ops that apply it on the way into a block."""
        return self.weight, self.eps, self.unit_offset

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)
