"""Corpora: find documents, split them train/held-out by document, tokenize them once into
memory-mapped token files, and open those files.

A built corpus is a directory holding, per split, `{split}.bin` (token ids, uint16 or uint32, the
documents back to back, each as BOS + tokens + EOS) and `{split}.idx.npy` (int64 start offset of
each document), plus `meta.json`. Only the offsets are read into memory; tokens are memory-mapped,
so a corpus larger than RAM streams from disk. Builds go to a temporary directory that is renamed
into place, so an interrupted build never leaves a half-written cache.

Sources for `open_corpus(data)`:
  "stdlib"        the running interpreter's standard-library .py files (sorted, deterministic);
  a directory     every non-hidden text file below it (binary files skipped), one document each;
                  or a directory already holding a built corpus (`meta.json`), used as is;
  a .jsonl file   one document per line, from the `text_field` key;
  any other file  one document; its last ~1% (from a line start) becomes the held-out split.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..user_cache import cache_dir
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
HELDOUT_FRACTION = 0.01
_TEST_DIRS = {"test", "tests", "idle_test", "unittest_test"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_BLOCK = 1 << 22  # bytes read at a time from a single large file


@dataclass(frozen=True)
class DocRef:
    """One document: a stable id (hashed to choose its split) and how to read its bytes."""

    doc_id: str
    read_blocks: Callable[[], Iterator[bytes]]
    fingerprint: str  # changes when the content may have changed (size, mtime)


def is_heldout(doc_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Deterministic, machine-independent choice of the held-out documents."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0**64


def _file_blocks(path: str, start: int = 0, stop: int | None = None) -> Callable[[], Iterator[bytes]]:
    def read() -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(start)
            left = (os.path.getsize(path) if stop is None else stop) - start
            while left > 0:
                block = f.read(min(_BLOCK, left))
                if not block:
                    break
                left -= len(block)
                # Cut at a newline so a subword tokenizer never sees a word split across blocks.
                if left > 0 and b"\n" in block:
                    cut = block.rindex(b"\n") + 1
                    f.seek(cut - len(block), os.SEEK_CUR)
                    left += len(block) - cut
                    block = block[:cut]
                yield block
    return read


def _stat_fp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def stdlib_documents(include_tests: bool = False) -> list[DocRef]:
    """The running interpreter's standard-library sources, sorted by relative path."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS
                             and (include_tests or d not in _TEST_DIRS))
        for name in sorted(filenames):
            if name.endswith(".py") and (include_tests or not name.startswith("test_")):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                docs.append(DocRef(rel, _file_blocks(path), _stat_fp(path)))
    docs.sort(key=lambda d: d.doc_id)
    return docs


def _looks_binary(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _directory_documents(root: str) -> list[DocRef]:
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith(".") or not os.path.isfile(path) or _looks_binary(path):
                continue
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            docs.append(DocRef(rel, _file_blocks(path), _stat_fp(path)))
    docs.sort(key=lambda d: d.doc_id)
    return docs


def _jsonl_documents(path: str, text_field: str) -> list[DocRef]:
    docs = []
    fp = _stat_fp(path)
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue

            def read(start=start, lineno=lineno) -> Iterator[bytes]:
                with open(path, "rb") as g:
                    g.seek(start)
                    raw = g.readline()
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
                yield record[text_field].encode("utf-8")
            docs.append(DocRef(f"line:{lineno}", read, fp))
    return docs


def _single_file_documents(path: str, fraction: float) -> list[DocRef]:
    """One file: the train document is its head, the held-out document its tail from a line start."""
    size = os.path.getsize(path)
    cut = int(size * (1.0 - fraction))
    with open(path, "rb") as f:
        f.seek(cut)
        window = f.read(1 << 16)
    nl = window.find(b"\n")
    if nl >= 0 and cut + nl + 1 < size:
        cut += nl + 1
    fp = _stat_fp(path)
    return [DocRef("head", _file_blocks(path, 0, cut), fp), DocRef("tail", _file_blocks(path, cut, size), fp)]


def find_documents(data: str, text_field: str = "text", include_tests: bool = False,
                   fraction: float = HELDOUT_FRACTION) -> tuple[list[DocRef], list[DocRef]]:
    """Returns (train documents, held-out documents) for a data spec (see module docstring)."""
    if data == "stdlib":
        docs = stdlib_documents(include_tests)
    elif not os.path.exists(data):
        raise FileNotFoundError(f"data path not found: {data} (use 'stdlib' for the built-in corpus)")
    elif os.path.isdir(data):
        docs = _directory_documents(data)
    elif data.endswith(".jsonl"):
        docs = _jsonl_documents(data, text_field)
    else:
        if os.path.getsize(data) == 0:
            raise ValueError(f"empty corpus: {data} has no bytes")
        head, tail = _single_file_documents(data, fraction)
        return [head], [tail]
    if not docs:
        raise ValueError(f"empty corpus: no text documents found in {data}")
    if len(docs) == 1:
        raise ValueError(f"{data} holds a single document; a held-out split by document needs at least two "
                         f"(pass the file itself to split its tail off)")
    val = [d for d in docs if is_heldout(d.doc_id, fraction)]
    if not val:  # small corpora: still hold one document out, the same one every time
        val = [min(docs, key=lambda d: hashlib.sha1(d.doc_id.encode()).digest())]
    val_ids = {d.doc_id for d in val}
    return [d for d in docs if d.doc_id not in val_ids], val


class TokenSplit:
    """One split of a built corpus, memory-mapped.

    Attributes:
        tokens: (N,) uint16/uint32 memmap of token ids.
        doc_starts: (num_docs,) int64 offsets of each document's BOS in `tokens`.
        num_bytes: UTF-8 bytes of raw text in the split (BOS/EOS excluded).
        num_text_tokens: non-special tokens in the split.
    """

    def __init__(self, directory: str, split: str, meta: dict):
        info = meta["splits"][split]
        self.name = split
        self.num_bytes = int(info["bytes"])
        self.num_text_tokens = int(info["text_tokens"])
        n = int(info["tokens"])
        path = os.path.join(directory, f"{split}.bin")
        dtype = np.dtype(meta["dtype"])
        if os.path.getsize(path) != n * dtype.itemsize:
            raise ValueError(f"corrupt corpus file {path}: expected {n} tokens, size is {os.path.getsize(path)} bytes")
        self.tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        self.doc_starts = np.load(os.path.join(directory, f"{split}.idx.npy"))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def bytes_per_text_token(self) -> float:
        """1.0 for the byte tokenizer; the average for a subword tokenizer."""
        return self.num_bytes / max(1, self.num_text_tokens)


@dataclass
class Corpus:
    directory: str
    meta: dict
    train: TokenSplit
    val: TokenSplit


def _write_split(docs: list[DocRef], tok: Tokenizer, directory: str, split: str, dtype: np.dtype) -> dict:
    starts, n_tokens, n_bytes, n_text = [], 0, 0, 0
    bos, eos = np.array([tok.bos_id], dtype), np.array([tok.eos_id], dtype)
    with open(os.path.join(directory, f"{split}.bin"), "wb") as f:
        for doc in docs:
            pieces = [bos]
            for block in doc.read_blocks():
                n_bytes += len(block)
                ids = tok.encode(block)
                if len(ids) and int(ids.max()) > np.iinfo(dtype).max:
                    raise ValueError(f"token id {int(ids.max())} does not fit {dtype}")
                pieces.append(ids.astype(dtype, copy=False))
            pieces.append(eos)
            arr = np.concatenate(pieces)
            starts.append(n_tokens)
            n_tokens += len(arr)
            n_text += len(arr) - 2
            f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
    np.save(os.path.join(directory, f"{split}.idx.npy"), np.asarray(starts, dtype=np.int64))
    return {"docs": len(docs), "tokens": n_tokens, "text_tokens": n_text, "bytes": n_bytes}


def build_corpus(train_docs: list[DocRef], val_docs: list[DocRef], tok: Tokenizer, directory: str,
                 source: str) -> None:
    """Tokenizes both splits into `directory` (atomically: built aside, then renamed)."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
        meta = {"format": FORMAT_VERSION, "source": source, "tokenizer": tok.to_dict(),
                "vocab_size": tok.vocab_size, "dtype": dtype.name, "splits": {}}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            meta["splits"][split] = _write_split(docs, tok, tmp, split, dtype)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process built it first: keep theirs
            if not os.path.exists(os.path.join(directory, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_corpus(directory: str) -> Corpus:
    path = os.path.join(directory, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')} is not {FORMAT_VERSION}")
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"corrupt or unsupported corpus metadata {path}: {e}") from None
    return Corpus(directory, meta, TokenSplit(directory, "train", meta), TokenSplit(directory, "val", meta))


def corpus_key(data: str, tok: Tokenizer, train_docs: list[DocRef], val_docs: list[DocRef],
               text_field: str = "text") -> str:
    """Cache key: interpreter version (for stdlib), the source, tokenizer, and every document's
    id and fingerprint, so edits to the source files rebuild the cache."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, os.path.abspath(data) if data != "stdlib" else "stdlib",
                         tok.to_dict(), text_field if data.endswith(".jsonl") else None]).encode())
    for split, docs in (("t", train_docs), ("v", val_docs)):
        for d in docs:
            h.update(f"{split}\0{d.doc_id}\0{d.fingerprint}\n".encode())
    stem = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}" \
        if data == "stdlib" else os.path.basename(os.path.normpath(data)) or "data"
    return f"{stem}-{tok.to_dict()['kind']}-{h.hexdigest()[:16]}"


def open_corpus(data: str, tok: Tokenizer, text_field: str = "text", include_tests: bool = False,
                cache: str | None = None, verbose: bool = False) -> Corpus:
    """Opens (building and caching on first use) the corpus named by `data`."""
    if data != "stdlib" and os.path.isfile(os.path.join(data, "meta.json")):
        corpus = load_corpus(data)
        if corpus.meta["tokenizer"] != tok.to_dict():
            raise ValueError(f"corpus {data} was built with tokenizer {corpus.meta['tokenizer']}, "
                             f"not {tok.to_dict()}")
        return corpus
    train_docs, val_docs = find_documents(data, text_field, include_tests)
    directory = os.path.join(cache or cache_dir(), "corpora", corpus_key(data, tok, train_docs, val_docs, text_field))
    if not os.path.isfile(os.path.join(directory, "meta.json")):
        if verbose:
            print(f"tokenizing {len(train_docs) + len(val_docs)} documents from {data} into {directory}",
                  file=sys.stderr)
        build_corpus(train_docs, val_docs, tok, directory, data)
    corpus = load_corpus(directory)
    if corpus.train.num_text_tokens == 0:
        raise ValueError(f"empty corpus: the training split of {data} has no tokens")
    return corpus
