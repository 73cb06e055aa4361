"""Reference cross-entropy over the tied output layer: the whole (N, V) logits at once.

What `ops.loss.tied_cross_entropy` computes chunk by chunk, written the obvious way (and what
the training step computed before it): logits = hidden @ embedding^T, RecurrentGemma's soft-cap
cap * tanh(logits / cap) when there is one, then summed -log softmax at the targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # target id of positions that do not count


def tied_cross_entropy_reference(hidden: torch.Tensor, embedding: torch.Tensor, targets: torch.Tensor,
                                 mask: torch.Tensor | None = None, soft_cap: float | None = None) -> torch.Tensor:
    """Summed nats of the counted targets (a scalar in fp32, or float64 for float64 inputs).

    Args:
        hidden: (..., D) final-norm outputs. embedding: (V, D) the tied output layer.
        targets: (...) long next-token ids. mask: optional (...) bool, True where the target
            counts (targets equal to -100 never count).
        soft_cap: logits become cap * tanh(logits / cap); None: no cap.
    """
    logits = F.linear(hidden, embedding)  # (..., V), materialised whole
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype)
    if soft_cap is not None:
        logits = torch.tanh(logits / soft_cap) * soft_cap
    if mask is not None:
        targets = targets.masked_fill(~mask, IGNORE)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")
