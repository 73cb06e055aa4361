"""Conversion between RecurrentGemma (`transformers` format) and griffinlm checkpoints.

`convert_from_hf` writes a griffinlm checkpoint with `griffinlm.checkpoint.save_checkpoint` (step 0,
empty optimizer state), the tokenizer files beside it and their spec in trainer.json, so
`griffinlm eval/generate --checkpoint OUT` work on it. `convert_to_hf` goes the other way.
"""
from __future__ import annotations

import os

import torch

from ..checkpoint import save_model_checkpoint
from .recurrentgemma import DTYPE_NAMES, export_recurrentgemma, load_recurrentgemma
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
    return save_model_checkpoint(out, 0, model, state)


def convert_to_hf(src: str, out: str, dtype: torch.dtype | str | None = None,
                  max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """griffinlm checkpoint `src` -> RecurrentGemma directory `out`; returns the files written."""
    if isinstance(dtype, str):
        dtype = DTYPE_NAMES[dtype]
    from ..loading import load, tokenizer_directory

    model, _ = load(src, dtype=dtype)
    tok_dir = tokenizer_directory(src)
    special = None
    if tok_dir is not None:
        tok = load_tokenizer(tok_dir)
        special = {"pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    written = export_recurrentgemma(model, out, special, max_shard_bytes)
    if tok_dir is not None:
        written += copy_tokenizer_files(tok_dir, out)
    return written


__all__ = ["convert_from_hf", "convert_to_hf"]
