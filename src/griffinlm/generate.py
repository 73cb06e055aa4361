"""Autoregressive generation on top of any model with `init_cache` and a cached forward.

`GenerationMixin` is mixed into `LanguageModel`; this module never imports the model. It needs
from the model: `init_cache(batch, max_length, device)`, `model(tokens, cache=, segment_pos=)`
returning (logits, cache), and optionally `decode_step(tokens, cache) -> (B, V)` logits (the
lean one-token step; a model without it is stepped through its forward).

Prompts of different lengths are left-padded; each pad token is its own one-token document
(segment position 0) and every prompt starts a document at its first real token, so the
recurrence is reset and conv/attention are masked there: no pad reaches a real token's state.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

StopTokens = int | Sequence[int] | Sequence[Sequence[int] | None] | None


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raises ValueError for temperature < 0, top_k < 1 or top_p outside (0, 1]."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits (B, V) with tokens outside the top-k / nucleus (top-p) set to -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches top_p (the
    most likely token always survives)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None,
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V).

    Temperature 0 is greedy (argmax; top_k / top_p do not matter). Otherwise samples from
    softmax(filtered logits / temperature) with `generator`."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def pad_prompts(prompts: Sequence[Sequence[int] | torch.Tensor], pad_id: int = 0,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pads prompts of different lengths into one batch.

    Returns tokens (B, T) long, segment_pos (B, T) long (0 for every pad: each is its own
    document; 0, 1, ... along each prompt) and lengths (B,) long."""
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    for i, r in enumerate(rows):
        if r.numel() == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    lengths = torch.tensor([r.numel() for r in rows], dtype=torch.long)
    T = int(lengths.max())
    tokens = torch.stack([torch.cat([r.new_full((T - r.numel(),), pad_id), r]) for r in rows])
    segment_pos = left_pad_positions(tokens, lengths)
    return tokens.to(device), segment_pos.to(device), lengths.to(device)


def left_pad_positions(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """segment_pos (B, T) for left-padded tokens (B, T) whose row b ends with its lengths[b]
    real tokens: 0 on every pad, 0 .. lengths[b]-1 along the prompt."""
    B, T = tokens.shape
    lengths = lengths.to(tokens.device).long()
    if lengths.shape != (B,) or bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise ValueError(f"prompt_lengths must be (B,) = ({B},) values in [1, {T}], got {lengths.tolist()}")
    first = (T - lengths)[:, None]  # (B, 1) index of the first real token
    t = torch.arange(T, device=tokens.device)[None]
    return (t - first).clamp(min=0)


def stop_table(stop_tokens: StopTokens, batch: int, device: torch.device) -> torch.Tensor | None:
    """(B, K) long table of each row's stop ids, padded with -1; None when there are none.

    `stop_tokens`: an id or a list of ids for every row, or a list of B per-row lists (None or
    [] for a row without stop tokens)."""
    if stop_tokens is None:
        return None
    if isinstance(stop_tokens, int):
        per_row: list[list[int]] = [[stop_tokens]] * batch
    elif isinstance(stop_tokens, torch.Tensor) and stop_tokens.dim() <= 1:
        per_row = [[int(t) for t in stop_tokens.reshape(-1)]] * batch
    elif all(isinstance(s, int) for s in stop_tokens):
        per_row = [[int(s) for s in stop_tokens]] * batch
    else:
        per_row = [[] if s is None else ([int(s)] if isinstance(s, int) else [int(t) for t in s])
                   for s in stop_tokens]
        if len(per_row) != batch:
            raise ValueError(f"stop_tokens has {len(per_row)} per-row lists but the batch has {batch} rows")
    width = max((len(r) for r in per_row), default=0)
    if width == 0:
        return None
    table = torch.full((batch, width), -1, dtype=torch.long)
    for i, r in enumerate(per_row):
        table[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return table.to(device)


class GenerationMixin:
    """`generate` and `generate_stream` for a model with a cache (see the module docstring)."""

    def _prepare(self, tokens, max_new_tokens: int, temperature: float, top_k, top_p, pad_id: int,
                 prompt_lengths) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        check_sampling(temperature, top_k, top_p)
        device = next(self.parameters()).device
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
                raise ValueError(f"tokens must be a non-empty (batch, seq_len) LongTensor, got shape {tuple(tokens.shape)}")
            if prompt_lengths is None:
                return tokens, None, torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
            lengths = torch.as_tensor(prompt_lengths, dtype=torch.long)
            seg = left_pad_positions(tokens, lengths)
            return tokens, (None if bool((lengths == tokens.shape[1]).all()) else seg), lengths
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths is only for a left-padded tensor; a list of prompts carries its lengths")
        toks, seg, lengths = pad_prompts(tokens, pad_id, device)
        return toks, (None if bool((lengths == toks.shape[1]).all()) else seg), lengths.cpu()

    @torch.no_grad()
    def generate_stream(self, tokens: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
                        temperature: float = 0.0, generator: torch.Generator | None = None, *,
                        top_k: int | None = None, top_p: float | None = None, stop_tokens: StopTokens = None,
                        pad_id: int = 0, prompt_lengths: Sequence[int] | torch.Tensor | None = None,
                        ) -> Iterator[torch.Tensor]:
        """Yields the next token of every row, (B,) long, as soon as it is sampled.

        Arguments as in `generate`. A row that has produced one of its stop tokens yields
        `pad_id` from then on; the iterator ends after `max_new_tokens` steps or once every
        row has stopped."""
        toks, seg, _ = self._prepare(tokens, max_new_tokens, temperature, top_k, top_p, pad_id, prompt_lengths)
        if max_new_tokens == 0:
            return
        device = next(self.parameters()).device
        toks = toks.to(device)
        B, T = toks.shape
        stops = stop_table(stop_tokens, B, device)
        cache = self.init_cache(B, max_length=T + max_new_tokens, device=device)
        logits, cache = self(toks, cache=cache, segment_pos=seg)
        last = logits[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        step = getattr(self, "decode_step", None)
        for i in range(max_new_tokens):
            nxt = sample_next(last, temperature, generator, top_k, top_p)
            if stops is not None:
                nxt = nxt.masked_fill(done, pad_id)
                done = done | (nxt[:, None] == stops).any(-1)
            yield nxt
            if i == max_new_tokens - 1 or (stops is not None and bool(done.all())):
                return
            if step is not None:
                last = step(nxt, cache)
            else:
                logits, cache = self(nxt[:, None], cache=cache)
                last = logits[:, -1]

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, generator: torch.Generator | None = None, *,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens: StopTokens = None,
                 pad_id: int = 0, prompt_lengths: Sequence[int] | torch.Tensor | None = None,
                 ) -> torch.Tensor | list[torch.Tensor]:
        """Extends each prompt by up to `max_new_tokens` tokens.

        Args:
            tokens: (B, T) long prompts of one length (left-padded if `prompt_lengths` is
                given), or a list of B prompts (lists or 1-D tensors) of any lengths.
            max_new_tokens: tokens to generate per row (fewer where a row stops).
            temperature: 0 is greedy; otherwise sample from softmax(logits / temperature).
            generator: `torch.Generator` for sampling; a fixed seed reproduces the samples.
            top_k: sample among the k most likely tokens only (k >= 1).
            top_p: nucleus sampling, the most likely tokens holding probability top_p (0, 1].
            stop_tokens: an id or list of ids for every row, or B per-row lists; a row ends
                with its first stop token (included in the output).
            pad_id: filler for pads in a list of prompts and after a row has stopped.
            prompt_lengths: (B,) real lengths of left-padded `tokens` rows (the rest are pads).

        Returns:
            For a tensor, (B, T + n) long: the prompts then n generated columns (n is
            max_new_tokens, or less when every row stopped early; a stopped row is filled with
            `pad_id`). For a list, a list of 1-D tensors: each prompt and its own continuation
            up to and including its stop token.
        """
        steps = list(self.generate_stream(tokens, max_new_tokens, temperature, generator, top_k=top_k,
                                          top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id,
                                          prompt_lengths=prompt_lengths))
        if isinstance(tokens, torch.Tensor):
            new = torch.stack(steps, 1).to(tokens.device) if steps else tokens.new_zeros(tokens.shape[0], 0)
            return torch.cat([tokens, new], dim=1)
        B = len(tokens)
        new = torch.stack(steps, 1).cpu() if steps else torch.zeros(B, 0, dtype=torch.long)
        stops = stop_table(stop_tokens, B, torch.device("cpu"))
        out = []
        for b, prompt in enumerate(tokens):
            row = new[b]
            if stops is not None:
                hit = (row[:, None] == stops[b]).any(-1).nonzero()
                if hit.numel():
                    row = row[: int(hit[0]) + 1]
            out.append(torch.cat([torch.as_tensor(prompt, dtype=torch.long).reshape(-1).cpu(), row]))
        return out
