"""Synthetic tasks (Jelassi et al. 2024; De et al. 2024 appendix) as datasets of `Batch`es.

Each task draws examples from a numpy Generator and marks only the answer positions in
`loss_mask`, so training and scoring look at the answer alone. Token layout of the integer tasks:
data tokens are 0 .. vocab-1, then the task's special tokens; `task.vocab_size` counts them all
(a model's vocab_size must be at least that).

  SelectiveCopying  a sequence of `length` tokens, mostly NOISE, with `num_tokens` data tokens at
                    random places; after SEP, reproduce the data tokens in order.
  InductionHeads    random data tokens with TRIGGER followed by a token X somewhere; the sequence
                    ends with TRIGGER again and the answer is X.
  Phonebook         byte-level text "name: number" lines, then "? name:" and the answer number
                    (digits then a newline), tokenized with the byte tokenizer (BOS first).
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch

from .packing import Batch
from .tokenizer import ByteTokenizer


def _batch(rows: list[np.ndarray], answer_starts: list[int], pad_id: int) -> Batch:
    """rows: full example token sequences (context + answer); the answer starts at answer_starts[i].
    Predicts each row's token t+1 from t; loss only on answer tokens."""
    T = max(len(r) for r in rows) - 1
    seq = np.full((len(rows), T + 1), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=bool)
    for i, (row, a) in enumerate(zip(rows, answer_starts)):
        seq[i, :len(row)] = row
        mask[i, a - 1:len(row) - 1] = True
    tokens = torch.from_numpy(seq[:, :-1].copy())
    return Batch(tokens, torch.from_numpy(seq[:, 1:].copy()),
                 torch.arange(T).expand(len(rows), T).clone(), torch.from_numpy(mask), float(mask.sum()))


@dataclass(frozen=True)
class SelectiveCopying:
    """length: context tokens; num_tokens: data tokens to copy; vocab: distinct data tokens."""

    length: int = 64
    num_tokens: int = 8
    vocab: int = 16

    def __post_init__(self):
        if not 1 <= self.num_tokens <= self.length:
            raise ValueError(f"num_tokens must be in [1, length={self.length}], got {self.num_tokens}")
        if self.vocab < 1:
            raise ValueError(f"vocab must be at least 1, got {self.vocab}")

    @property
    def noise_id(self) -> int:
        return self.vocab

    @property
    def sep_id(self) -> int:
        return self.vocab + 1

    @property
    def vocab_size(self) -> int:
        return self.vocab + 2

    @property
    def seq_len(self) -> int:
        return self.length + self.num_tokens

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        rows, starts = [], []
        for _ in range(batch_size):
            ctx = np.full(self.length, self.noise_id, dtype=np.int64)
            where = np.sort(rng.choice(self.length, self.num_tokens, replace=False))
            data = rng.integers(0, self.vocab, self.num_tokens)
            ctx[where] = data
            rows.append(np.concatenate([ctx, [self.sep_id], data]))
            starts.append(self.length + 1)
        return _batch(rows, starts, self.noise_id)


@dataclass(frozen=True)
class InductionHeads:
    """length: tokens before the final TRIGGER; vocab: distinct data tokens."""

    length: int = 64
    vocab: int = 16

    def __post_init__(self):
        if self.length < 3:
            raise ValueError(f"length must be at least 3, got {self.length}")
        if self.vocab < 1:
            raise ValueError(f"vocab must be at least 1, got {self.vocab}")

    @property
    def trigger_id(self) -> int:
        return self.vocab

    @property
    def vocab_size(self) -> int:
        return self.vocab + 1

    @property
    def seq_len(self) -> int:
        return self.length + 1

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        rows, starts = [], []
        for _ in range(batch_size):
            seq = rng.integers(0, self.vocab, self.length)
            at = int(rng.integers(0, self.length - 2))  # TRIGGER at `at`, its token at `at + 1`
            seq[at] = self.trigger_id
            rows.append(np.concatenate([seq, [self.trigger_id, seq[at + 1]]]))
            starts.append(self.length + 1)
        return _batch(rows, starts, 0)


@dataclass(frozen=True)
class Phonebook:
    """num_entries: lines in the book; name_len: letters per first and last name;
    num_digits: digits per number. Names in one book are distinct."""

    num_entries: int = 20
    name_len: int = 5
    num_digits: int = 7

    def __post_init__(self):
        for field in ("num_entries", "name_len", "num_digits"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")

    @property
    def vocab_size(self) -> int:
        return ByteTokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        line = 2 * self.name_len + 4 + self.num_digits  # "First Last: 1234567\n"
        # BOS + book + "? First Last: " + answer digits + "\n", minus the last token (never an input)
        return 1 + self.num_entries * line + (2 * self.name_len + 5) + self.num_digits

    def _name(self, rng: np.random.Generator) -> str:
        letters = string.ascii_lowercase
        parts = ["".join(letters[j] for j in rng.integers(0, 26, self.name_len)) for _ in range(2)]
        return " ".join(p.capitalize() for p in parts)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        tok = ByteTokenizer()
        rows, starts = [], []
        for _ in range(batch_size):
            book: dict[str, str] = {}
            while len(book) < self.num_entries:
                book[self._name(rng)] = "".join(str(d) for d in rng.integers(0, 10, self.num_digits))
            names = list(book)
            query = names[int(rng.integers(0, len(names)))]
            context = "".join(f"{n}: {book[n]}\n" for n in names) + f"? {query}: "
            ids = np.concatenate([[tok.bos_id], tok.encode(context), tok.encode(book[query] + "\n")])
            rows.append(ids.astype(np.int64))
            starts.append(1 + len(context.encode()))
        return _batch(rows, starts, tok.pad_id)


TASKS = {"selective_copying": SelectiveCopying, "induction_heads": InductionHeads, "phonebook": Phonebook}


def make_task(name: str, **settings) -> SelectiveCopying | InductionHeads | Phonebook:
    """A task by name ("selective_copying", "induction_heads", "phonebook") with its settings."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**settings)


class SyntheticSampler:
    """Endless batches of a task; batch i comes from `default_rng([seed, i])`, so the state is i."""

    def __init__(self, task, batch_size: int, seed: int):
        self.task, self.batch_size, self.seed, self.index = task, batch_size, seed, 0

    def next_batch(self) -> Batch:
        batch = self.task.sample(self.batch_size, np.random.default_rng([self.seed, self.index]))
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.index, self.seed = state["index"], state["seed"]


@torch.no_grad()
def answer_accuracy(logits: torch.Tensor, batch: Batch) -> tuple[float, float]:
    """(token accuracy, exact-match accuracy) of greedy predictions on the answer positions.
    logits: (B, T, V) from the model on `batch.tokens`."""
    correct = (logits.argmax(-1) == batch.targets) | ~batch.loss_mask
    token_acc = float((correct & batch.loss_mask).sum()) / max(1, batch.num_targets)
    return token_acc, float(correct.all(dim=1).float().mean())
