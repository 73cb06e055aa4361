"""Tokenizers: a byte-level one that needs no files, and wrappers for local tokenizer files.

Every tokenizer exposes the same small surface: `encode(bytes | str) -> np.ndarray` of token ids
(no specials added), `decode(ids) -> str`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `is_byte_level`
and `to_dict()` (a JSON-safe description stored in checkpoints and corpus caches).
"""
from __future__ import annotations

import os
from typing import Iterable, Protocol

import numpy as np


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    is_byte_level: bool

    def encode(self, text: bytes | str) -> np.ndarray: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_dict(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 are tokens 0..255; then BOS = 256, EOS = 257, PAD = 258 (vocab 259).

    One token is one byte, so bits per byte is bits per non-special token.
    """

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258
    is_byte_level = True

    def encode(self, text: bytes | str) -> np.ndarray:
        """Returns a (len(bytes),) uint16 array."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        """Drops special tokens; invalid UTF-8 (a model may emit any byte) becomes U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "byte"}


class _FileTokenizer:
    """Shared part of the wrappers around a local tokenizer file; specials are appended after
    the file's own vocabulary unless the file already defines them."""

    is_byte_level = False

    def __init__(self, path: str, base_vocab: int, bos: int | None, eos: int | None, pad: int | None):
        self.path = os.path.abspath(path)
        extra = base_vocab
        ids = []
        for found in (bos, eos, pad):
            if found is None:
                ids.append(extra)
                extra += 1
            else:
                ids.append(found)
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = extra

    def _specials(self) -> set[int]:
        return {self.bos_id, self.eos_id, self.pad_id}


class HFTokenizer(_FileTokenizer):
    """A `tokenizers` JSON file (e.g. tokenizer.json) read locally; no download."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("a tokenizer.json file needs the `tokenizers` package: pip install tokenizers") from e
        self._tok = _Tok.from_file(path)
        find = self._tok.token_to_id
        bos = next((find(t) for t in ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>") if find(t) is not None), None)
        eos = next((find(t) for t in ("</s>", "<eos>", "[EOS]", "<|endoftext|>") if find(t) is not None), None)
        pad = next((find(t) for t in ("<pad>", "[PAD]") if find(t) is not None), None)
        super().__init__(path, self._tok.get_vocab_size(with_added_tokens=True), bos, eos, pad)

    def encode(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        specials = self._specials()
        return self._tok.decode([int(i) for i in ids if int(i) not in specials])

    def to_dict(self) -> dict:
        return {"kind": "tokenizers", "path": self.path}


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece `.model` file read locally."""

    def __init__(self, path: str):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("a .model file needs the `sentencepiece` package: pip install sentencepiece") from e
        self._sp = spm.SentencePieceProcessor(model_file=path)

        def valid(i: int) -> int | None:
            return i if i is not None and i >= 0 else None

        super().__init__(path, self._sp.get_piece_size(), valid(self._sp.bos_id()),
                         valid(self._sp.eos_id()), valid(self._sp.pad_id()))

    def encode(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._sp.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        specials = self._specials()
        return self._sp.decode([int(i) for i in ids if int(i) not in specials])

    def to_dict(self) -> dict:
        return {"kind": "sentencepiece", "path": self.path}


def load_tokenizer(spec: str | dict | None) -> Tokenizer:
    """`None`/"byte" -> ByteTokenizer; a path ending in .json -> HFTokenizer; .model -> SentencePiece;
    or a dict from `to_dict()`."""
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind in ("tokenizers", "sentencepiece"):
            return load_tokenizer(spec["path"])
        raise ValueError(f"unknown tokenizer kind {kind!r} (expected byte, tokenizers or sentencepiece)")
    if spec is None or spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"tokenizer file not found: {spec} (use 'byte' for the built-in byte tokenizer)")
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(f"tokenizer file {spec} must be a tokenizers .json or a SentencePiece .model file")
