"""Conversion between RecurrentGemma (`transformers` format) and griffinlm checkpoints.

`convert_from_hf` writes a griffinlm checkpoint with `griffinlm.checkpoint.save_checkpoint` (step 0,
empty optimizer state), the tokenizer files beside it and their spec in trainer.json, so
`griffinlm eval/generate --checkpoint OUT` work on it. `convert_to_hf` goes the other way.
"""
from __future__ import annotations

import json
import os

import torch

from ..checkpoint import resolve_checkpoint, save_checkpoint
from ..config import ModelConfig
from ..model import LanguageModel
from .recurrentgemma import DTYPE_NAMES, _assign, empty_model, export_recurrentgemma, load_recurrentgemma
from .tokenizer import copy_tokenizer_files, find_tokenizer_file, load_tokenizer


def convert_from_hf(src: str, out: str, dtype: torch.dtype | str | None = None, quantize: str | None = None) -> str:
    """RecurrentGemma directory `src` -> griffinlm checkpoint under run directory `out`
    (`quantize`: "int8" or "bf16" weights, quantized while reading, `griffinlm.quantize`).

    Returns the checkpoint directory (out/checkpoints/step_00000000).
    """
    model = load_recurrentgemma(src, dtype=dtype, quantize=quantize)
    os.makedirs(out, exist_ok=True)
    copy_tokenizer_files(src, out)
    state: dict = {"source_format": "recurrentgemma", "converted_from": os.path.abspath(src)}
    if find_tokenizer_file(out):
        state["tokenizer"] = load_tokenizer(out).to_dict()
    # No optimizer state: an SGD over no parameters records nothing but its hyper-parameters.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    return save_checkpoint(out, 0, model, optimizer, state, keep_last=1)


def load_native(path: str, dtype: torch.dtype | None = None) -> tuple[LanguageModel, str]:
    """(model, directory) from a griffinlm checkpoint (run or checkpoint directory) or any
    directory with config.json (ModelConfig) + model.safetensors, read tensor by tensor."""
    from safetensors import safe_open

    directory = path
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        directory = resolve_checkpoint(path)
    with open(os.path.join(directory, "config.json")) as f:
        config = ModelConfig.from_dict(json.load(f))
    model = empty_model(config)
    params = dict(model.named_parameters())
    seen = set()
    with safe_open(os.path.join(directory, "model.safetensors"), framework="pt", device="cpu") as f:
        unexpected = sorted(set(f.keys()) - set(params))
        if unexpected:
            raise ValueError(f"{directory}/model.safetensors has unexpected tensors: {unexpected}")
        for name in f.keys():
            t = f.get_tensor(name)
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"shape mismatch for {name}: checkpoint has {list(t.shape)}, "
                                 f"config implies {list(params[name].shape)}")
            _assign(model, name, t.to(dtype=dtype or t.dtype, copy=True))  # own memory, not the file's mmap
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{directory}/model.safetensors is missing tensors: {missing}")
    return model.eval(), directory


def _tokenizer_source(path: str, directory: str) -> str | None:
    """A directory holding the checkpoint's tokenizer files, if any."""
    trainer = os.path.join(directory, "trainer.json")
    if os.path.isfile(trainer):
        with open(trainer) as f:
            spec = json.load(f).get("tokenizer")
        if isinstance(spec, dict) and spec.get("path") and os.path.isfile(spec["path"]):
            return os.path.dirname(spec["path"])
    for d in (directory, path):
        if find_tokenizer_file(d):
            return d
    return None


def convert_to_hf(src: str, out: str, dtype: torch.dtype | str | None = None,
                  max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """griffinlm checkpoint `src` -> RecurrentGemma directory `out`; returns the files written."""
    if isinstance(dtype, str):
        dtype = DTYPE_NAMES[dtype]
    model, directory = load_native(src, dtype)
    tok_dir = _tokenizer_source(src, directory)
    special = None
    if tok_dir is not None:
        tok = load_tokenizer(tok_dir)
        special = {"pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    written = export_recurrentgemma(model, out, special, max_shard_bytes)
    if tok_dir is not None:
        written += copy_tokenizer_files(tok_dir, out)
    return written


__all__ = ["convert_from_hf", "convert_to_hf", "load_native"]
