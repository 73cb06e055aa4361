"""The training loop: AdamW, warmup + cosine, clipping, accumulation, evaluation, checkpoints."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from ..checkpoint import (CheckpointError, check_config, list_checkpoints, load_optimizer, load_weights,
                          read_checkpoint, restore_rng, save_checkpoint)
from ..config import ModelConfig
from ..data import Batch
from ..model import LanguageModel
from ..parallel import (ParallelContext, ShardedSampler, launched_by_torchrun, mixed_precision_policy, parallelize,
                        setup_distributed)
from ..precision import autocast, compute_dtype
from .config import TrainConfig
from .data import RunData, open_run_data
from .optim import lr_at, make_optimizer
from .step import batch_nats, optimizer_step
from .records import MetricsLog, plot_loss_curve, progress_bar

LN2 = math.log(2.0)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


@torch.no_grad()
def evaluate(model: LanguageModel, batches: Iterable[Batch], device: torch.device, dtype: str = "auto") -> dict:
    """Held-out loss (nats per counted target token) and bits per byte
    (total nats / ln 2 / UTF-8 bytes the counted text targets stand for), computed in `dtype`
    (see `griffinlm.precision`)."""
    was_training = model.training
    model.eval()
    nats, targets, nbytes = 0.0, 0, 0.0
    for b in batches:
        b = b.to(device)
        with autocast(device, dtype):
            nats += float(batch_nats(model, b))
        targets += b.num_targets
        nbytes += b.num_bytes
    model.train(was_training)
    if targets == 0:
        raise ValueError("evaluation data has no target tokens")
    return {"loss": nats / targets, "bits_per_byte": nats / LN2 / max(nbytes, 1e-9),
            "target_tokens": targets, "bytes": nbytes}


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that train (requires_grad): what a `trainable_only` checkpoint holds."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class TrainingJob:
    """What a run trains when it is not a new model on a corpus (`griffinlm finetune`).

    model: the model to train, built and initialised (adapters applied: only parameters with
        requires_grad train).
    data: its data.
    record: JSON-safe description stored in trainer.json ("job"); a resumed run must match it.
    trainable_only: checkpoints hold only the trainable parameters (a LoRA run's adapters; the
        record names the frozen base they apply to).
    """

    model: LanguageModel
    data: RunData
    record: dict
    trainable_only: bool = False


class Trainer:
    """One training run in `out_dir`.

    Args:
        model_config: the model; None with `resume` to take it from the checkpoint (or with `job`).
        config: training settings.
        out_dir: run directory (checkpoints/, metrics.jsonl, loss_curve.png, summary.json).
        resume: continue from the newest valid checkpoint in out_dir (if any).
        job: a prepared model and data instead of `model_config` on `config.data` (fine-tuning).
    """

    def __init__(self, model_config: ModelConfig | None, config: TrainConfig, out_dir: str,
                 resume: bool = False, kill_at_step: int | None = None, tp: int = 1, fsdp: bool = False,
                 job: TrainingJob | None = None):
        self.cfg, self.out_dir, self._kill_at_step, self.job = config, out_dir, kill_at_step, job
        if job is not None:
            if tp != 1 or fsdp:
                raise ValueError("fine-tuning runs data parallel under torchrun (no --tp / --fsdp)")
            model_config = job.model.config
        # Under torchrun (or with --tp/--fsdp): a (dp, tp) mesh; in one process, degree 1.
        self.par = _parallel_context(tp, fsdp, config.device)
        self.is_main = self.par.is_main
        # Plain (non-DTensor) parameters: one process, or adapters-only data parallelism, whose
        # checkpoints are the single-process ones (written by rank 0).
        self.trainable_only = job is not None and job.trainable_only
        self.plain_params = not self.par.distributed or self.trainable_only
        os.makedirs(out_dir, exist_ok=True)
        ckpt = self._find_resume_checkpoint() if resume else None
        if not resume and list_checkpoints(out_dir):
            raise CheckpointError(f"{out_dir} already holds checkpoints: pass --resume to continue that run, "
                                  f"or choose another --out")
        if ckpt is not None:
            saved_cfg = TrainConfig.from_dict(ckpt.trainer["train_config"])
            diff = config.resume_diff(saved_cfg)
            if diff:
                fields = "; ".join(f"{k}: checkpoint has {a!r}, requested {b!r}" for k, (a, b) in diff.items())
                raise CheckpointError(f"training settings differ from checkpoint {ckpt.path}: {fields}")
            if job is not None and ckpt.trainer.get("job") != job.record:
                saved = ckpt.trainer.get("job") or {}
                diff = sorted(k for k in set(saved) | set(job.record) if saved.get(k) != job.record.get(k))
                raise CheckpointError(f"fine-tuning settings differ from checkpoint {ckpt.path}: {', '.join(diff)}")
            if model_config is None:
                model_config = ckpt.config
            check_config(ckpt.config, model_config, ckpt.path)
        if model_config is None:
            raise ValueError("no model given and nothing to resume: pass --model PRESET")

        self.device = self.par.device
        compute_dtype(self.device, config.dtype)  # bf16 on a CPU without it: refused before any work
        micro = config.batch_size // config.grad_accum
        self.data = job.data if job is not None else open_run_data(
            config.data, config.tokenizer, config.text_field, config.seq_len, micro, config.seed,
            verbose=config.progress and self.is_main)
        if self.par.distributed:  # each DP rank reads its rows of every global micro-batch
            self.data.sampler = ShardedSampler(self.data.sampler, self.par)
        if model_config.vocab_size < self.data.vocab_size:
            raise ValueError(f"model vocab_size {model_config.vocab_size} is smaller than the data needs "
                             f"({self.data.vocab_size}); pass --config vocab_size={self.data.vocab_size}")
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.model = (job.model if job is not None else LanguageModel(model_config)).to(self.device)
        # the state-dict names a checkpoint holds (None: all)
        self.saved_names = trainable_names(self.model) if job is not None and job.trainable_only else None
        parallelize(self.model, self.par, fsdp, mixed_precision_policy(self.device) if self.par.distributed else None,
                    activation_checkpointing=config.grad_checkpointing, trainable_only=self.trainable_only)
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay,
                                        (config.beta1, config.beta2), config.eps)
        self.step, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        self.metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl") if self.is_main else os.devnull,
                                  os.path.join(out_dir, "tensorboard") if config.tensorboard and self.is_main else None)
        if ckpt is not None and (not self.plain_params or _is_distributed_checkpoint(ckpt.path)):
            from ..parallel.checkpoint import load_training_state
            load_training_state(ckpt, self.model, self.optimizer)  # any saved layout -> this one
        elif ckpt is not None:
            load_weights(ckpt, self.model, self.saved_names)
            load_optimizer(ckpt, self.optimizer)
        if ckpt is not None:
            self.data.sampler.load_state_dict(ckpt.trainer["data"])
            self.step = ckpt.step
            self.tokens_seen = ckpt.trainer["tokens_seen"]
            self.train_seconds = ckpt.trainer["train_seconds"]
            restore_rng(ckpt)
            self._log(f"resumed from {ckpt.path} at step {self.step}")
        self.metrics.truncate_after(self.step)  # drop records of steps the checkpoint does not hold
        with open(os.path.join(out_dir, "run.json") if self.is_main else os.devnull, "w") as f:
            json.dump({"model_config": self.model.config.to_dict(), "train_config": config.to_dict(),
                       "data": self.data.description, "device": str(self.device),
                       "params_non_embedding": self.model.param_count(),
                       **({"job": job.record} if job is not None else {})}, f, indent=1)

    def _find_resume_checkpoint(self):
        """Newest checkpoint that verifies; a damaged one is reported and the one before it used."""
        for path in reversed(list_checkpoints(self.out_dir)):
            try:
                return read_checkpoint(path)
            except CheckpointError as e:
                print(f"warning: skipping damaged checkpoint: {e}", file=sys.stderr)
        return None

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=sys.stderr)

    def train_step(self) -> dict:
        """One optimizer step over `batch_size` sequences. Returns the step's metrics."""
        cfg = self.cfg
        micro = [self.data.sampler.next_batch() for _ in range(cfg.grad_accum)]
        lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        try:
            r = optimizer_step(self.model, self.optimizer, micro, self.par, lr=lr, grad_clip=cfg.grad_clip,
                               dtype=cfg.dtype)
        finally:
            self.step += 1
        return {"loss": r.loss, "bits_per_byte": r.nats / LN2 / max(r.bytes, 1e-9), "lr": lr,
                "grad_norm": r.grad_norm}

    def save(self) -> str | None:
        """Writes checkpoint `step`; returns its path (None on the other ranks of an adapters-only
        data-parallel run, where rank 0 writes the single-process checkpoint)."""
        state = {"train_config": self.cfg.to_dict(), "data": self.data.sampler.state_dict(),
                 "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                 "tokenizer": self.data.tokenizer.to_dict(), **({"job": self.job.record} if self.job else {})}
        if not self.plain_params:
            from ..parallel.checkpoint import save_training_checkpoint
            return save_training_checkpoint(self.out_dir, self.step, self.model, self.optimizer, state,
                                            self.cfg.keep_last, self.par.layout())
        path = None
        if self.is_main:  # every rank holds the same plain parameters
            path = save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, state, self.cfg.keep_last,
                                   self.saved_names)
        if self.par.distributed:
            import torch.distributed as dist
            dist.barrier()
        return path

    def run(self, until: int | None = None) -> dict | None:
        """Trains to `steps`, evaluating and saving on schedule. Returns the summary (also in summary.json).

        until: stop after this step as if interrupted (no final evaluation; returns None)."""
        cfg, model = self.cfg, self.model
        model.train()
        self._log(f"{self.data.description}\nmodel: {model.param_count():,} non-embedding parameters, "
                  f"device {self.device}")
        bar = progress_bar(cfg.steps, self.step, cfg.progress and self.is_main)
        step_tokens = cfg.batch_size * cfg.seq_len
        last_eval: dict | None = None
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                rec = self.train_step()
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                self.tokens_seen += step_tokens
                rec = {"kind": "train", "step": self.step, "tokens": self.tokens_seen,
                       "tokens_per_s": step_tokens / dt, "elapsed_s": self.train_seconds, **rec}
                self.metrics.write(rec)
                bar.update(1)
                post = {"tok/s": f"{rec['tokens_per_s']:.0f}", "loss": f"{rec['loss']:.3f}",
                        "bpb": f"{rec['bits_per_byte']:.3f}"}
                if last_eval:
                    post["val_bpb"] = f"{last_eval['bits_per_byte']:.3f}"
                bar.set_postfix(post, refresh=False)
                final = self.step == cfg.steps
                if self.step % cfg.resolved_eval_every == 0 and not final:
                    last_eval = evaluate(model, self.data.held_out(cfg.eval_sequences), self.device, cfg.dtype)
                    self.metrics.write({"kind": "eval", "step": self.step, "tokens": self.tokens_seen,
                                        "split": "held_out_subset", **last_eval})
                if self.step % cfg.resolved_save_every == 0 or final:
                    self.save()
                if self._kill_at_step == self.step:  # test hook: die as abruptly as a power cut
                    os.kill(os.getpid(), signal.SIGKILL)
                if until is not None and self.step >= until:
                    break
        finally:
            bar.close()
        if until is not None and self.step < cfg.steps:
            self.metrics.close()
            return None
        result = evaluate(model, self.data.held_out(None), self.device, self.cfg.dtype)
        self.metrics.write({"kind": "eval", "step": self.step, "tokens": self.tokens_seen, "split": "held_out",
                            **result})
        self.metrics.close()
        summary = {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                   "tokens_per_s": self.tokens_seen / max(self.train_seconds, 1e-9),
                   "held_out": result, "sample": self.sample() if cfg.sample_tokens else None,
                   "loss_curve": plot_loss_curve(os.path.join(self.out_dir, "metrics.jsonl"),
                                                 os.path.join(self.out_dir, "loss_curve.png"))
                   if cfg.plot and self.is_main else None}
        with open(os.path.join(self.out_dir, "summary.json") if self.is_main else os.devnull, "w") as f:
            json.dump(summary, f, indent=1)
        return summary

    @torch.no_grad()
    def sample(self) -> str:
        """`sample_prompt` and its continuation (`sample_tokens` tokens at most, ending at EOS) as
        text, sampled at `sample_temperature` with a generator seeded by `seed` (the global RNG
        is not touched), in eval mode under the training autocast. The text generation is
        `inference.text.generate_text`, the same as `griffinlm generate`."""
        from ..inference.text import generate_text  # inference imports the model, never train

        model = self.model
        if self.par.distributed and not self.is_main:  # generation runs on rank 0
            if not self.plain_params:
                from ..parallel.checkpoint import gather_model
                gather_model(self.model)  # a collective: every rank takes part
            return ""
        if not self.plain_params:  # on one plain copy
            from ..parallel.checkpoint import gather_model
            model = gather_model(self.model).to(self.device)
        cfg = self.cfg
        was_training = model.training
        model.eval()
        try:
            with autocast(next(model.parameters()).device, cfg.dtype):
                text = generate_text(model, self.data.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                                     temperature=cfg.sample_temperature, seed=cfg.seed)
        finally:
            model.train(was_training)
        return cfg.sample_prompt + text


def _parallel_context(tp: int, fsdp: bool, device: str) -> ParallelContext:
    """The distributed context when launched by torchrun or asked for (--tp/--fsdp), else a
    single-process context (degree 1, no process group) on `device`."""
    if tp == 1 and not fsdp and not launched_by_torchrun():
        return ParallelContext(None, resolve_device(device))
    ctx = setup_distributed(tp, device)
    return ctx if ctx.distributed else ParallelContext(None, resolve_device(device))


def _is_distributed_checkpoint(path: str) -> bool:
    from ..parallel.checkpoint import is_distributed_checkpoint
    return is_distributed_checkpoint(path)
