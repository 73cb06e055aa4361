"""The pre-norm residual block shared by all three architectures.

    x = x + Temporal(RMSNorm(x))
    x = x + MLP(RMSNorm(x))
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import GATED_ACTIVATIONS, ModelConfig
from ..ops.decode_step import StepRows
from .activations import MLP, GatedMLP
from .attention import AttentionCache, MultiQueryAttention
from .norm import RMSNorm
from .positions import Positions
from .recurrent import RecurrentBlock, RecurrentCache


def make_mlp(cfg: ModelConfig) -> nn.Module:
    cls = GatedMLP if cfg.mlp_activation in GATED_ACTIVATIONS else MLP
    return cls(cfg.width, cfg.resolved_mlp_hidden, cfg.mlp_activation, bias=cfg.mlp_bias,
               gelu_approximate=cfg.gelu_approximate, learnable_beta=cfg.learnable_swish_beta)


def make_temporal(cfg: ModelConfig, kind: str) -> nn.Module:
    if kind == "recurrent":
        return RecurrentBlock(
            cfg.width, cfg.resolved_lru_width, cfg.resolved_lru_blocks, cfg.conv_width,
            bias=cfg.recurrent_bias, conv_bias=cfg.conv_bias, gelu_approximate=cfg.gelu_approximate,
            lru_c=cfg.lru_c, lru_init=cfg.lru_init, min_rad=cfg.lru_min_rad, max_rad=cfg.lru_max_rad,
            unscaled_reset=cfg.lru_unscaled_reset,
        )
    return MultiQueryAttention(
        cfg.width, cfg.num_heads, cfg.resolved_head_dim, cfg.num_kv_heads,
        window=cfg.attention_keys if kind == "attention" else None,
        rope_fraction=cfg.rope_fraction, rope_base=cfg.rope_base, rope_pairing=cfg.rope_pairing,
        qkv_bias=cfg.attention_qkv_bias, out_bias=cfg.attention_out_bias,
    )


class ResidualBlock(nn.Module):
    """RMSNorm -> temporal mixing -> skip; RMSNorm -> MLP -> skip. Shapes: (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: ModelConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.temporal_norm = RMSNorm(cfg.width, cfg.norm_eps, cfg.norm_unit_offset)
        self.temporal = make_temporal(cfg, kind)
        self.mlp_norm = RMSNorm(cfg.width, cfg.norm_eps, cfg.norm_unit_offset)
        self.mlp = make_mlp(cfg)

    def init_cache(self, batch: int, max_length: int, device=None,
                   dtype=torch.float32) -> AttentionCache | RecurrentCache:
        if self.kind == "recurrent":
            return self.temporal.init_cache(batch, device, dtype)
        return self.temporal.init_cache(batch, max_length, device, dtype)

    def forward(self, x: torch.Tensor, pos: Positions,
                cache: AttentionCache | RecurrentCache | None = None, offset: int = 0) -> torch.Tensor:
        x = _skip(x, self.temporal(self.temporal_norm(x), pos, cache, offset))
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
