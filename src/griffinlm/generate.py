"""Autoregressive generation on top of any model with `init_cache` and a cached forward.

`GenerationMixin` is mixed into `LanguageModel`; this module never imports the model.
"""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V): argmax at temperature 0."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class GenerationMixin:
    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend each row of `tokens` (B, T) by `max_new_tokens` tokens; returns (B, T + n).

        Greedy at temperature 0, otherwise samples from softmax(logits / temperature).
        The prompt is prefilled in one call, then one token per step through the cache.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be a (batch, seq_len) LongTensor")
        if max_new_tokens == 0:
            return tokens
        B, T = tokens.shape
        cache = self.init_cache(B, max_length=T + max_new_tokens, device=tokens.device)
        logits, cache = self(tokens, cache=cache)
        out = [tokens]
        nxt = sample_next(logits[:, -1], temperature, generator)
        for i in range(max_new_tokens):
            out.append(nxt[:, None])
            if i == max_new_tokens - 1:
                break
            logits, cache = self(nxt[:, None], cache=cache)
            nxt = sample_next(logits[:, -1], temperature, generator)
        return torch.cat(out, dim=1)
