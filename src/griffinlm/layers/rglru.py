"""The Real-Gated Linear Recurrent Unit (De et al. 2024, section 2.4).

    r_t = sigmoid(W_a x_t + b_a),  i_t = sigmoid(W_x x_t + b_x)
    a_t = a^(c r_t),  a = sigmoid(Lambda),  log a_t = -c * softplus(-Lambda) * r_t
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)

Gate weights are block-diagonal (`num_blocks` blocks), so the layer shards by blocks.
The state is float32 whatever the activation dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops import block_diagonal_linear, rglru
from ..ops.lru import log_a_from_lambda
from .adapters import parameters as adapted_parameters


def lambda_init(width: int, init: str, min_rad: float = 0.9, max_rad: float = 0.999, c: float = 8.0) -> torch.Tensor:
    """Initial Lambda (D,) such that a = sigmoid(Lambda) is drawn as named.

    "paper": a^c uniform in [min_rad, max_rad] (the Griffin paper).
    "recurrentgemma": a uniform in a^2 over [min_rad^2, max_rad^2] (RecurrentGemma's code).
    """
    if init == "paper":
        a = torch.empty(width).uniform_(min_rad, max_rad) ** (1.0 / c)
    elif init == "recurrentgemma":
        a = torch.empty(width).uniform_(min_rad**2, max_rad**2).sqrt()
    else:
        raise ValueError(f"unknown RG-LRU init {init!r}; expected 'paper' or 'recurrentgemma'")
    return torch.log(a) - torch.log1p(-a)  # logit(a)


class RGLRU(nn.Module):
    """RG-LRU over width D with block-diagonal gates. Shapes: x (B, T, D) -> y (B, T, D) (float32 on
    CPU; x's dtype from the fused CUDA kernel, which keeps its state in float32)."""

    def __init__(self, width: int, num_blocks: int, c: float = 8.0, init: str = "paper",
                 min_rad: float = 0.9, max_rad: float = 0.999, unscaled_reset: bool = False) -> None:
        super().__init__()
        if width % num_blocks:
            raise ValueError(f"RG-LRU width {width} must be divisible by num_blocks {num_blocks}")
        self.width, self.num_blocks, self.c = width, num_blocks, c
        self.init, self.min_rad, self.max_rad, self.unscaled_reset = init, min_rad, max_rad, unscaled_reset
        bw = width // num_blocks
        self.gate_r_weight = nn.Parameter(torch.empty(num_blocks, bw, bw))
        self.gate_r_bias = nn.Parameter(torch.zeros(num_blocks, bw))
        self.gate_i_weight = nn.Parameter(torch.empty(num_blocks, bw, bw))
        self.gate_i_bias = nn.Parameter(torch.zeros(num_blocks, bw))
        self.lambda_ = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bw = self.width // self.num_blocks
        nn.init.normal_(self.gate_r_weight, std=1.0 / math.sqrt(bw))
        nn.init.normal_(self.gate_i_weight, std=1.0 / math.sqrt(bw))
        nn.init.zeros_(self.gate_r_bias)
        nn.init.zeros_(self.gate_i_bias)
        with torch.no_grad():
            self.lambda_.copy_(lambda_init(self.width, self.init, self.min_rad, self.max_rad, self.c))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block-diagonal gate logits (..., D) for the recurrence and input gates."""
        r, i = block_diagonal_linear(x, [self.gate_r_weight, self.gate_i_weight], [self.gate_r_bias, self.gate_i_bias])
        return r, i

    def op_args(self, wrapped: nn.Module | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, bool]:
        """(gate_r_weight, gate_r_bias, gate_i_weight, gate_i_bias, lambda_, c, unscaled_reset): this
        layer as the arguments of the fused decoding op `ops.recurrent_step`. `wrapped`: the peft
        wrapper around this layer (LoRA on the gate weights), whose updates are then added."""
        names = ("gate_r_weight", "gate_r_bias", "gate_i_weight", "gate_i_bias", "lambda_")
        return (*adapted_parameters(self if wrapped is None else wrapped, names), self.c, self.unscaled_reset)

    def log_a(self) -> torch.Tensor:
        """(D,) log sigmoid(Lambda) = -softplus(-Lambda), in float32."""
        return log_a_from_lambda(self.lambda_)

    def forward(self, x: torch.Tensor, reset: torch.Tensor | None = None,
                h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D); reset: (B, T) bool document starts; h0: (B, D) float32 state.

        Returns y (B, T, D) (float32; x's dtype on the CUDA kernel) and the last state (B, D) float32.
        """
        gate_r, gate_i = self.gates(x)
        return rglru(x, gate_r, gate_i, self.log_a(), self.c, reset, h0, self.unscaled_reset)
