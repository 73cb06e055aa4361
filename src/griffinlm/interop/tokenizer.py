"""The tokenizer of a RecurrentGemma (or converted) checkpoint directory, read locally.

Returns the same wrappers as `griffinlm.data.tokenizer` (`encode`, `decode`, `vocab_size`,
`bos_id`, `eos_id`, `pad_id`, `to_dict`), so anything that takes a griffinlm tokenizer takes it.
"""
from __future__ import annotations

import json
import os
import shutil

from ..data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

# Preference order: tokenizer.json needs only the `tokenizers` package and is fastest.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Files that travel with the tokenizer when a checkpoint is converted.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def find_tokenizer_file(directory: str) -> str | None:
    """Path of the first of tokenizer.json / tokenizer.model present in `directory`, or None."""
    for name in TOKENIZER_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _special_ids(directory: str) -> dict[str, int]:
    """pad/bos/eos ids from config.json when it declares them (they are the model's truth)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        cfg = json.load(f)
    ids = {}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = cfg.get(key)
        if isinstance(value, list):  # transformers allows several eos ids; the first is the main one
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            ids[key] = value
    return ids


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer stored in a checkpoint directory (tokenizer.json or tokenizer.model).

    Special ids come from the file, overridden by config.json's pad/bos/eos_token_id when present.
    Raises FileNotFoundError if the directory holds neither file.
    """
    directory = os.fspath(directory)
    path = find_tokenizer_file(directory)
    if path is None:
        raise FileNotFoundError(f"no tokenizer in {directory}: expected one of {list(TOKENIZER_FILES)}")
    tok: Tokenizer = HFTokenizer(path) if path.endswith(".json") else SentencePieceTokenizer(path)
    ids = _special_ids(directory)
    for key, attr in (("pad_token_id", "pad_id"), ("bos_token_id", "bos_id"), ("eos_token_id", "eos_id")):
        if key in ids:
            setattr(tok, attr, ids[key])
    return tok


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copies the tokenizer files of `src` into `dst`; returns the destination paths."""
    copied = []
    for name in TOKENIZER_FILES + TOKENIZER_SIDE_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            os.makedirs(dst, exist_ok=True)
            copied.append(shutil.copyfile(path, os.path.join(dst, name)))
    return copied
