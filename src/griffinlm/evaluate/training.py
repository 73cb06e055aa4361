"""A thin training adapter for the studies: train a model in memory and return it with its history.

`griffinlm.train.Trainer` is built around a run directory (checkpoints, metrics, resume) and a data
string; the studies train many small models on data they build themselves (e.g. a synthetic task
with non-default settings) and keep only the numbers, which the run cache stores. So this module
reuses the training package's pieces (the AdamW parameter groups, the warmup + cosine schedule,
the masked loss, autocast and `evaluate`) in a loop without files.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..data import Batch
from ..model import LanguageModel
from ..precision import autocast
from ..train.loop import masked_nats
from ..train.optim import lr_at, make_optimizer


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings of one study run (AdamW, warmup then cosine decay, as in `griffinlm train`).

    warmup_steps: None means steps // 10.
    """

    steps: int
    batch_size: int
    lr: float = 3e-3
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    beta2: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be at least 1, got {self.steps}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @property
    def resolved_warmup(self) -> int:
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EvalFn = Callable[[LanguageModel], dict[str, Any]]


def train_model(model_cfg: ModelConfig, next_batch: Callable[[], Batch], spec: TrainSpec,
                device: torch.device, eval_fn: EvalFn | None = None, eval_every: int = 0,
                log: Callable[[str], None] | None = None) -> tuple[LanguageModel, dict[str, Any]]:
    """Trains a fresh model for `spec.steps` steps on batches from `next_batch`.

    Args:
        model_cfg: the model to build (seeded with `spec.seed`).
        next_batch: returns the next training `Batch` (loss only where `loss_mask` is set).
        spec: optimisation settings.
        device: where to train (bf16 autocast on GPU, fp32 on CPU).
        eval_fn: called in eval mode under no_grad every `eval_every` steps and after the last
            step; its dict is recorded with the step in `history`.
        log: progress messages (one line per evaluation).

    Returns:
        (model in eval mode, {"history": [...], "train_loss": last-10-step mean nats/token,
        "train_seconds": float, "params": non-embedding parameter count}).
    """
    torch.manual_seed(spec.seed)
    model = LanguageModel(model_cfg).to(device)
    optimizer = make_optimizer(model, spec.lr, spec.weight_decay, (0.9, spec.beta2), 1e-8)
    history: list[dict[str, Any]] = []
    recent: list[float] = []
    seconds = 0.0
    model.train()
    for step in range(spec.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, spec.lr, spec.resolved_warmup, spec.steps, spec.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next_batch().to(device)
        with autocast(device):
            logits = model(batch.tokens, segment_pos=batch.segment_pos)
        loss = masked_nats(logits, batch) / max(batch.num_targets, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        seconds += time.perf_counter() - t0
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {step + 1}; lower the learning rate")
        recent = (recent + [value])[-10:]
        done = step + 1
        if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == spec.steps):
            model.eval()
            with torch.no_grad():
                record = {"step": done, "train_loss": sum(recent) / len(recent), **eval_fn(model)}
            model.train()
            history.append(record)
            if log is not None:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
                log(f"  step {done}/{spec.steps}: {shown}")
    model.eval()
    return model, {"history": history, "train_loss": sum(recent) / len(recent), "train_seconds": seconds,
                   "params": model.param_count()}
