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
from .decode_cpu import CPUDecoder, cpu_decoder
from .generate import GenerationMixin
from .layers import AttentionCache, Positions, RecurrentCache, ResidualBlock, RMSNorm


@dataclass
class ModelCache:
    """Per-block caches plus the position bookkeeping of a batch of streams.

    Every tensor is allocated by `init_cache` and then updated in place, so a decoding step
    has static shapes and allocates no cache memory.

    Attributes:
        blocks: one `RecurrentCache` or `AttentionCache` per residual block.
        length: tokens already processed (the same for every row; prompts are left-padded).
        doc_start: (B,) long, absolute position where each row's current document starts.
        position: (1,) long tensor equal to `length`, which a compiled step reads instead of
            the python int (so it does not recompile per position); kept in sync by the model.
    """

    blocks: list[AttentionCache | RecurrentCache]
    length: int
    doc_start: torch.Tensor
    position: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.position is None:
            self.position = torch.tensor([self.length], dtype=torch.long, device=self.doc_start.device)

    @property
    def batch_size(self) -> int:
        return self.doc_start.shape[0]

    @property
    def capacity(self) -> int | None:
        """Most tokens the cache can hold: the smallest global-attention cache, or None (no limit)."""
        sizes = [c.slots for c in self.blocks if isinstance(c, AttentionCache) and not c.ring]
        return min(sizes) if sizes else None

    def check_room(self, new_tokens: int) -> None:
        """Raises ValueError if `new_tokens` more tokens would overflow a global-attention cache."""
        cap = self.capacity
        if cap is not None and self.length + new_tokens > cap:
            raise ValueError(
                f"global attention cache holds {cap} positions but the sequence would reach "
                f"{self.length + new_tokens}; pass a larger max_length to init_cache"
            )

    def reorder(self, index: torch.Tensor) -> "ModelCache":
        """Select/permute batch rows (row i becomes old row index[i]); returns self.

        With an unchanged batch size the tensors are rewritten in place (same storage)."""
        index = index.to(self.doc_start.device)
        for c in self.blocks:
            c.reorder(index)
        doc_start = self.doc_start.index_select(0, index)
        if doc_start.shape == self.doc_start.shape:
            self.doc_start.copy_(doc_start)
        else:
            self.doc_start = doc_start
        return self

    def clone(self) -> "ModelCache":
        """An independent copy (e.g. to branch several continuations from one prefix)."""
        return ModelCache([c.clone() for c in self.blocks], self.length, self.doc_start.clone(),
                          self.position.clone())

    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        total = self.doc_start.numel() * self.doc_start.element_size()
        total += self.position.numel() * self.position.element_size()
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
        scale = torch.tensor(scale, dtype=torch.bfloat16, device="cpu").item()  # not meta
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
        # decode_step's fused numba kernels on CPU (see decode_cpu.py); False forces eager.
        self.fused_cpu_decode = True
        self.reset_parameters()

    # --- initialisation ----------------------------------------------------------------
    def reset_parameters(self) -> None:
        """LeCun-normal linear layers, output projections scaled down by sqrt(2 * depth) so the
        residual stream's variance stays O(1); embeddings N(0, 1/width) (x sqrt(width) on input).
        With the tied output layer the untrained model predicts the current token back (initial
        loss ~14 nats, not log V), but measured on the stdlib corpus it learns faster than with
        smaller embedding rows (std 1/width: 4.14 vs 3.63 bits/byte after 80 steps)."""
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

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) scaled embeddings."""
        return self.embed(tokens) * self.embed_multiplier

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) residual stream -> (B, T, V): final norm, tied output layer, soft-cap."""
        logits = F.linear(self.final_norm(x), self.embed.weight)
        cap = self.config.logits_soft_cap
        if cap is not None:
            logits = torch.tanh(logits.float() / cap) * cap
        return logits

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
        if cache is not None:
            cache.check_room(T)
            if T == 1:
                logits = self._step(tokens, cache, segment_pos, cache.length)
                cache.length += 1
                return logits, cache
        offset = 0 if cache is None else cache.length
        pos = Positions.build(B, T, offset, tokens.device,
                              None if segment_pos is None else segment_pos.to(tokens.device).long(),
                              None if cache is None else cache.doc_start)
        x = self._embed(tokens)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            block_cache = None if cache is None else cache.blocks[i]
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, pos, use_reentrant=False)
            else:
                x = block(x, pos, block_cache, offset)
        logits = self._logits(x)
        if cache is None:
            return logits
        cache.length = offset + T
        cache.position.fill_(offset + T)
        cache.doc_start.copy_(pos.doc_start[:, -1])
        return logits, cache

    # --- one-token decoding ----------------------------------------------------------------
    def _step(self, tokens: torch.Tensor, cache: ModelCache, segment_pos: torch.Tensor | None = None,
              limit: int | None = None) -> torch.Tensor:
        """One token per row through the cache: tokens (B, 1) -> logits (B, 1, V).

        Reads positions only from tensors (cache.position, cache.doc_start) and updates every
        cache tensor in place, so the shapes never change; `limit` (the python position) only
        lets eager global attention skip empty slots, None attends over all (static shapes).
        Does not touch the python `cache.length`: callers add 1.
        """
        abs_pos = cache.position  # (1,)
        if segment_pos is None:
            doc_start = cache.doc_start[:, None]  # (B, 1)
        else:
            doc_start = (abs_pos[None] - segment_pos.to(abs_pos.device).long()).clamp(min=0)
        pos = Positions(abs_pos, abs_pos[None] - doc_start, doc_start, abs_pos[None] == doc_start, True)
        x = self._embed(tokens)  # (B, 1, D)
        for block, block_cache in zip(self.blocks, cache.blocks):
            x = block(x, pos, block_cache, limit)
        logits = self._logits(x)
        cache.position.add_(1)
        cache.doc_start.copy_(doc_start[:, 0])
        return logits

    def decode_step(self, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """The lean decoding step: tokens (B,) or (B, 1) long -> last logits (B, V).

        No input validation beyond the cache's capacity (the generation loop feeds sampled
        ids). Uses the step compiled by `compile_decode_step` when there is one.
        """
        cache.check_room(1)
        step = self.__dict__.get("_compiled_step")
        if step is not None:
            logits = step(tokens.view(-1, 1), cache)
        elif self.fused_cpu_decode and CPUDecoder.usable_with(cache) and (dec := cpu_decoder(self)) is not None:
            logits = dec.step(tokens, cache)[:, None]
        else:
            logits = self._step(tokens.view(-1, 1), cache, None, cache.length)
        cache.length += 1
        return logits[:, 0]

    def compile_decode_step(self, enable: bool = True, **compile_kwargs) -> None:
        """Compile the one-token step with `torch.compile` (static shapes: global attention
        then attends over all its slots, masked); `mode="reduce-overhead"` adds CUDA graphs on
        GPU. `enable=False` returns to eager. The first step per batch size compiles."""
        if not enable:
            self.__dict__.pop("_compiled_step", None)
            return
        compile_kwargs.setdefault("dynamic", False)

        def step(tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
            return self._step(tokens, cache, None, None)

        self.__dict__["_compiled_step"] = torch.compile(step, **compile_kwargs)
