"""`griffinlm.load`: the one way to read a model and its tokenizer from a directory.

Every directory griffinlm writes or reads is accepted:
  - a training run (`griffinlm train --out DIR`): its newest checkpoint;
  - a LoRA fine-tuning run or checkpoint (`griffinlm finetune`): the base checkpoint it names,
    with the saved adapters folded in (`finetune.job.load_finetuned`);
  - a checkpoint directory (`save_checkpoint`, `griffinlm convert --from-hf`): verified against
    its manifest (sizes and sha256) before anything is loaded;
  - a weights directory: config.json holding a `ModelConfig` + model.safetensors (what
    `quantize.save_quantized` writes; a quantized file loads back quantized);
  - a `transformers` RecurrentGemma directory (config.json with model_type recurrent_gemma),
    converted while it is read (`interop.load_recurrentgemma`; `transformers` is not needed).

The tokenizer is `tokenizer` when given ('byte' or a tokenizer file), else the one recorded in
the checkpoint's trainer.json, else the tokenizer files in the directory (tokenizer.json /
tokenizer.model), else the byte tokenizer.
"""
from __future__ import annotations

import json
import os

import torch

from .checkpoint import (CheckpointError, checkpoint_dir, load_model, load_weights_file, read_trainer,
                         resolve_checkpoint)
from .config import ModelConfig
from .data import Tokenizer, load_tokenizer
from .model import LanguageModel

__all__ = ["load", "tokenizer_directory"]


def _config_json(path: str) -> dict | None:
    fp = os.path.join(path, "config.json")
    if not os.path.isfile(fp):
        return None
    try:
        with open(fp) as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"corrupt {fp}: {e}") from None


def _weights_dir(path: str, raw: dict, device: torch.device | str) -> LanguageModel:
    try:
        config = ModelConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')} is not a griffinlm ModelConfig ({e})") from None
    model = LanguageModel(config).to(device)
    load_weights_file(os.path.join(path, "model.safetensors"), model)
    return model


def _recorded_file(spec: str | dict | None) -> str | None:
    """The tokenizer file a trainer.json spec names, if it still exists."""
    path = spec.get("path") if isinstance(spec, dict) else None
    return path if path and os.path.isfile(path) else None


def _files_beside(source: str, path: str) -> str | None:
    """The first directory holding tokenizer files: the model's own (`source`), the one asked for
    (`path`), or the training run a checkpoint directory belongs to."""
    from .interop.tokenizer import find_tokenizer_file

    dirs = [source, path]
    if os.path.basename(os.path.dirname(source)) == os.path.basename(checkpoint_dir("")):  # run/checkpoints/step_*
        dirs.append(os.path.dirname(os.path.dirname(source)))
    return next((d for d in dirs if find_tokenizer_file(d)), None)


def tokenizer_directory(path: str) -> str | None:
    """The directory holding the tokenizer files of a model directory `load` reads: where its
    trainer.json's spec points if that file still exists, else the files beside the model; None
    for a model without tokenizer files (the byte tokenizer)."""
    source, trainer = read_trainer(path)
    recorded = _recorded_file(trainer.get("tokenizer"))
    return os.path.dirname(recorded) if recorded else _files_beside(source, path)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None,
         tokenizer: str | None = None, quantize: str | None = None) -> tuple[LanguageModel, Tokenizer]:
    """(model in eval mode, tokenizer) from a run, checkpoint, weights or RecurrentGemma directory
    (see the module docstring).

    Args:
        path: the directory.
        device: where the model goes.
        dtype: parameter dtype (default: as stored; RecurrentGemma: its config's torch_dtype).
        tokenizer: override the tokenizer ('byte' or a tokenizer file).
        quantize: "int8" or "bf16" weight-only quantization after loading (`griffinlm.quantize`).

    Raises FileNotFoundError for a missing directory, CheckpointError for a corrupt, incomplete or
    mismatched one (naming the file), ValueError for a tokenizer larger than the model's vocab."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    spec: str | dict | None = tokenizer
    raw = _config_json(path)
    if (job := read_trainer(path)[1].get("job")) and job.get("kind") == "finetune" and job.get("lora"):
        from .finetune.job import load_finetuned  # a LoRA run: its base with the adapters folded in

        model, tok = load_finetuned(path, device)
        if tokenizer is None:
            return _finish(model, tok, dtype, quantize)
        spec, source = tokenizer, path
    elif os.path.isfile(os.path.join(path, "trainer.json")) or os.path.isdir(checkpoint_dir(path)):
        model, ckpt = load_model(path, device)
        spec = spec if spec is not None else ckpt.trainer.get("tokenizer")
        source = ckpt.path
    elif raw is not None and raw.get("model_type") == "recurrent_gemma":
        from .interop.recurrentgemma import load_recurrentgemma

        model, source = load_recurrentgemma(path, dtype=dtype, quantize=quantize).to(device), path
        quantize = None  # quantized while reading
    elif raw is not None and os.path.isfile(os.path.join(path, "model.safetensors")):
        model, source = _weights_dir(path, raw, device), path
    else:
        resolve_checkpoint(path)  # raises CheckpointError naming what a checkpoint needs
        raise CheckpointError(f"{path} is not a griffinlm run, checkpoint or RecurrentGemma directory")
    beside = None
    if spec is None or (isinstance(spec, dict) and not _recorded_file(spec)):
        # none recorded, or recorded where it no longer is (a moved directory): the files beside it
        beside = _files_beside(source, path)
    if beside is not None:
        from .interop.tokenizer import load_tokenizer as load_directory_tokenizer

        tok = load_directory_tokenizer(beside)
    else:
        tok = load_tokenizer(spec)
    return _finish(model, tok, dtype, quantize)


def _finish(model: LanguageModel, tok: Tokenizer, dtype: torch.dtype | None,
            quantize: str | None) -> tuple[LanguageModel, Tokenizer]:
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    if dtype is not None:
        model = model.to(dtype)
    if quantize:
        from .quantize import quantize_

        quantize_(model, quantize)
    return model.eval(), tok
