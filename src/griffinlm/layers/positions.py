"""Where each token of a chunk sits: its stream position and the start of its document."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Positions:
    """Position bookkeeping shared by every block in one forward call.

    Attributes:
        abs_pos: (T,) long, position of each token in the stream (cache length + arange(T)).
        segment_pos: (B, T) long, position within the token's document (RoPE uses it).
        doc_start: (B, T) long, absolute position where each token's document starts;
            nothing before it is visible to the token (attention, conv, recurrence). Negative
            when the document began before the stream (segment_pos larger than the position):
            then everything in the stream is visible and nothing is reset.
        reset: (B, T) bool, True where a document starts (abs_pos == doc_start).
        packed: False when every row is a single document starting at position 0, which
            lets blocks take unmasked fast paths.
        offset: tokens already in the cache before this chunk (abs_pos[0], as a Python int).
    """

    abs_pos: torch.Tensor
    segment_pos: torch.Tensor
    doc_start: torch.Tensor
    reset: torch.Tensor
    packed: bool
    offset: int = 0

    @classmethod
    def build(cls, batch: int, length: int, offset: int, device: torch.device,
              segment_pos: torch.Tensor | None = None,
              prev_doc_start: torch.Tensor | None = None) -> "Positions":
        """Positions for a chunk of `length` tokens after `offset` cached ones.

        Without `segment_pos` the chunk continues each row's current document, which starts
        at `prev_doc_start` (B,) (or 0). With it, a 0 marks a document start.
        """
        abs_pos = torch.arange(offset, offset + length, device=device)
        if segment_pos is None:
            start = torch.zeros(batch, dtype=torch.long, device=device) if prev_doc_start is None else prev_doc_start
            doc_start = start[:, None].expand(batch, length)
            packed = offset > 0 and bool((start > 0).any())
            segment_pos = abs_pos[None] - doc_start
        else:
            # Not clamped at 0: a segment_pos that runs past the stream start means the document
            # began before it (positions offset by the caller), so its first token is no reset.
            doc_start = abs_pos[None] - segment_pos
            packed = bool((doc_start > 0).any())
        reset = abs_pos[None] == doc_start
        return cls(abs_pos, segment_pos, doc_start, reset, packed, offset)
