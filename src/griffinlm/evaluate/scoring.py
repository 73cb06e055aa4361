"""Log-likelihoods from a model: per-token losses of long sequences through the cache in chunks
(bounded memory at any length), and the log-probability of continuations given contexts (the
multiple-choice scorer and the lm-evaluation-harness adapter)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..model import LanguageModel
from ..precision import autocast


@torch.no_grad()
def chunked_token_nats(model: LanguageModel, tokens: torch.Tensor, chunk: int, dtype: str = "auto") -> torch.Tensor:
    """-log p(tokens[:, t+1] | tokens[:, :t+1]) in nats, (B, L-1) float32, for tokens (B, L).

    The sequence goes through the model `chunk` tokens at a time, each chunk continuing from the
    cache of the ones before (a global-attention cache is sized to L), so activations never hold
    more than one chunk and a recurrent model's memory is independent of L. `dtype`: the GEMM
    precision (`griffinlm.precision`)."""
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
        with autocast(device, dtype):
            logits, cache = model(tokens[:, start:stop], cache=cache)
        targets = tokens[:, start + 1:stop + 1]
        out.append(F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none"))
    return torch.cat(out, dim=1)


def truncated_context_blocks(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The forwards of `truncated_context_nats` for a sequence of `length` tokens: (first, stop,
    start) per block of at most `stride` score indices [first, stop) (index t scores token t + 1),
    the blocks tiling context .. length - 2, each scored by a forward of `context` input tokens
    starting at token `start` = stop - context."""
    if not 1 <= stride <= context:
        raise ValueError(f"need 1 <= stride <= context, got stride {stride}, context {context}")
    blocks = []
    for first in range(context, length - 1, stride):
        stop = min(first + stride, length - 1)
        blocks.append((first, stop, stop - context))
    return blocks


def truncated_context_lengths(length: int, context: int, stride: int) -> list[int]:
    """For each score index t in 0 .. length - 2: how many tokens `truncated_context_nats` conditions
    token t + 1 on (t + 1 for t < context, else between context - stride + 1 and context)."""
    out = [t + 1 for t in range(min(context, length - 1))]
    for first, stop, start in truncated_context_blocks(length, context, stride):
        out += [t - start + 1 for t in range(first, stop)]
    return out


@torch.no_grad()
def truncated_context_nats(model: LanguageModel, tokens: torch.Tensor, context: int, stride: int,
                           full: torch.Tensor | None = None, batch_size: int = 64,
                           dtype: str = "auto") -> torch.Tensor:
    """-log p(tokens[:, t+1] | at most the last `context` tokens up to t) in nats, (B, L-1) float32.

    Sliding-window scoring: positions t < context already see at most `context` tokens, so they are
    the full-context scores (`full`, from `chunked_token_nats(model, tokens, context)` when not
    given). Beyond, each block of `stride` positions is scored by a fresh forward (a new document
    at position 0, no cache) over the `context` tokens that end at the block's last position, so a
    position sees between context - stride + 1 and `context` tokens (`truncated_context_lengths`;
    stride 1: exactly `context`, at `stride` times the cost). The forwards of all rows and blocks go
    through the model `batch_size` at a time."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    B, L = tokens.shape
    if full is None:
        full = chunked_token_nats(model, tokens, context, dtype)
    out = full.clone()
    rows = [(r, *block) for r in range(B) for block in truncated_context_blocks(L, context, stride)]
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        windows = torch.stack([tokens[r, start:start + context + 1] for r, _, _, start in part])
        nats = chunked_token_nats(model, windows, context, dtype)  # (n, context): j scores token start + j + 1
        for k, (r, first, stop, start) in enumerate(part):
            out[r, first:stop] = nats[k, first - start:stop - start]
    return out


# Largest (rows x positions x vocab) logits tensor one right-padded forward may produce; above it
# (RecurrentGemma's 256k vocabulary at long contexts) the contexts go through `prefill_many`,
# which keeps only their last position's logits.
LOGITS_BUDGET = 1 << 28


@torch.no_grad()
def continuation_logprobs(model: LanguageModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 16, max_length: int | None = None, dtype: str = "auto",
                          progress: Callable[[int], object] | None = None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation | context) in nats,
    whether greedy decoding would produce the continuation).

    A batch of requests with distinct contexts is one right-padded forward of context +
    continuation (while its logits fit `LOGITS_BUDGET` elements). Requests that share a context (the choices of a multiple-choice question) run
    it once: the distinct contexts of a batch go through the model together (`prefill_many`:
    left-padded, each a document of its own, only the last position's logits computed),
    their states are forked into one slot per request (`ModelCache.select`), and the
    continuations run from there in one batched forward (none at all for one-token
    continuations). A batch holds about `batch_size` requests, whole groups only, longest
    first. Contexts are truncated from the left so that context + continuation fits
    `max_length` tokens (when given); the context keeps at least one token.
    `dtype`: the GEMM precision (`griffinlm.precision`); `progress(n)` is called with the number
    of requests scored after each batch."""
    rows: list[tuple[tuple[int, ...], list[int]]] = []
    for context, continuation in requests:
        context, continuation = [int(t) for t in context], [int(t) for t in continuation]
        if not context or not continuation:
            raise ValueError("every request needs a non-empty context (e.g. BOS) and continuation")
        if max_length is not None and len(context) + len(continuation) > max_length:
            context = context[-max(1, max_length - len(continuation)):]
        rows.append((tuple(context), continuation))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(rows):
        groups.setdefault(context, []).append(i)
    # Longest first: batches hold similar lengths, and a too-long request fails at the first batch.
    order = sorted(groups, key=lambda c: -(len(c) + max(len(rows[i][1]) for i in groups[c])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    batch: list[tuple[int, ...]] = []
    size = 0
    for context in order + [None]:
        if batch and (context is None or size + len(groups[context]) > batch_size):
            _score_batch(model, batch, [groups[c] for c in batch], rows, results, dtype)
            if progress is not None:
                progress(size)
            batch, size = [], 0
        if context is not None:
            batch.append(context)
            size += len(groups[context])
    return results


def _score_batch(model: LanguageModel, contexts: list[tuple[int, ...]], members: list[list[int]],
                 rows: list[tuple[tuple[int, ...], list[int]]], results: list[tuple[float, bool]],
                 dtype: str) -> None:
    """Scores the requests `members[j]` (indices into `rows`) of each context `contexts[j]`."""
    device = next(model.parameters()).device
    T = max(len(c) + len(rows[m[0]][1]) for c, m in zip(contexts, members))
    if all(len(m) == 1 for m in members) and len(contexts) * T * model.config.vocab_size <= LOGITS_BUDGET:
        # nothing shared: one right-padded forward
        tokens = torch.zeros(len(contexts), T, dtype=torch.long)
        for j, (c, m) in enumerate(zip(contexts, members)):
            seq = list(c) + rows[m[0]][1]
            tokens[j, :len(seq)] = torch.tensor(seq)  # the padding comes after every scored position
        tokens = tokens.to(device)
        with autocast(device, dtype):
            logits = model(tokens)
        for j, (c, m) in enumerate(zip(contexts, members)):
            n = len(rows[m[0]][1])
            # logits at t predict token t + 1; log-softmax of the scored positions only
            span = torch.log_softmax(logits[j, len(c) - 1:len(c) - 1 + n].float(), dim=-1)
            results[m[0]] = _span_score(span, tokens[j, len(c):len(c) + n])
        return
    g, C = len(contexts), max(len(c) for c in contexts)
    flat = [i for m in members for i in m]
    fork = [j for j, m in enumerate(members) for _ in m]  # request row -> its context row
    L = max(len(rows[i][1]) for i in flat)
    cache = model.init_cache(g, max_length=C + L)
    with autocast(device, dtype):
        last = model.prefill_many([torch.tensor(c) for c in contexts], cache, list(range(g)))  # (g, V)
    first = torch.log_softmax(last.float(), dim=-1)  # (g, V): each continuation's first token
    later = None
    if L > 1:
        conts = torch.zeros(len(flat), L - 1, dtype=torch.long)
        for r, i in enumerate(flat):
            cont = rows[i][1][:-1]
            conts[r, :len(cont)] = torch.tensor(cont, dtype=torch.long)  # right padding: never scored
        with autocast(device, dtype):
            logits, _ = model(conts.to(device), cache=cache.select(fork))
        later = torch.log_softmax(logits.float(), dim=-1)  # (R, L - 1, V)
    for r, i in enumerate(flat):
        cont = rows[i][1]
        target = torch.tensor(cont, device=device)
        logp = first[fork[r]][None] if later is None else torch.cat([first[fork[r]][None], later[r, :len(cont) - 1]])
        results[i] = _span_score(logp, target)


def _span_score(logp: torch.Tensor, target: torch.Tensor) -> tuple[float, bool]:
    """(sum of log p(target), whether each target is the argmax) for log-probs (n, V), targets (n,)."""
    lp = logp.gather(-1, target[:, None])[:, 0]
    return float(lp.sum()), bool((logp.argmax(-1) == target).all())
