"""From a checkpoint directory and a text prompt to streamed text."""
from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator

import torch

from ..checkpoint import load_weights_file
from ..config import ModelConfig
from ..model import LanguageModel


def _read_model_dir(path: str, device: str | torch.device) -> LanguageModel:
    """A model from a directory holding config.json (a ModelConfig) and model.safetensors."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        raw = json.load(f)
    try:
        config = ModelConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path} is not a griffinlm ModelConfig ({e}); a RecurrentGemma / transformers "
                         "directory must first be converted with `griffinlm convert`") from None
    model = LanguageModel(config)
    load_weights_file(os.path.join(path, "model.safetensors"), model)
    return model.to(device).eval()


def load_for_inference(path: str, device: str | torch.device = "cpu", tokenizer: str | None = None):
    """(model in eval mode, tokenizer) from a checkpoint directory or a training run directory
    (its newest checkpoint). The tokenizer is `tokenizer` if given, else the one recorded in
    the checkpoint's trainer.json, else the byte tokenizer."""
    from ..data import load_tokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        from ..checkpoint import resolve_checkpoint

        path = resolve_checkpoint(path)
    model = _read_model_dir(path, device)
    spec: str | dict | None = tokenizer
    trainer_json = os.path.join(path, "trainer.json")
    if spec is None and os.path.isfile(trainer_json):
        with open(trainer_json) as f:
            spec = json.load(f).get("tokenizer")
    tok = load_tokenizer(spec)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {model.config.vocab_size}")
    return model, tok


class TextStreamer:
    """Turns generated ids into text pieces as they come.

    Byte-level tokenizers go through an incremental UTF-8 decoder (a character split over
    several byte tokens is printed once complete); others decode the whole continuation and
    emit what is new."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.is_byte_level else None

    def push(self, token: int) -> str:
        if self.utf8 is not None:
            return self.utf8.decode(bytes([token])) if 0 <= token < 256 else ""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-token character: wait for the rest
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True) if self.utf8 is not None else ""


def stream_text(model: LanguageModel, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                bos: bool = True, stop_at_eos: bool = True) -> Iterator[str]:
    """Yields the continuation of `prompt` as text pieces while it is generated.

    The prompt starts with BOS (as every training document does) unless `bos=False`; the
    generation ends at EOS unless `stop_at_eos=False`."""
    device = next(model.parameters()).device
    ids = ([tokenizer.bos_id] if bos else []) + [int(i) for i in tokenizer.encode(prompt)]
    if not ids:
        raise ValueError("empty prompt: give some text or keep the BOS token")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    streamer = TextStreamer(tokenizer)
    stops = [tokenizer.eos_id] if stop_at_eos else None
    for step in model.generate_stream(torch.tensor([ids], device=device), max_new_tokens, temperature, generator,
                                      top_k=top_k, top_p=top_p, stop_tokens=stops, pad_id=tokenizer.pad_id):
        token = int(step[0])
        if stop_at_eos and token == tokenizer.eos_id:
            break
        piece = streamer.push(token)
        if piece:
            yield piece
    tail = streamer.flush()
    if tail:
        yield tail
