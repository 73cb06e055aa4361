"""Packing documents into fixed-length training sequences, with segment positions.

A split is one token stream of documents back to back (each BOS ... EOS). Sequence i is the window
`stream[i*T : i*T + T + 1]`: inputs are its first T tokens, targets its last T. Each input token
carries its position within its document (`segment_pos`, 0 at the document's BOS), which the model
uses to reset the recurrence and to stop convolution and attention at document starts. A target
that is a document's BOS (predicting the next document from the previous one) is masked out of
the loss; so are PAD targets in the zero-padded last held-out window.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .corpus import TokenSplit


@dataclass
class Batch:
    """A training or evaluation batch.

    tokens, targets, segment_pos: (B, T) int64; loss_mask: (B, T) bool, True where the target counts.
    num_bytes: UTF-8 bytes the counted targets stand for (for bits per byte).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    segment_pos: torch.Tensor
    loss_mask: torch.Tensor
    num_bytes: float

    def to(self, device: torch.device | str) -> "Batch":
        nb = torch.device(device).type == "cuda"
        return Batch(self.tokens.to(device, non_blocking=nb), self.targets.to(device, non_blocking=nb),
                     self.segment_pos.to(device, non_blocking=nb), self.loss_mask.to(device, non_blocking=nb),
                     self.num_bytes)

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum())


def segment_positions(doc_starts: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Position of each stream index within its document. doc_starts: (D,) sorted; index: any shape."""
    doc = np.searchsorted(doc_starts, index, side="right") - 1
    return index - doc_starts[np.maximum(doc, 0)]


class PackedSequences:
    """Fixed-length windows over one split.

    Args:
        split: the memory-mapped split.
        seq_len: T, tokens per sequence (>= 2).
        pad_id: token used to fill the last, partial window (only with `pad_last`).
        specials: token ids that are not text (BOS, EOS, PAD), excluded from byte counts.
        pad_last: include a final zero-padded window so every token is covered (evaluation).
    """

    def __init__(self, split: TokenSplit, seq_len: int, pad_id: int, specials: tuple[int, ...],
                 pad_last: bool = False):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.split, self.seq_len, self.pad_id = split, seq_len, pad_id
        self.specials = np.asarray(specials)
        n = len(split.tokens)
        full = max(0, (n - 1) // seq_len)
        self.num_sequences = max(full, -(-(n - 1) // seq_len)) if pad_last else full
        if self.num_sequences == 0:
            raise ValueError(f"the {split.name} split has {n} tokens, too few for one sequence of "
                             f"{seq_len} + 1 tokens; use a smaller --seq-len or more data")
        # Subword tokenizers: a text token stands for this many bytes on average in this split.
        self.bytes_per_token = split.bytes_per_text_token

    def __len__(self) -> int:
        return self.num_sequences

    def get(self, indices: np.ndarray) -> Batch:
        """Batch of the sequences at `indices` (B,)."""
        T, stream = self.seq_len, self.split.tokens
        idx = np.asarray(indices, dtype=np.int64)[:, None] * T + np.arange(T + 1)  # (B, T+1)
        valid = idx < len(stream)
        window = np.full(idx.shape, self.pad_id, dtype=np.int64)
        window[valid] = stream[idx[valid]]
        pos = segment_positions(self.split.doc_starts, idx)
        mask = (pos[:, 1:] != 0) & valid[:, 1:]
        text = mask & ~np.isin(window[:, 1:], self.specials)
        return Batch(
            tokens=torch.from_numpy(window[:, :-1].copy()),
            targets=torch.from_numpy(window[:, 1:].copy()),
            segment_pos=torch.from_numpy(pos[:, :-1].copy()),
            loss_mask=torch.from_numpy(mask),
            num_bytes=float(text.sum()) * self.bytes_per_token,
        )


class BatchSampler:
    """Shuffled sequences, epoch after epoch, with a resumable position.

    The order of epoch e is a permutation drawn from `np.random.default_rng([seed, e])`, so the state
    is just (epoch, offset): no RNG state needs saving, and resuming is exact.
    """

    def __init__(self, data: PackedSequences, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def next_batch(self) -> Batch:
        picked, count = [], 0
        while count < self.batch_size:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - count, len(self._order) - self.offset)
            picked.append(self._order[self.offset:self.offset + take])
            self.offset += take
            count += take
        return self.data.get(np.concatenate(picked))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "num_sequences": len(self.data), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["num_sequences"] != len(self.data):
            raise ValueError(f"data changed since the checkpoint: it had {state['num_sequences']} sequences, "
                             f"now {len(self.data)}")
        self.seed, self.epoch, self.offset = state["seed"], state["epoch"], state["offset"]
        self._order = self._permutation(self.epoch)


def eval_batches(data: PackedSequences, batch_size: int, max_sequences: int | None = None):
    """The first `max_sequences` sequences (all by default) in order, `batch_size` at a time."""
    n = len(data) if max_sequences is None else min(len(data), max_sequences)
    for start in range(0, n, batch_size):
        yield data.get(np.arange(start, min(n, start + batch_size)))
