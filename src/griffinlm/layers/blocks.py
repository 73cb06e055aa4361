"""The block-kind registry: what each `BlockKind` builds, how its state behaves, what it costs and
how tensor parallelism shards it. Adding a temporal-mixing layer is its module plus one entry here;
every other place (the residual block, caches, FLOP counts, the serving engine, the TP plan and
its memory model) reads the entry instead of interpreting the kind string.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

from ..config import BlockKind, ModelConfig
from .attention import MultiQueryAttention
from .recurrent import RecurrentBlock


@dataclass(frozen=True)
class BlockSpec:
    """One block kind.

    build: the temporal-mixing module for a config (its `forward(x, pos, cache)`, `step`, and
        `init_cache(batch, max_length, device, dtype)`).
    attention_keys: for attention kinds, the keys one query sees (None: every earlier token);
        None for kinds without attention scores.
    state_grows: its decoding state grows with the sequence (sized by max_length).
    tp_layout: tensor-parallel layout of its submodules: "colwise" / "rowwise" (Megatron split
        of a Linear), "kv" (colwise, or replicated for a single key/value head), or
        ("local", {param: dim}) for parameters sharded along `dim` and used locally.
    """

    build: Callable[[ModelConfig], nn.Module]
    attention_keys: Callable[[ModelConfig], int | None] | None = None
    state_grows: bool = False
    tp_layout: dict[str, str | tuple[str, dict[str, int]]] = field(default_factory=dict)

    @property
    def is_attention(self) -> bool:
        return self.attention_keys is not None


def _recurrent(cfg: ModelConfig) -> nn.Module:
    return RecurrentBlock(
        cfg.width, cfg.resolved_lru_width, cfg.resolved_lru_blocks, cfg.conv_width,
        bias=cfg.recurrent_bias, conv_bias=cfg.conv_bias, gelu_approximate=cfg.gelu_approximate,
        lru_c=cfg.lru_c, lru_init=cfg.lru_init, min_rad=cfg.lru_min_rad, max_rad=cfg.lru_max_rad,
        unscaled_reset=cfg.lru_unscaled_reset, conv_init_std=cfg.conv_init_std,
    )


def _attention(window: Callable[[ModelConfig], int | None]) -> Callable[[ModelConfig], nn.Module]:
    def build(cfg: ModelConfig) -> nn.Module:
        return MultiQueryAttention(
            cfg.width, cfg.num_heads, cfg.resolved_head_dim, cfg.num_kv_heads, window=window(cfg),
            rope_fraction=cfg.rope_fraction, rope_base=cfg.rope_base, rope_pairing=cfg.rope_pairing,
            qkv_bias=cfg.attention_qkv_bias, out_bias=cfg.attention_out_bias,
        )
    return build


def _local_keys(cfg: ModelConfig) -> int:
    return cfg.attention_keys


def _all_keys(cfg: ModelConfig) -> None:
    return None


_ATTENTION_TP = {"q_proj": "colwise", "k_proj": "kv", "v_proj": "kv", "o_proj": "rowwise"}

BLOCK_SPECS: dict[BlockKind, BlockSpec] = {
    BlockKind.RECURRENT: BlockSpec(
        _recurrent,
        tp_layout={"linear_y": "colwise", "linear_x": "colwise",
                   "conv1d": ("local", {"weight": 1, "bias": 0}),  # weight (W, C) is time-major
                   "rg_lru": ("local", {"gate_r_weight": 0, "gate_r_bias": 0, "gate_i_weight": 0,
                                        "gate_i_bias": 0, "lambda_": 0}),
                   "linear_out": "rowwise"}),
    BlockKind.ATTENTION: BlockSpec(_attention(_local_keys), attention_keys=_local_keys, tp_layout=_ATTENTION_TP),
    BlockKind.GLOBAL_ATTENTION: BlockSpec(_attention(_all_keys), attention_keys=_all_keys, state_grows=True,
                                          tp_layout=_ATTENTION_TP),
}


def block_spec(kind: BlockKind | str) -> BlockSpec:
    """The registry entry of a block kind (its config string works too)."""
    return BLOCK_SPECS[BlockKind(kind)]
