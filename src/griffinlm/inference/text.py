"""From a model and a text prompt to streamed text (load the model with `griffinlm.load`)."""
from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence

import torch

from ..generate import check_sampling
from ..model import LanguageModel


class TextStreamer:
    """Turns generated ids into text pieces as they come.

    Byte-level tokenizers go through an incremental UTF-8 decoder (a character split over
    several byte tokens is printed once complete); others decode the whole continuation and
    emit what is new. `context` (non-byte tokenizers): the ids just before the continuation
    (the prompt's tail); the continuation is decoded after them, so that a tokenizer that
    drops the leading space of a text's first word (SentencePiece) keeps the space between
    prompt and continuation."""

    CONTEXT = 8  # prompt ids kept as decoding context

    def __init__(self, tokenizer, context: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.is_byte_level else None
        self.context: list[int] = [] if self.utf8 is not None else [int(i) for i in context][-self.CONTEXT:]
        self.context_text = tokenizer.decode(self.context) if self.context else ""
        if self.context_text.endswith("\ufffd"):  # the context ends inside a character: no context
            self.context, self.context_text = [], ""

    def _decode(self) -> str:
        if self.context:
            text = self.tok.decode(self.context + self.ids)
            if text.startswith(self.context_text):
                return text[len(self.context_text):]
            self.context, self.context_text = [], ""  # context and continuation merged: decode alone
        return self.tok.decode(self.ids)

    def push(self, token: int) -> str:
        if self.utf8 is not None:
            return self.utf8.decode(bytes([token])) if 0 <= token < 256 else ""
        self.ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):  # an incomplete multi-token character: wait for the rest
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character, as U+FFFD)."""
        if self.utf8 is not None:
            return self.utf8.decode(b"", final=True)
        text = self._decode() if self.ids else ""
        new, self.sent = text[len(self.sent):], text
        return new


class StopStrings:
    """Cuts a stream of text pieces at the first occurrence of any stop string.

    `push(piece)` returns (text now safe to emit, whether a stop string was found). Text that
    might be the beginning of a stop string (at most len(longest stop) - 1 characters) is held
    back until the following text shows it is not; `flush()` gives it back at the end. Once a
    stop string is found, the text before it is returned and the stop string and everything
    after it are dropped."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self.buf + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.buf, self.stopped = "", True
            return buf[: min(hits)], True
        keep = 0  # the longest tail of buf that is the start of a stop string
        for k in range(min(len(buf), self.hold), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self.buf = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class TextOutput:
    """Generated ids -> text pieces, cut at the first stop string: a `TextStreamer` feeding a
    `StopStrings` (when there are stop strings). `push(token)` returns the text now safe to emit
    (possibly ""), `stopped` tells that a stop string was found, and `flush()` returns what is
    held back at the end (nothing after a stop)."""

    def __init__(self, tokenizer, context: Sequence[int] = (), stops: Sequence[str] = ()) -> None:
        self.streamer = TextStreamer(tokenizer, context)
        self.cutter = StopStrings(stops) if stops else None

    @property
    def stopped(self) -> bool:
        return self.cutter is not None and self.cutter.stopped

    def push(self, token: int) -> str:
        piece = self.streamer.push(token)
        if self.cutter is not None and piece:
            piece, _ = self.cutter.push(piece)
        return piece

    def flush(self) -> str:
        if self.stopped:
            return ""
        tail = self.streamer.flush()
        if self.cutter is not None:
            tail, hit = self.cutter.push(tail) if tail else ("", False)
            if not hit:
                tail += self.cutter.flush()
        return tail


def check_stop(stop: str | Sequence[str] | None) -> list[str]:
    """The stop strings as a list (a single string is one stop string); ValueError for an
    empty stop string or a non-string."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    out = []
    for s in stop:
        if not isinstance(s, str):
            raise ValueError(f"stop must be a list of strings, got an element {s!r}")
        if not s:
            raise ValueError("stop strings must not be empty (an empty stop string would end every generation "
                             "at once)")
        out.append(s)
    return out


def stream_text(model: LanguageModel, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                bos: bool = True, stop_at_eos: bool = True, stop: Sequence[str] | None = None) -> Iterator[str]:
    """Yields the continuation of `prompt` as text pieces while it is generated.

    The prompt starts with BOS (as every training document does) unless `bos=False`; the
    generation ends at EOS unless `stop_at_eos=False`, and as soon as the generated text
    contains one of the `stop` strings (neither it nor anything after it is yielded; text
    that may begin a stop string is held back until it is known not to). Sampling: greedy at
    temperature 0, else from `top_k` / `top_p`-filtered softmax(logits / temperature) with a
    generator seeded by `seed`. All decoding goes through `model.generate_stream`.

    The arguments are checked (ValueError) when this is called, before the first piece."""
    stops = check_stop(stop)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    ids = ([tokenizer.bos_id] if bos else []) + [int(i) for i in tokenizer.encode(prompt)]
    if not ids:
        raise ValueError("empty prompt: give some text or keep the BOS token")
    return _stream(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, stops)


def _stream(model: LanguageModel, tokenizer, ids: list[int], max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, seed: int | None, stop_at_eos: bool,
            stops: list[str]) -> Iterator[str]:
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    out = TextOutput(tokenizer, [i for i in ids if i != tokenizer.bos_id], stops)
    eos = [tokenizer.eos_id] if stop_at_eos else None
    steps = model.generate_stream(torch.tensor([ids], device=device), max_new_tokens, temperature, generator,
                                  top_k=top_k, top_p=top_p, stop_tokens=eos, pad_id=tokenizer.pad_id)
    try:
        for step in steps:
            token = int(step[0])
            if stop_at_eos and token == tokenizer.eos_id:
                break
            piece = out.push(token)
            if piece:
                yield piece
            if out.stopped:
                return
    finally:
        steps.close()  # ends the decoding loop (and frees its cache) when stopped early
    tail = out.flush()
    if tail:
        yield tail


def generate_text(model: LanguageModel, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  bos: bool = True, stop_at_eos: bool = True, stop: Sequence[str] | None = None) -> str:
    """The continuation of `prompt` (not the prompt itself) as one string: the pieces of
    `stream_text` (same arguments) joined."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, bos=bos, stop_at_eos=stop_at_eos, stop=stop))
