"""The pre-norm residual block shared by all three architectures.

    x = x + Temporal(RMSNorm(x))
    x = x + MLP(RMSNorm(x))
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import GATED_ACTIVATIONS, BlockKind, ModelConfig
from ..ops.decode_step import StepRows
from .activations import MLP, GatedMLP
from .attention import AttentionCache
from .blocks import block_spec
from .norm import RMSNorm
from .positions import Positions
from .recurrent import RecurrentCache


def make_mlp(cfg: ModelConfig) -> nn.Module:
    cls = GatedMLP if cfg.mlp_activation in GATED_ACTIVATIONS else MLP
    return cls(cfg.width, cfg.resolved_mlp_hidden, cfg.mlp_activation, bias=cfg.mlp_bias,
               gelu_approximate=cfg.gelu_approximate, learnable_beta=cfg.learnable_swish_beta)


class ResidualBlock(nn.Module):
    """RMSNorm -> temporal mixing -> skip; RMSNorm -> MLP -> skip. Shapes: (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: ModelConfig, kind: BlockKind | str) -> None:
        super().__init__()
        self.kind = BlockKind(kind)
        self.temporal_norm = RMSNorm(cfg.width, cfg.norm_eps, cfg.norm_unit_offset)
        self.temporal = block_spec(self.kind).build(cfg)
        self.mlp_norm = RMSNorm(cfg.width, cfg.norm_eps, cfg.norm_unit_offset)
        self.mlp = make_mlp(cfg)

    def init_cache(self, batch: int, max_length: int, device=None,
                   dtype=torch.float32) -> AttentionCache | RecurrentCache:
        return self.temporal.init_cache(batch, max_length, device, dtype)

    def forward(self, x: torch.Tensor, pos: Positions,
                cache: AttentionCache | RecurrentCache | None = None) -> torch.Tensor:
        x = _skip(x, self.temporal(self.temporal_norm(x), pos, cache))
        return _skip(x, self.mlp(self.mlp_norm(x)))

    def step(self, x: torch.Tensor, state: AttentionCache | RecurrentCache, rows: StepRows) -> torch.Tensor:
        """One token per sequence: x (n, D) -> (n, D); row b advances pool slot rows.slots[b]."""
        x = self.temporal.step(x, state, rows, self.temporal_norm)
        return self.mlp.step(x, rows, self.mlp_norm)


def _skip(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch; without autograd written into the branch's output (a fresh tensor nothing else
    holds), which spares a (B, T, D) allocation the kernel would page-fault in again each time."""
    if not torch.is_grad_enabled() and branch.dtype == x.dtype and branch.shape == x.shape:
        return branch.add_(x)
    return x + branch
