"""What a training run reads: a corpus or a synthetic task, behind one small interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..data import (Batch, BatchSampler, PackedSequences, SyntheticSampler, Tokenizer, eval_batches,
                    load_tokenizer, make_task, open_corpus)

SYNTHETIC_PREFIX = "synthetic:"
_SYNTHETIC_EVAL_BATCHES = 8


@dataclass
class RunData:
    """tokenizer; sampler: resumable training batches (`next_batch`, `state_dict`, `load_state_dict`);
    held_out(max_sequences): fresh iterator of held-out batches (None = the whole split);
    vocab_size: the smallest model vocabulary that fits the data; description: for logs."""

    tokenizer: Tokenizer
    sampler: BatchSampler | SyntheticSampler
    held_out: Callable[[int | None], Iterator[Batch]]
    vocab_size: int
    description: str


def open_run_data(data: str, tokenizer: str, text_field: str, seq_len: int, micro_batch: int,
                  seed: int, verbose: bool = True) -> RunData:
    """Training and held-out data for `data` ("stdlib", a path, or "synthetic:TASK").

    Synthetic tasks ignore `seq_len` (each task has its own) and hold out a separate seed stream."""
    tok = load_tokenizer(tokenizer)
    if data.startswith(SYNTHETIC_PREFIX):
        task = make_task(data[len(SYNTHETIC_PREFIX):])
        sampler = SyntheticSampler(task, micro_batch, seed)

        def held_out_task(max_sequences: int | None) -> Iterator[Batch]:
            n = _SYNTHETIC_EVAL_BATCHES if max_sequences is None else max(1, max_sequences // micro_batch)
            for i in range(n):  # seed + 1_000_003: a stream the training sampler never visits
                yield task.sample(micro_batch, np.random.default_rng([seed + 1_000_003, i]))
        return RunData(tok, sampler, held_out_task, max(task.vocab_size, tok.vocab_size), f"task {task}")

    corpus = open_corpus(data, tok, text_field=text_field, verbose=verbose)
    specials = (tok.bos_id, tok.eos_id, tok.pad_id)
    train = PackedSequences(corpus.train, seq_len, tok.pad_id, specials)
    val = PackedSequences(corpus.val, seq_len, tok.pad_id, specials, pad_last=True)
    sampler = BatchSampler(train, micro_batch, seed)

    def held_out(max_sequences: int | None) -> Iterator[Batch]:
        return eval_batches(val, micro_batch, max_sequences)
    s = corpus.meta["splits"]
    desc = (f"{data}: {s['train']['docs']} documents / {s['train']['tokens']:,} tokens for training, "
            f"{s['val']['docs']} documents / {s['val']['tokens']:,} tokens held out")
    return RunData(tok, sampler, held_out, tok.vocab_size, desc)
