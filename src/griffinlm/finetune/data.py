"""Instruction data for fine-tuning: JSONL examples, the loss on answers only, packed rows.

Each line of the file is one example, either
    {"prompt": "...", "completion": "..."}    -> BOS prompt completion EOS
    {"messages": [{"role": ..., "content": ...}, ...]}   (ending with an assistant message)
The messages are rendered with the tokenizer's chat template when it has one, else with the
plain template of `inference.chat` ("User: ...\\n", "Assistant: ...\\n"), and EOS follows the
last message. Only completion / assistant tokens (and the final EOS) are targets of the loss:
the prompt's tokens are read, never predicted. Examples are packed whole into rows of `seq_len`
+ 1 tokens, each restarting its segment positions (the model resets its recurrence and masks
attention at each example's start, as for pre-training documents); an example longer than a row
is cut to the row's length.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..data import Batch, BatchSampler, Tokenizer, eval_batches
from ..inference.chat import ChatFormat
from ..train.data import RunData


@dataclass
class Example:
    """One example: tokens (L,) int64 starting with BOS; counted (L,) bool, True where the token
    is a target of the loss; prompt_ids: the tokens a model answering it is given; answer: the
    expected completion text; bytes_per_target: UTF-8 bytes per counted text token; line: its line
    in the file (1-based)."""

    tokens: np.ndarray
    counted: np.ndarray
    prompt_ids: list[int]
    answer: str
    bytes_per_target: float
    line: int


def _text(value, line: int, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"line {line}: {what} must be a string, got {type(value).__name__}")
    return value


def _pieces_from_messages(messages, chat: ChatFormat, line: int) -> tuple[list[tuple[str, bool]], str, str]:
    """[(text, is_target)] of a conversation, the prompt text of its last assistant turn, and that turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"line {line}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"line {line}: message {i} needs 'role' and 'content'")
        _text(m["content"], line, f"message {i} content")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"line {line}: the last message must be the assistant's (the answer to learn)")
    pieces, done = [], ""
    prompt = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if not m["content"].strip():
            raise ValueError(f"line {line}: message {k} (assistant) is empty")
        prompt = chat.render(messages[:k], add_generation_prompt=True)
        full = chat.render(messages[:k + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(f"line {line}: the chat template does not render the conversation as a prefix of "
                             "its continuation, so the assistant's tokens cannot be told apart")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces, prompt, messages[-1]["content"]


def parse_example(obj, tok: Tokenizer, chat: ChatFormat, line: int) -> Example:
    """One JSONL object as an Example; ValueError naming the line for anything malformed."""
    if not isinstance(obj, dict):
        raise ValueError(f"line {line}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        pieces, prompt, answer = _pieces_from_messages(obj["messages"], chat, line)
        pieces[0] = (chat.strip_bos(pieces[0][0]), pieces[0][1])
        prompt = chat.strip_bos(prompt)
    elif "prompt" in obj and "completion" in obj:
        prompt, answer = _text(obj["prompt"], line, "prompt"), _text(obj["completion"], line, "completion")
        if not answer.strip():
            raise ValueError(f"line {line}: empty completion (there would be nothing to learn)")
        pieces = [(prompt, False), (answer, True)]
    else:
        raise ValueError(f"line {line}: expected {{\"prompt\", \"completion\"}} or {{\"messages\": [...]}}, "
                         f"got keys {sorted(obj)}")
    ids, counted, target_bytes = [tok.bos_id], [False], 0
    for text, is_target in pieces:
        piece = tok.encode(text).astype(np.int64).tolist()
        ids += piece
        counted += [is_target] * len(piece)
        target_bytes += len(text.encode("utf-8")) if is_target else 0
    ids.append(tok.eos_id)
    counted.append(True)  # the answer ends: learning to stop
    n_text = sum(counted) - 1
    prompt_ids = [tok.bos_id] + tok.encode(prompt).astype(np.int64).tolist()
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(counted), prompt_ids, answer,
                   target_bytes / max(n_text, 1), line)


def read_examples(path: str, tok: Tokenizer, chat: ChatFormat | None = None) -> list[Example]:
    """Every example of a JSONL file (blank lines skipped); ValueError naming the first bad line."""
    chat = chat or ChatFormat.for_tokenizer(tok)
    examples = []
    with open(path, encoding="utf-8") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i}: not valid JSON ({e.msg})") from None
            try:
                examples.append(parse_example(obj, tok, chat, i))
            except ValueError as e:
                raise ValueError(f"{path} {e}") from None
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


class InstructionRows:
    """Examples packed whole into rows of T + 1 tokens (first fit in the given order), padded;
    the same interface as `data.PackedSequences` (`len`, `get(indices) -> Batch`), so the
    pre-training sampler and evaluation batches read it unchanged."""

    def __init__(self, examples: list[Example], seq_len: int, pad_id: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        T1 = seq_len + 1
        rows: list[list[Example]] = []
        used = T1
        self.truncated = 0
        for ex in examples:
            n = min(len(ex.tokens), T1)
            self.truncated += len(ex.tokens) > T1
            if used + n > T1:
                rows.append([])
                used = 0
            rows[-1].append(ex)
            used += n
        self.seq_len = seq_len
        self.tokens = np.full((len(rows), T1), pad_id, dtype=np.int64)
        self.segment_pos = np.zeros((len(rows), T1), dtype=np.int64)
        self.counted = np.zeros((len(rows), T1), dtype=bool)
        self.target_bytes = np.zeros((len(rows), T1), dtype=np.float64)
        for r, row in enumerate(rows):
            at = 0
            for ex in row:
                n = min(len(ex.tokens), T1)
                self.tokens[r, at:at + n] = ex.tokens[:n]
                self.segment_pos[r, at:at + n] = np.arange(n)
                self.counted[r, at:at + n] = ex.counted[:n]
                # the final EOS stands for no text
                self.target_bytes[r, at:at + n] = np.where(ex.counted[:n], ex.bytes_per_target, 0.0)
                if n == len(ex.tokens):
                    self.target_bytes[r, at + n - 1] = 0.0
                at += n

    def __len__(self) -> int:
        return len(self.tokens)

    def get(self, indices: np.ndarray) -> Batch:
        """Batch of the rows at `indices` (B,): targets counted only on answer tokens."""
        idx = np.asarray(indices, dtype=np.int64)
        t, mask = self.tokens[idx], self.counted[idx, 1:]
        return Batch(tokens=torch.from_numpy(t[:, :-1].copy()), targets=torch.from_numpy(t[:, 1:].copy()),
                     segment_pos=torch.from_numpy(self.segment_pos[idx, :-1].copy()),
                     loss_mask=torch.from_numpy(mask.copy()),
                     num_bytes=float(self.target_bytes[idx, 1:][mask].sum()))


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples: a seeded shuffle, then `val_fraction` of them (at least one)
    held out."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(examples) < 2:
        raise ValueError(f"need at least 2 examples to hold one out, got {len(examples)}")
    order = np.random.default_rng([seed, 7]).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in sorted(order[:n_val])]


def instruction_data(path: str, tok: Tokenizer, seq_len: int, micro_batch: int, seed: int,
                     val_fraction: float = 0.1) -> tuple[RunData, list[Example]]:
    """The run's data (training rows through the resumable sampler, held-out rows in order) and
    the held-out examples (for answer accuracy)."""
    train, val = split_examples(read_examples(path, tok), val_fraction, seed)
    train_rows, val_rows = InstructionRows(train, seq_len, tok.pad_id), InstructionRows(val, seq_len, tok.pad_id)
    sampler = BatchSampler(train_rows, micro_batch, seed)

    def held_out(max_sequences: int | None) -> Iterator[Batch]:
        return eval_batches(val_rows, micro_batch, max_sequences)

    cut = train_rows.truncated + val_rows.truncated
    desc = (f"{path}: {len(train)} examples in {len(train_rows)} rows for training, {len(val)} held out"
            + (f"; {cut} examples longer than {seq_len + 1} tokens were cut" if cut else ""))
    return RunData(tok, sampler, held_out, tok.vocab_size, desc), val
