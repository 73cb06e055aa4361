"""`TrainConfig`: everything about a training run that is not the model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..precision import check_dtype

# Fields that must be equal for a resumed run to continue exactly where the old one stopped.
# The others (steps, eval/save cadence, device, progress display) may change on resume.
RESUME_FIELDS = ("data", "tokenizer", "text_field", "batch_size", "seq_len", "grad_accum", "lr",
                 "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "seed")


@dataclass
class TrainConfig:
    """Settings of a training run.

    data: "stdlib", a path (text file, directory, .jsonl, built corpus) or "synthetic:TASK".
    batch_size: sequences per optimizer step (split into `grad_accum` micro-batches).
    seq_len: tokens per sequence (T). lr: peak learning rate, reached after `warmup_steps` (default
    min(steps // 10, 1000)), then cosine decay to lr * min_lr_ratio at the last step.
    eval_every / save_every: in optimizer steps; 0 picks about 10 evaluations per run, and saving at
    every evaluation. eval_sequences: held-out sequences for periodic evaluations (the final one
    uses the whole held-out split). dtype: GEMM precision, "auto" (bf16 autocast on CUDA, fp32 on
    CPU), "fp32" or "bf16" (see `griffinlm.precision`).
    """

    data: str = "stdlib"
    tokenizer: str = "byte"
    text_field: str = "text"
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0
    eval_sequences: int | None = 64
    save_every: int = 0
    keep_last: int = 3
    device: str = "auto"
    dtype: str = "auto"
    grad_checkpointing: bool = False
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    sample_tokens: int = 200
    sample_prompt: str = "def "
    sample_temperature: float = 0.7

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")
        if self.warmup_steps is None:
            self.warmup_steps = min(self.steps // 10, 1000)
        if self.warmup_steps < 0 or self.eval_every < 0 or self.save_every < 0 or self.sample_tokens < 0:
            raise ValueError("warmup_steps, eval_every, save_every and sample_tokens must be >= 0")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        check_dtype(self.dtype)

    @property
    def resolved_eval_every(self) -> int:
        return self.eval_every or max(1, self.steps // 10)

    @property
    def resolved_save_every(self) -> int:
        return self.save_every or self.resolved_eval_every

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def resume_diff(self, saved: "TrainConfig") -> dict[str, tuple[Any, Any]]:
        """Fields that differ from a checkpoint's and would break an exact resume: {name: (saved, now)}."""
        return {k: (getattr(saved, k), getattr(self, k)) for k in RESUME_FIELDS
                if getattr(saved, k) != getattr(self, k)}
