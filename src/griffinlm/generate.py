"""Autoregressive generation on the model's slot API: one loop for every caller.

`GenerationMixin` is mixed into `LanguageModel`; this module never imports the model. It needs
from the model: `init_cache(batch, max_length)`, `prefill(tokens, cache, slot, last_only=True)`,
`prefill_many(prompts, cache, slots)`, `step(tokens, cache, slots)` and `model(tokens, cache=)`
(a batched prefill of equal-length prompts). Prompts of different lengths prefill their own
slots in one batched forward, and a row that stops leaves the batch: later steps advance only
the slots still generating.
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
    """`generate` and `generate_stream` for a model with the slot API (see the module docstring)."""

    def _prompt_rows(self, tokens, max_new_tokens: int, temperature: float, top_k, top_p,
                     prompt_lengths) -> list[torch.Tensor] | torch.Tensor:
        """Checked arguments; the prompts as a (B, T) tensor (one length) or a list of 1-D rows."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        check_sampling(temperature, top_k, top_p)
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
                raise ValueError(f"tokens must be a non-empty (batch, seq_len) LongTensor, got shape {tuple(tokens.shape)}")
            if prompt_lengths is None:
                return tokens
            B, T = tokens.shape
            lengths = torch.as_tensor(prompt_lengths, dtype=torch.long).reshape(-1).tolist()
            if len(lengths) != B or any(not 1 <= n <= T for n in lengths):
                raise ValueError(f"prompt_lengths must be ({B},) values in [1, {T}], got {lengths}")
            return [tokens[b, T - n:] for b, n in enumerate(lengths)]  # left padding dropped
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths is only for a left-padded tensor; a list of prompts carries its lengths")
        rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in tokens]
        if not rows:
            raise ValueError("no prompts given")
        for i, r in enumerate(rows):
            if r.numel() == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        return rows

    @torch.no_grad()
    def generate_stream(self, tokens: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
                        temperature: float = 0.0, generator: torch.Generator | None = None, *,
                        top_k: int | None = None, top_p: float | None = None, stop_tokens: StopTokens = None,
                        pad_id: int = 0, prompt_lengths: Sequence[int] | torch.Tensor | None = None,
                        ) -> Iterator[torch.Tensor]:
        """Yields the next token of every row, (B,) long, as soon as it is sampled.

        Arguments as in `generate`. A row that has produced one of its stop tokens yields
        `pad_id` from then on (and is no longer computed); the iterator ends after
        `max_new_tokens` steps or once every row has stopped."""
        rows = self._prompt_rows(tokens, max_new_tokens, temperature, top_k, top_p, prompt_lengths)
        if max_new_tokens == 0:
            return
        device = next(self.parameters()).device
        B = len(rows)
        stops = stop_table(stop_tokens, B, device)
        longest = rows.shape[1] if isinstance(rows, torch.Tensor) else max(r.numel() for r in rows)
        cache = self.init_cache(B, max_length=longest + max_new_tokens)
        if isinstance(rows, torch.Tensor):  # one length: a single batched prefill
            logits, cache = self(rows.to(device), cache=cache)
            last = logits[:, -1]
        else:
            last = self.prefill_many([r.to(device) for r in rows], cache, list(range(B)))  # one batched forward
        active = torch.arange(B, device=device)  # slots still generating, in row order
        every = True  # every row still generating: slots are the whole pool in order
        for i in range(max_new_tokens):
            nxt = sample_next(last, temperature, generator, top_k, top_p)  # (n_active,)
            if every:
                yield nxt
            else:
                out = torch.full((B,), pad_id, dtype=torch.long, device=device)
                out[active] = nxt
                yield out
            if i == max_new_tokens - 1:
                return
            if stops is not None:
                going = ~(nxt[:, None] == stops.index_select(0, active)).any(-1)
                if not bool(going.all()):
                    active, nxt, every = active[going], nxt[going], False
                    if active.numel() == 0:
                        return
            last = self.step(nxt, cache, None if every else active, check=False)  # sampled ids, own slots

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, generator: torch.Generator | None = None, *,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens: StopTokens = None,
                 pad_id: int = 0, prompt_lengths: Sequence[int] | torch.Tensor | None = None,
                 ) -> torch.Tensor | list[torch.Tensor]:
        """Extends each prompt by up to `max_new_tokens` tokens.

        Args:
            tokens: (B, T) long prompts of one length (left-padded if `prompt_lengths` is
                given: the pads are dropped), or a list of B prompts (lists or 1-D tensors) of
                any lengths, each prefilled in its own slot.
            max_new_tokens: tokens to generate per row (fewer where a row stops).
            temperature: 0 is greedy; otherwise sample from softmax(logits / temperature).
            generator: `torch.Generator` for sampling; a fixed seed reproduces the samples.
            top_k: sample among the k most likely tokens only (k >= 1).
            top_p: nucleus sampling, the most likely tokens holding probability top_p (0, 1].
            stop_tokens: an id or list of ids for every row, or B per-row lists; a row ends
                with its first stop token (included in the output).
            pad_id: filler after a row has stopped (tensor output).
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
