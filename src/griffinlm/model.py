"""`LanguageModel`: embedding -> residual blocks -> final RMSNorm -> tied output layer.

The same class is the MQA Transformer, Hawk or Griffin, depending on `config.block_pattern`.
Decoding state lives in an explicit `ModelCache`, a pool of independent sequence slots, that
callers pass in: `prefill` appends tokens to one slot, `step` advances any set of slots by one
token each (the one decoding path; `forward` with a cache and `generate` are built on them).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .cache import ModelCache, SlotIndex
from .config import ModelConfig
from .generate import GenerationMixin
from .layers import Positions, ResidualBlock, RMSNorm
from .layers.state import TreeWatch
from .ops.decode_step import KernelViews, StepRows, logits_reference, logits_step
from .ops.kernel_views import StepPlan
from .ops.quantized import QuantizedWeight


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
        self.step_views = KernelViews()  # memo of the fused output layer's weight views
        self.step_watch = TreeWatch()  # lets the layers reuse their step arguments between tokens
        self.reset_parameters()

    # --- initialisation ----------------------------------------------------------------
    def reset_parameters(self) -> None:
        """LeCun-normal linear layers, output projections with variance
        `output_init_variance` / (depth * fan_in) so the residual stream's variance stays O(1); embeddings N(0, 1/width) (x sqrt(width) on input).
        With the tied output layer the untrained model predicts the current token back (initial
        loss well above log V); docs/conventions.md gives these choices, the reference's, and
        the measurements behind them."""
        depth = self.config.depth
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 1.0 / math.sqrt(module.in_features)
                if name.endswith(("o_proj", "linear_out", "down_proj")):
                    std *= math.sqrt(self.config.output_init_variance / depth)
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(self.config.width))

    def param_count(self, include_embedding: bool = False) -> int:
        """Number of parameters (quantized weights included); by default without the (tied)
        embedding, as papers report."""
        n = sum(p.numel() for p in self.parameters()) + sum(
            q.numel() for q in self.modules() if isinstance(q, QuantizedWeight))
        return n if include_embedding else n - self.embed.weight.numel()

    # --- cache ---------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> ModelCache:
        """A pool of `batch_size` empty sequence slots (see `griffinlm.cache`).

        `max_length` bounds each slot's global-attention cache (default config.max_position or
        4096); local-attention and recurrent states have a fixed size whatever the length.
        `dtype` (default the parameters') is that of conv inputs and keys/values; the RG-LRU
        state is float32 always.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"init_cache: batch_size must be a positive int, got {batch_size!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length <= 0):
            raise ValueError(f"init_cache: max_length must be a positive int, got {max_length!r}")
        p = next(self.parameters())
        device = p.device if device is None else torch.device(device)
        dtype = p.dtype if dtype is None else dtype
        max_length = max_length or self.config.max_position or 4096
        blocks = [b.init_cache(batch_size, max_length, device, dtype) for b in self.blocks]
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        return ModelCache(blocks, zeros, zeros.clone())

    # --- forward -------------------------------------------------------------------------
    def _check_ids(self, tokens: torch.Tensor, shape: str) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of dtype long, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise TypeError(f"tokens must be an integer tensor (torch.long), got {tokens.dtype}")
        if tokens.dim() != len(shape.split(",")):
            raise ValueError(f"tokens must have shape ({shape}), got {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
        if tokens.numel() <= 256:  # a decoding step's few ids: one host copy beats three reductions
            ids = tokens.reshape(-1).tolist()
            lo, hi = min(ids), max(ids)
        else:
            lo, hi = (int(v) for v in torch.aminmax(tokens))
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} out of range [0, {self.config.vocab_size}) (vocab_size)")

    def _check_cache(self, cache: ModelCache) -> None:
        if not isinstance(cache, ModelCache):
            raise TypeError(f"cache must be a ModelCache from model.init_cache, got {type(cache).__name__}")
        if len(cache.blocks) != len(self.blocks):
            raise ValueError(f"cache has {len(cache.blocks)} block caches but the model has {len(self.blocks)} blocks")

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(...) ids -> (..., D) scaled embeddings."""
        return self.embed(tokens) * self.embed_multiplier

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) residual stream -> (B, T, V): final norm, tied output layer, soft-cap."""
        return logits_reference(x, self.final_norm.op_args(), self.embed.weight, self.config.logits_soft_cap)

    def forward(self, tokens: torch.Tensor, cache: ModelCache | None = None, *,
                segment_pos: torch.Tensor | None = None, return_hidden: bool = False):
        """Logits for every position.

        Args:
            tokens: (B, T) long token ids in [0, vocab_size).
            cache: optional `ModelCache` of B slots; row b continues slot b from its own
                position. It is updated in place and returned.
            segment_pos: optional (B, T) long position of each token within its document; a 0
                starts a new document (recurrence reset; conv and attention do not look back
                past it). Default: each row continues one document.
            return_hidden: return the final norm's output (B, T, D), the tied output layer's
                input, instead of logits (no cache): for a loss that never builds the logits
                (`ops.loss.tied_cross_entropy`). Through `forward`, so wrappers' hooks (FSDP) run.

        Returns:
            logits (B, T, vocab_size), or (logits, cache) when a cache is given.
        """
        if return_hidden and cache is not None:
            raise ValueError("return_hidden is for full sequences without a cache")
        self._check_ids(tokens, "batch, seq_len")
        B, T = tokens.shape
        if segment_pos is not None:
            if segment_pos.shape != tokens.shape:
                raise ValueError(f"segment_pos must have the tokens' shape {tuple(tokens.shape)}, "
                                 f"got {tuple(segment_pos.shape)}")
            segment_pos = segment_pos.to(tokens.device).long()
        if cache is None:
            return self._forward(tokens, Positions.build(B, T, 0, tokens.device, segment_pos), hidden=return_hidden)
        self._check_cache(cache)
        if cache.batch_size != B:
            raise ValueError(f"cache was made for batch size {cache.batch_size} but tokens have batch size {B}")
        slots = torch.arange(B, device=cache.positions.device)
        keys = cache.check_room(slots, T)
        if T == 1:
            return self._step(tokens[:, 0], cache, slots, keys, True,
                              segment_pos=None if segment_pos is None else segment_pos[:, 0])[:, None], cache
        offsets = cache.positions.tolist()
        if len(set(offsets)) == 1:  # every slot at one position: one batched chunk
            return self._chunk(tokens, cache, offsets[0], segment_pos), cache
        rows = [self._chunk(tokens[b:b + 1], cache.view(b), offsets[b],
                            None if segment_pos is None else segment_pos[b:b + 1]) for b in range(B)]
        return torch.cat(rows), cache

    def _forward(self, tokens: torch.Tensor, pos: Positions, cache: ModelCache | None = None,
                 last_only: bool = False, hidden: bool = False) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits through every block (with a cache: after `pos.offset` tokens);
        `last_only`: the last position's only, (B, 1, V) (a prefill needs no more); `hidden`:
        the final norm's output (B, T, D) instead of logits."""
        x = self._embed(tokens)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, None if cache is None else cache.blocks[i])
        if hidden:
            return self.final_norm(x)
        return self._logits(x[:, -1:] if last_only else x)

    def _chunk(self, tokens: torch.Tensor, cache: ModelCache, offset: int,
               segment_pos: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
        """Tokens (B, T) appended to cache slots that all hold `offset` tokens -> logits (B, T, V)
        (with `last_only`: (B, 1, V))."""
        B, T = tokens.shape
        pos = Positions.build(B, T, offset, tokens.device, segment_pos, cache.doc_start)
        logits = self._forward(tokens, pos, cache, last_only)
        cache.positions.fill_(offset + T)
        cache.doc_start.copy_(pos.doc_start[:, -1])
        return logits

    # --- the slot API: prefill one slot, step any slots ------------------------------------------
    def prefill(self, tokens: torch.Tensor, cache: ModelCache, slot: int, *, last_only: bool = False,
                segment_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Appends tokens (T,) long to slot `slot` from its current state (a reset or fresh slot
        starts a new sequence; chunked prefill is a loop of calls). `segment_pos` (T,) long
        optionally packs documents: a 0 starts a new one within the slot.

        Returns logits (T, vocab_size), or with `last_only` the last position's (vocab_size,).
        A ValueError (bad ids, slot, or too little room) leaves the pool unchanged."""
        self._check_ids(tokens, "seq_len")
        self._check_cache(cache)
        index = cache.slot_tensor(slot, "slot")
        cache.check_room(index, tokens.shape[0])
        if segment_pos is not None:
            if segment_pos.shape != tokens.shape:
                raise ValueError(f"segment_pos must have the tokens' shape {tuple(tokens.shape)}, "
                                 f"got {tuple(segment_pos.shape)}")
            segment_pos = segment_pos.to(cache.positions.device).long()[None]
        s = int(index)
        logits = self._chunk(tokens[None].to(cache.positions.device), cache.view(s), int(cache.positions[s]),
                             segment_pos, last_only)[0]
        return logits[-1] if last_only else logits

    def prefill_many(self, prompts: Sequence[torch.Tensor], cache: ModelCache, slots: SlotIndex) -> torch.Tensor:
        """Prefills fresh slots (reset or new: at position 0) with prompts of any lengths in one
        batched forward: prompts[i] (T_i,) long into slots[i]. Returns the last position's
        logits of each, (n, vocab_size).

        The prompts are left-padded to the longest; each pad run is a document of its own
        before the prompt's (`segment_pos`), so the recurrence resets at the prompt and neither
        conv nor attention looks back into the pads: the state equals one `prefill` per slot,
        except that a slot's position counts its pads (a global-attention slot needs room for
        them). A ValueError (bad ids, slots, a slot not at position 0, too little room) leaves
        the pool unchanged."""
        self._check_cache(cache)
        index = cache.slot_tensor(slots)
        rows = [torch.as_tensor(p).reshape(-1) for p in prompts]
        if len(rows) != len(index):
            raise ValueError(f"{len(rows)} prompts for {len(index)} slots: give one prompt per slot")
        for r in rows:
            self._check_ids(r, "seq_len")
        if bool((cache.positions.index_select(0, index) != 0).any()):
            raise ValueError("prefill_many fills fresh slots (position 0; reset them first); continue a "
                             "slot's sequence with prefill")
        T = max(r.numel() for r in rows)
        cache.check_room(index, T)
        device = cache.positions.device
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        segment_pos = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            pad = T - r.numel()
            tokens[i, pad:] = r
            segment_pos[i, :pad] = torch.arange(pad)
            segment_pos[i, pad:] = torch.arange(r.numel())
        part = cache.select(index)
        logits = self._chunk(tokens.to(device), part, 0, segment_pos.to(device), last_only=True)  # (n, 1, V)
        cache.put(index, part)
        return logits[:, -1]

    def step(self, tokens: torch.Tensor, cache: ModelCache, slots: SlotIndex | None = None, *,
             check: bool = True) -> torch.Tensor:
        """Advances each slot in `slots` (n,) by one token from its own position: tokens (n,) long,
        row b for slot slots[b] (distinct, any order) -> logits (n, vocab_size). `slots=None`:
        every slot of the pool, in order (tokens (N,)).

        Uses the step compiled by `compile_decode_step` when there is one. A ValueError (bad
        ids or slots, or a global-attention slot at max_length) leaves the pool unchanged.
        `check=False` skips the id and slot checks (not the length one) for a caller that made
        both itself, as the generation loop does with sampled ids and its own (n,) long slots."""
        if check:
            self._check_ids(tokens, "n")
            self._check_cache(cache)
            index, values = cache.check_slots(range(cache.batch_size) if slots is None else slots)
            if len(values) != tokens.numel():
                raise ValueError(f"tokens {tuple(tokens.shape)} and slots ({len(values)},) must have one entry "
                                 "per slot")
            whole = values == list(range(cache.batch_size))
        elif slots is None:
            index, whole = cache.all_slots, True
        else:
            index = slots
            whole = index.shape[0] == cache.batch_size and bool((index == cache.all_slots).all())
        keys = cache.check_room(index, 1)  # eager: global attention reads only the filled prefix
        tokens = tokens.to(cache.positions.device)
        compiled = self.__dict__.get("_compiled_step")
        if compiled is not None:
            return compiled(tokens, cache, index)
        return self._step(tokens, cache, index, keys, whole)

    def _step(self, tokens: torch.Tensor, cache: ModelCache, slots: torch.Tensor, keys: int | None = None,
              whole: bool = False, segment_pos: torch.Tensor | None = None) -> torch.Tensor:
        """The unchecked step: tokens (n,), slots (n,) -> logits (n, V); updates the pool in
        place. Static shapes with keys=None, whole=False (what torch.compile captures).
        `segment_pos` (n,) optionally gives each token's position in its document (0: a start)."""
        # (n,) each row's position; for the whole pool the pool's own tensors (updated at the end)
        pos = cache.positions if whole else cache.positions.index_select(0, slots)
        if segment_pos is None:
            doc_start = cache.doc_start if whole else cache.doc_start.index_select(0, slots)
        else:
            doc_start = pos - segment_pos  # negative: the document began before the slot's stream
        x = self._embed(tokens)  # (n, D)
        compiling = torch.compiler.is_compiling()
        unchanged = not compiling and self.step_watch.unchanged(self)
        rows = StepRows.make(x, slots, pos, doc_start, keys, whole, unchanged)
        plan = self.__dict__.get("_step_plan")
        states = None if compiling else [s for state in cache.blocks for s in (state, None)] + [None]
        if plan is not None and states is not None and plan.valid(rows, states):
            logits = plan.replay(x, rows)  # every op's bound call: nothing changed since the last step
        else:
            for block, state in zip(self.blocks, cache.blocks):
                x = block.step(x, state, rows)
            logits = self.step_views.run(x, rows)  # the fused output layer's bound call, while nothing changed
            if logits is None:
                logits = logits_step(x, self.final_norm.op_args(), self.embed.weight, self.config.logits_soft_cap,
                                     rows, self.step_views)
            if not compiling:
                self.__dict__["_step_plan"] = StepPlan.capture(self._step_ops(states), rows)
        if whole:
            cache.positions.add_(1)
        else:
            cache.positions.index_copy_(0, slots, pos + 1)
        if segment_pos is not None or not whole:
            cache.doc_start.index_copy_(0, slots, doc_start)
        return logits

    def _step_ops(self, states: list) -> list[tuple[KernelViews | None, object]]:
        """(views, state) of every op of a step in order (each block's temporal half and MLP, then
        the output layer): what `StepPlan` reads the bound calls from."""
        views = [v for block in self.blocks for v in (getattr(block.temporal, "step_views", None),
                                                      getattr(block.mlp, "step_views", None))]
        return list(zip(views + [self.step_views], states))

    def compile_decode_step(self, enable: bool = True, **compile_kwargs) -> None:
        """Compile the one-token step of `step` with `torch.compile` (static shapes: global
        attention then attends over all its entries, masked); `mode="reduce-overhead"` adds CUDA
        graphs on GPU. `enable=False` returns to eager. The first step per batch size compiles."""
        if not enable:
            self.__dict__.pop("_compiled_step", None)
            return
        compile_kwargs.setdefault("dynamic", False)

        def step(tokens: torch.Tensor, cache: ModelCache, slots: torch.Tensor) -> torch.Tensor:
            return self._step(tokens, cache, slots)

        self.__dict__["_compiled_step"] = torch.compile(step, **compile_kwargs)
