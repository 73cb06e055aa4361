"""The recurrent block of Hawk and Griffin (De et al. 2024, figure 2).

    branch y: Linear(D -> D_rnn) -> GeLU
    branch x: Linear(D -> D_rnn) -> Conv1D -> RG-LRU
    out     = Linear(D_rnn -> D)(y * x)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import gated_activation
from ..ops.decode_step import KernelViews, StepRows, recurrent_step
from ..ops.linear import linear
from .activations import linear_stands_in
from .adapters import base_module, linear_parameters
from .conv import Conv1D
from .linear import Linear
from .norm import RMSNorm
from .positions import Positions
from .rglru import RGLRU
from .state import SlotState, StepArgs


@dataclass
class RecurrentCache(SlotState):
    """Decoding state of one recurrent block for N sequence slots: the conv's last inputs
    (N, W-1, D_rnn) and the RG-LRU state (N, D_rnn), float32 for any narrower model dtype
    (float64 for a float64 model, the reference)."""

    conv: torch.Tensor
    rnn: torch.Tensor

    @classmethod
    def init(cls, batch: int, lru_width: int, conv_width: int, device=None,
             dtype: torch.dtype = torch.float32) -> "RecurrentCache":
        return cls(torch.zeros(batch, conv_width - 1, lru_width, device=device, dtype=dtype),
                   torch.zeros(batch, lru_width, device=device, dtype=torch.promote_types(dtype, torch.float32)))


class RecurrentBlock(nn.Module):
    """Temporal mixing with the RG-LRU. Shapes: x (B, T, D) -> (B, T, D)."""

    def __init__(self, width: int, lru_width: int, num_blocks: int, conv_width: int = 4,
                 bias: bool = True, conv_bias: bool = True, gelu_approximate: str = "tanh",
                 lru_c: float = 8.0, lru_init: str = "paper", min_rad: float = 0.9,
                 max_rad: float = 0.999, unscaled_reset: bool = False, conv_init_std: float | None = None) -> None:
        super().__init__()
        self.lru_width, self.conv_width, self.gelu_approximate = lru_width, conv_width, gelu_approximate
        self.linear_y = Linear(width, lru_width, bias=bias)
        self.linear_x = Linear(width, lru_width, bias=bias)
        self.conv1d = Conv1D(lru_width, conv_width, bias=conv_bias, init_std=conv_init_std)
        self.rg_lru = RGLRU(lru_width, num_blocks, lru_c, lru_init, min_rad, max_rad, unscaled_reset)
        self.linear_out = Linear(lru_width, width, bias=bias)
        self.step_args, self.step_views = StepArgs(), KernelViews()  # memos of the step's arguments

    def init_cache(self, batch: int, max_length: int | None = None, device=None,
                   dtype=torch.float32) -> RecurrentCache:
        """A constant-size state whatever `max_length` (the argument every block kind takes)."""
        return RecurrentCache.init(batch, self.lru_width, self.conv_width, device, dtype)

    def forward(self, x: torch.Tensor, pos: Positions, cache: RecurrentCache | None = None) -> torch.Tensor:
        fold = self.gelu_approximate == "tanh" and linear_stands_in(self.linear_y)
        # (B, T, D_rnn) before its GeLU; with `fold` also before its bias (added in the fused op)
        y = linear(x, self.linear_y.weight) if fold else self.linear_y(x)
        u = self.linear_x(x)  # (B, T, D_rnn)
        u, conv_state = self.conv1d(u, pos, None if cache is None else cache.conv)
        h, h_last = self.rg_lru(u, pos.reset, None if cache is None else cache.rnn)
        if cache is not None:
            cache.conv.copy_(conv_state)
            cache.rnn.copy_(h_last)
        h = h.to(x.dtype)
        if self.gelu_approximate == "tanh":  # GeLU(y + bias) * h in one pass
            return self.linear_out(gated_activation(y, h, "gelu_tanh", self.linear_y.bias if fold else None))
        return self.linear_out(F.gelu(y, approximate=self.gelu_approximate) * h)

    def step(self, x: torch.Tensor, state: RecurrentCache, rows: StepRows, norm: RMSNorm) -> torch.Tensor:
        """One token per sequence: x (n, D) residual stream -> x + block(norm(x)) (n, D).

        Row b advances slot rows.slots[b] of the pool `state` from position rows.pos[b] of a
        document that starts at rows.doc_start[b] (the recurrence resets where they are equal)."""
        if (out := self.step_views.run(x, rows, state.conv, state.rnn)) is not None:
            return out  # the fused op's bound call: nothing changed since the last token
        args = self.step_args.get(lambda: (
            norm.op_args(), linear_parameters(self.linear_y), linear_parameters(self.linear_x),
            self.conv1d.op_args(), base_module(self.rg_lru).op_args(self.rg_lru), linear_parameters(self.linear_out),
            self.gelu_approximate), rows.unchanged)
        return recurrent_step(x, *args, state.conv, state.rnn, rows, self.step_views)
