"""Training for the studies: a model trained in memory and returned with its history.

`griffinlm.train.Trainer` is built around a run directory (checkpoints, metrics, resume) and a data
string; the studies train many small models on data they build themselves (e.g. a synthetic task
with non-default settings) and keep only the numbers, which the run cache stores. They configure
it with the same `TrainConfig` and run the same step (`train.step.optimizer_step`: forward, masked
loss, backward, clipping, AdamW) under the same warmup + cosine schedule, without files.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..data import Batch
from ..model import LanguageModel
from ..parallel import ParallelContext
from ..train.config import TrainConfig
from ..train.optim import lr_at, make_optimizer
from ..train.step import optimizer_step

EvalFn = Callable[[LanguageModel], dict[str, Any]]


def study_settings(steps: int, batch_size: int, lr: float, seed: int = 0) -> TrainConfig:
    """The `TrainConfig` of a study run (the fields a study sets; the rest at their defaults)."""
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)


def run_key(config: TrainConfig) -> dict[str, Any]:
    """The optimisation settings that decide a study run's result (its run-cache key)."""
    fields = ("steps", "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "min_lr_ratio",
              "grad_clip", "beta1", "beta2", "eps", "seed", "dtype")
    return {k: getattr(config, k) for k in fields}


def train_model(model_cfg: ModelConfig, next_batch: Callable[[], Batch], config: TrainConfig,
                device: torch.device, eval_fn: EvalFn | None = None, eval_every: int = 0,
                log: Callable[[str], None] | None = None) -> tuple[LanguageModel, dict[str, Any]]:
    """Trains a fresh model for `config.steps` optimizer steps on batches from `next_batch`.

    Args:
        model_cfg: the model to build (seeded with `config.seed`).
        next_batch: returns the next training micro-batch `Batch` (loss only where `loss_mask`
            is set); `config.grad_accum` of them make one step.
        config: optimisation settings (steps, lr and schedule, AdamW, clipping, dtype).
        device: where to train.
        eval_fn: called in eval mode under no_grad every `eval_every` steps and after the last
            step; its dict is recorded with the step in `history`.
        log: progress messages (one line per evaluation).

    Returns:
        (model in eval mode, {"history": [...], "train_loss": last-10-step mean nats/token,
        "train_seconds": float, "params": non-embedding parameter count}).
    """
    torch.manual_seed(config.seed)
    model = LanguageModel(model_cfg).to(device)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2), config.eps)
    par = ParallelContext(None, device)
    history: list[dict[str, Any]] = []
    recent: list[float] = []
    seconds = 0.0
    model.train()
    for step in range(config.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio)
        micro = [next_batch() for _ in range(config.grad_accum)]
        try:
            result = optimizer_step(model, optimizer, micro, par, lr=lr, grad_clip=config.grad_clip,
                                    dtype=config.dtype)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} (step {step + 1})") from None
        seconds += time.perf_counter() - t0
        recent = (recent + [result.loss])[-10:]
        done = step + 1
        if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == config.steps):
            model.eval()
            with torch.no_grad():
                record = {"step": done, "train_loss": sum(recent) / len(recent), **eval_fn(model)}
            model.train()
            history.append(record)
            if log is not None:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
                log(f"  step {done}/{config.steps}: {shown}")
    model.eval()
    return model, {"history": history, "train_loss": sum(recent) / len(recent), "train_seconds": seconds,
                   "params": model.param_count()}
