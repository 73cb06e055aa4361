"""The one training step: forward, masked loss, backward, clipping and the optimizer step, over
the micro-batches of one optimizer step. `griffinlm train` (`Trainer`) and the studies
(`evaluate.training`) both run it; a data-parallel job sums its counts over the ranks through
the parallel context (degree 1 in one process)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import Batch
from ..model import LanguageModel
from ..parallel import ParallelContext, clip_grad_norm_, dp_sum, sum_plain_gradients
from ..ops.loss import tied_cross_entropy
from ..precision import autocast


def masked_nats(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum over counted targets of -log p(target) in nats (fp32 scalar). logits: (B, T, V)."""
    targets = batch.targets.masked_fill(~batch.loss_mask, -100)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def batch_nats(model: LanguageModel, batch: Batch) -> torch.Tensor:
    """`masked_nats` of the model's logits on `batch`, without building them: the forward stops
    at the final norm (B, T, D) and the chunked tied cross-entropy takes it from there, so no
    (B, T, V) fp32 logits exist in forward or backward. Run it inside the job's autocast: the
    output layer's GEMMs take its dtype, as the model's own would. Any other module (a test's
    stand-in returning logits) goes through its logits and `masked_nats`."""
    if not isinstance(model, LanguageModel):
        return masked_nats(model(batch.tokens, segment_pos=batch.segment_pos).float(), batch)
    hidden = model(batch.tokens, segment_pos=batch.segment_pos, return_hidden=True)  # (B, T, D)
    return tied_cross_entropy(hidden, model.embed.weight, batch.targets, batch.loss_mask,
                              model.config.logits_soft_cap)


@dataclass
class StepResult:
    """One optimizer step: summed nats, counted target tokens and the bytes they stand for (over
    the whole global batch), and the gradient norm before clipping."""

    nats: float
    targets: int
    bytes: float
    grad_norm: float

    @property
    def loss(self) -> float:
        """Mean nats per target token."""
        return self.nats / max(self.targets, 1)


def optimizer_step(model: LanguageModel, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch],
                   par: ParallelContext, *, lr: float, grad_clip: float, dtype: str = "auto") -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation): each micro-batch's loss is
    divided by the whole step's target count, so the gradient is that of the step's mean loss
    whatever the split; gradients are clipped to `grad_clip` (global L2 norm), AdamW steps at
    `lr`, gradients are freed. Raises FloatingPointError on a non-finite loss."""
    device = par.device
    n_targets = sum(b.num_targets for b in micro_batches)
    n_bytes = sum(b.num_bytes for b in micro_batches)
    n_targets, n_bytes = dp_sum([n_targets, n_bytes], par)  # the whole global batch's counts
    for group in optimizer.param_groups:
        group["lr"] = lr
    nats = torch.zeros((), device=device)
    for b in micro_batches:
        b = b.to(device)
        with autocast(device, dtype):
            loss_sum = batch_nats(model, b)
        (loss_sum / max(n_targets, 1)).backward()  # the mean over the whole step's targets
        nats += loss_sum.detach()
    sum_plain_gradients(model.parameters(), par)  # adapters-only data parallelism (else nothing)
    # DTensor gradients need the mesh-aware norm; plain ones take torch's fused (foreach) one
    clip = clip_grad_norm_ if par.distributed else torch.nn.utils.clip_grad_norm_
    grad_norm = clip(model.parameters(), grad_clip)
    total = dp_sum([float(nats)], par)[0]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(total):
        raise FloatingPointError(f"training loss is {total}; lower the learning rate or check the data")
    return StepResult(total, int(n_targets), float(n_bytes), float(grad_norm))
