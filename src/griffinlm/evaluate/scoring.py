"""Log-likelihoods from a model: per-token losses of long sequences through the cache in chunks
(bounded memory at any length), and the log-probability of continuations given contexts (the
multiple-choice scorer and the lm-evaluation-harness adapter)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..model import LanguageModel
from ..precision import autocast


@torch.no_grad()
def chunked_token_nats(model: LanguageModel, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """-log p(tokens[:, t+1] | tokens[:, :t+1]) in nats, (B, L-1) float32, for tokens (B, L).

    The sequence goes through the model `chunk` tokens at a time, each chunk continuing from the
    cache of the ones before (a global-attention cache is sized to L), so activations never hold
    more than one chunk and a recurrent model's memory is independent of L."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    B, L = tokens.shape
    if L < 2:
        raise ValueError(f"need at least 2 tokens to score, got {L}")
    cache = model.init_cache(B, max_length=L)
    out = []
    for start in range(0, L - 1, chunk):
        stop = min(start + chunk, L - 1)
        with autocast(device):
            logits, cache = model(tokens[:, start:stop], cache=cache)
        targets = tokens[:, start + 1:stop + 1]
        out.append(F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none"))
    return torch.cat(out, dim=1)


@torch.no_grad()
def continuation_logprobs(model: LanguageModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 16, max_length: int | None = None
                          ) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation | context) in nats,
    whether greedy decoding would produce the continuation).

    Rows are right-padded into batches (padding comes after every scored position, so it never
    affects them under causal masking). Contexts are truncated from the left so that context +
    continuation fits `max_length` tokens (when given); the context keeps at least one token."""
    device = next(model.parameters()).device
    rows: list[tuple[list[int], int]] = []  # (tokens, index of the first continuation token)
    for context, continuation in requests:
        context, continuation = [int(t) for t in context], [int(t) for t in continuation]
        if not context or not continuation:
            raise ValueError("every request needs a non-empty context (e.g. BOS) and continuation")
        if max_length is not None and len(context) + len(continuation) > max_length:
            keep = max(1, max_length - len(continuation))
            context = context[-keep:]
        rows.append((context + continuation, len(context)))
    # Longest first: batches hold similar lengths, and a too-long row fails at the first batch.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        T = max(len(rows[i][0]) for i in idx)
        tokens = torch.zeros(len(idx), T, dtype=torch.long)
        for j, i in enumerate(idx):
            tokens[j, :len(rows[i][0])] = torch.tensor(rows[i][0])
        tokens = tokens.to(device)
        with autocast(device):
            logits = model(tokens)
        logp = torch.log_softmax(logits.float(), dim=-1)
        for j, i in enumerate(idx):
            seq, first = rows[i]
            span = slice(first - 1, len(seq) - 1)  # logits at t predict token t + 1
            target = tokens[j, first:len(seq)]
            lp = logp[j, span].gather(-1, target[:, None])[:, 0]
            greedy = bool((logp[j, span].argmax(-1) == target).all())
            results[i] = (float(lp.sum()), greedy)
    return results
