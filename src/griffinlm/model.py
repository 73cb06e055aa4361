"""`LanguageModel`: embedding -> residual blocks -> final RMSNorm -> tied output layer.

The same class is the MQA Transformer, Hawk or Griffin, depending on `config.block_pattern`.
Decoding state lives in an explicit `ModelCache` that callers pass in and get back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .generate import GenerationMixin
from .layers import AttentionCache, Positions, RecurrentCache, ResidualBlock, RMSNorm


@dataclass
class ModelCache:
    """Per-block caches plus the position bookkeeping of a batch of streams.

    Attributes:
        blocks: one `RecurrentCache` or `AttentionCache` per residual block.
        length: tokens already processed (the same for every row; prompts are padded).
        doc_start: (B,) long, absolute position where each row's current document starts.
    """

    blocks: list[AttentionCache | RecurrentCache]
    length: int
    doc_start: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.doc_start.shape[0]

    def reorder(self, index: torch.Tensor) -> "ModelCache":
        """Select/permute batch rows in place (row i becomes old row index[i]); returns self."""
        index = index.to(self.doc_start.device)
        for c in self.blocks:
            c.reorder(index)
        self.doc_start = self.doc_start.index_select(0, index)
        return self

    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        total = self.doc_start.numel() * self.doc_start.element_size()
        for c in self.blocks:
            for t in vars(c).values():
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def embed_multiplier(cfg: ModelConfig) -> float:
    if cfg.embed_scale == "none":
        return 1.0
    scale = math.sqrt(cfg.width)
    if cfg.embed_scale == "sqrt_bf16":  # RecurrentGemma rounds the normaliser to bfloat16
        scale = torch.tensor(scale, dtype=torch.bfloat16).item()
    return scale


class LanguageModel(nn.Module, GenerationMixin):
    """A decoder-only language model.

    Call `model(tokens)` with tokens (B, T) long -> logits (B, T, vocab_size), or
    `model(tokens, cache=cache)` -> (logits, cache) to continue from a cache.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"LanguageModel expects a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.ModuleList(ResidualBlock(config, kind) for kind in config.block_types)
        self.final_norm = RMSNorm(config.width, config.norm_eps, config.norm_unit_offset)
        self.embed_multiplier = embed_multiplier(config)
        self.gradient_checkpointing = False
        self.reset_parameters()

    # --- initialisation ----------------------------------------------------------------
    def reset_parameters(self) -> None:
        """LeCun-normal linear layers, output projections scaled down by sqrt(2 * depth) so the
        residual stream's variance stays O(1); embeddings N(0, 1/width) (x sqrt(width) on input)."""
        depth = self.config.depth
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 1.0 / math.sqrt(module.in_features)
                if name.endswith(("o_proj", "linear_out", "down_proj")):
                    std /= math.sqrt(2 * depth)
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(self.config.width))

    def param_count(self, include_embedding: bool = False) -> int:
        """Number of parameters; by default without the (tied) embedding, as papers report."""
        n = sum(p.numel() for p in self.parameters())
        return n if include_embedding else n - self.embed.weight.numel()

    # --- cache ---------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int | None = None,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelCache:
        """An empty cache for `batch_size` streams.

        `max_length` bounds global-attention caches (default config.max_position or 4096);
        local-attention and recurrent caches have a fixed size whatever the length.
        """
        if batch_size <= 0:
            raise ValueError(f"init_cache: batch_size must be positive, got {batch_size}")
        p = next(self.parameters())
        device = p.device if device is None else torch.device(device)
        dtype = p.dtype if dtype is None else dtype
        max_length = max_length or self.config.max_position or 4096
        blocks = [b.init_cache(batch_size, max_length, device, dtype) for b in self.blocks]
        return ModelCache(blocks, 0, torch.zeros(batch_size, dtype=torch.long, device=device))

    # --- forward -------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor, segment_pos: torch.Tensor | None,
                      cache: ModelCache | None) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of dtype long, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise TypeError(f"tokens must be an integer tensor (torch.long), got {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq_len), got {tuple(tokens.shape)}")
        if tokens.shape[1] == 0 or tokens.shape[0] == 0:
            raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} out of range [0, {self.config.vocab_size}) (vocab_size)")
        if segment_pos is not None and segment_pos.shape != tokens.shape:
            raise ValueError(f"segment_pos must have the tokens' shape {tuple(tokens.shape)}, got {tuple(segment_pos.shape)}")
        if cache is not None:
            if not isinstance(cache, ModelCache):
                raise TypeError(f"cache must be a ModelCache from model.init_cache, got {type(cache).__name__}")
            if cache.batch_size != tokens.shape[0]:
                raise ValueError(f"cache was made for batch size {cache.batch_size} but tokens have batch size {tokens.shape[0]}")
            if len(cache.blocks) != len(self.blocks):
                raise ValueError(f"cache has {len(cache.blocks)} block caches but the model has {len(self.blocks)} blocks")

    def forward(self, tokens: torch.Tensor, cache: ModelCache | None = None, *,
                segment_pos: torch.Tensor | None = None):
        """Logits for every position.

        Args:
            tokens: (B, T) long token ids in [0, vocab_size).
            cache: optional `ModelCache`; it is updated in place and returned.
            segment_pos: optional (B, T) long position of each token within its document; a 0
                starts a new document (recurrence reset; conv and attention do not look back
                past it). Default: each row continues one document.

        Returns:
            logits (B, T, vocab_size), or (logits, cache) when a cache is given.
        """
        self._check_tokens(tokens, segment_pos, cache)
        B, T = tokens.shape
        offset = 0 if cache is None else cache.length
        pos = Positions.build(B, T, offset, tokens.device,
                              None if segment_pos is None else segment_pos.to(tokens.device).long(),
                              None if cache is None else cache.doc_start)
        x = self.embed(tokens) * self.embed_multiplier  # (B, T, D)
        for i, block in enumerate(self.blocks):
            block_cache = None if cache is None else cache.blocks[i]
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, pos, use_reentrant=False)
            else:
                x = block(x, pos, block_cache, offset)
        x = self.final_norm(x)
        logits = F.linear(x, self.embed.weight)  # (B, T, V), tied output layer
        cap = self.config.logits_soft_cap
        if cap is not None:
            logits = torch.tanh(logits.float() / cap) * cap
        if cache is None:
            return logits
        cache.length = offset + T
        cache.doc_start = pos.doc_start[:, -1].clone()
        return logits, cache
