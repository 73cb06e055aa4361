"""`TrainConfig`: everything about a training run that is not the model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
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

    data: str = field(default="stdlib", metadata={"help": (
        "'stdlib', a text file, a directory of text files, a .jsonl file, a built corpus directory, or "
        "synthetic:{selective_copying,induction_heads,phonebook}")})
    tokenizer: str = field(default="byte", metadata={"help": "'byte', or a local tokenizer.json / SentencePiece .model"})
    text_field: str = field(default="text", metadata={"help": "JSONL field holding the text"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per optimizer step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr (cosine)"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warmup steps; unset: steps/10, at most 1000"})
    weight_decay: float = field(default=0.1, metadata={
        "help": "AdamW decay on matrices (not norms, biases, embeddings, RG-LRU Lambda)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm"})
    seed: int = field(default=0, metadata={"help": "seed of the initialization, data order and sampling"})
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations (0: ~10 per run)"})
    eval_sequences: int | None = field(default=64, metadata={
        "help": "held-out sequences per periodic evaluation (the final one uses all)"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: at evaluations)"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})
    dtype: str = field(default="auto", metadata={"choices": ("auto", "fp32", "bf16"), "help": (
        "GEMM precision: auto = bf16 autocast on GPU, fp32 on CPU; bf16 on CPU needs native bf16 "
        "(AVX512-BF16/AMX): bf16 GEMMs, fp32 weights, norms, RG-LRU and loss")})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in backward to save memory"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})
    tensorboard: bool = field(default=True, metadata={"help": "do not write TensorBoard logs even if installed"})
    plot: bool = field(default=True, metadata={"help": "do not draw loss_curve.png at the end"})
    sample_tokens: int = field(default=200, metadata={"help": "tokens to generate at the end"})
    sample_prompt: str = field(default="def ", metadata={"help": "prompt of the final sample"})
    sample_temperature: float = field(default=0.7, metadata={"help": "temperature of the final sample"})

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
