"""A fine-tuning run: a base checkpoint, LoRA adapters (or every weight), instruction data, the
pre-training loop (`train.Trainer` with a `TrainingJob`), and what comes out of it.

A LoRA run's checkpoints hold the adapters only (plus optimizer moments and RNG state, for an
exact resume); trainer.json names the base checkpoint and a fingerprint of its weights, and
`load_finetuned` rebuilds base + adapters from both. At the end of a LoRA run the adapters are
also written in peft's format (`OUT/adapter`); `merge` writes a plain checkpoint with the
adapters folded in (`OUT/merged`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from ..checkpoint import (CheckpointError, load_weights, read_checkpoint, read_trainer, resolve_checkpoint,
                          save_model_checkpoint)
from ..data import Tokenizer
from ..interop.weights import shard_files
from ..loading import load
from ..model import LanguageModel
from ..train.config import TrainConfig
from ..train.loop import Trainer, TrainingJob, trainable_names
from .data import Example, instruction_data
from .lora import LoraSettings, apply_lora, describe, merge_lora, save_adapter

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


@dataclass
class FinetuneConfig:
    """base: the checkpoint to start from (a run, checkpoint, weights or RecurrentGemma directory);
    lora: the adapters (None: full fine-tuning of every weight); val_fraction: examples held out."""

    base: str
    lora: LoraSettings | None = None
    val_fraction: float = 0.1


def base_fingerprint(path: str) -> dict:
    """Where the base weights are and what they are: a griffinlm checkpoint by its manifest's
    sha256 of model.safetensors, any other directory by its safetensors files' sizes. A LoRA
    checkpoint applies to exactly these weights."""
    path = os.path.abspath(path)
    source, trainer = read_trainer(path)
    if trainer.get("manifest"):
        return {"path": os.path.abspath(source), "sha256": trainer["manifest"]["model.safetensors"]["sha256"]}
    return {"path": path, "files": {os.path.basename(f): os.path.getsize(f) for f in shard_files(path)}}


def load_base(fingerprint: dict, device: str | torch.device = "cpu") -> tuple[LanguageModel, Tokenizer]:
    """The base model a LoRA checkpoint recorded, in float32; CheckpointError if it moved or changed."""
    path = fingerprint["path"]
    if not os.path.isdir(path):
        raise CheckpointError(f"the base checkpoint of these adapters is gone: {path}")
    if base_fingerprint(path) != fingerprint:
        raise CheckpointError(f"the base checkpoint {path} changed since the adapters were trained on it")
    return load(path, device, dtype=torch.float32)


def prepare(cfg: FinetuneConfig, train: TrainConfig, verbose: bool = True) -> tuple[TrainingJob, list[Example], object]:
    """(the Trainer's job, the held-out examples, the PeftModel or None) for a run. Fails before
    any training on bad data (the line named), bad LoRA targets or a rank too large."""
    # fp32 master weights (bf16 GEMMs come from --dtype); `load` refuses a tokenizer larger than the model
    model, tok = load(cfg.base, dtype=torch.float32)
    data, held_out = instruction_data(train.data, tok, train.seq_len, train.batch_size // train.grad_accum,
                                      train.seed, cfg.val_fraction)
    peft_model = None
    if cfg.lora is not None:
        peft_model = apply_lora(model, cfg.lora)
        if verbose:
            print(describe(model), file=sys.stderr, flush=True)
    record = {"kind": "finetune", "base": base_fingerprint(cfg.base), "val_fraction": cfg.val_fraction,
              "lora": cfg.lora.to_dict() if cfg.lora is not None else None}
    return TrainingJob(model, data, record, trainable_only=cfg.lora is not None), held_out, peft_model


def finetune_record(path: str) -> dict | None:
    """The fine-tuning record of a run or checkpoint directory (None if it is not one)."""
    try:
        _, trainer = read_trainer(path)
    except CheckpointError:
        return None
    job = trainer.get("job")
    return job if isinstance(job, dict) and job.get("kind") == "finetune" else None


def load_finetuned(path: str, device: str | torch.device = "cpu", merge: bool = True):
    """(model, tokenizer) of a LoRA fine-tuning run or checkpoint: its base with the saved
    adapters, folded in when `merge` (the fastest model to serve), else the PeftModel."""
    record = finetune_record(path)
    if record is None or record.get("lora") is None:
        raise CheckpointError(f"{path} is not a LoRA fine-tuning checkpoint")
    ckpt = read_checkpoint(resolve_checkpoint(path))
    model, tok = load_base(record["base"], device)
    peft_model = apply_lora(model, LoraSettings.from_dict(record["lora"]))
    load_weights(ckpt, model, trainable_names(model))
    if not merge:
        return peft_model, tok
    return merge_lora(peft_model).eval(), tok


def answer_accuracy(model: LanguageModel, tok: Tokenizer, examples: list[Example], max_new_tokens: int = 64,
                    batch_size: int = 16) -> float:
    """Fraction of `examples` whose greedy answer (up to EOS) equals the expected one, both
    stripped of surrounding whitespace."""
    was_training = model.training
    model.eval()
    hits = 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                longest = max(len(tok.encode(e.answer)) for e in chunk) + 2
                outs = model.generate([e.prompt_ids for e in chunk], min(max_new_tokens, longest),
                                      stop_tokens=tok.eos_id)
                for e, out in zip(chunk, outs):
                    ids = [int(i) for i in out[len(e.prompt_ids):]]
                    if tok.eos_id in ids:
                        ids = ids[:ids.index(tok.eos_id)]
                    hits += tok.decode(ids).strip() == e.answer.strip()
    finally:
        model.train(was_training)
    return hits / max(len(examples), 1)


def write_outputs(trainer: Trainer, peft_model, merge: bool, model: LanguageModel | None = None) -> dict:
    """After a finished run: the adapters in peft's format (LoRA runs) and, with `merge`, a plain
    checkpoint with the adapters folded in (of a full fine-tuning run: `model`, default the
    trainer's; a plain copy when the trainer's is sharded). Returns {"adapter": dir, "merged": dir}."""
    written: dict = {}
    if peft_model is not None:
        written["adapter"] = save_adapter(peft_model, os.path.join(trainer.out_dir, ADAPTER_DIR),
                                          base_name=trainer.job.record["base"]["path"])
    if merge:
        merged = merge_lora(peft_model) if peft_model is not None else (model or trainer.model)
        written["merged"] = save_model_checkpoint(
            os.path.join(trainer.out_dir, MERGED_DIR), trainer.step, merged,
            {"tokenizer": trainer.data.tokenizer.to_dict(), "merged_from": os.path.abspath(trainer.out_dir)})
    return written
