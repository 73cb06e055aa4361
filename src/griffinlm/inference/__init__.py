"""Inference: loading a checkpoint for generation, streaming text, and the `generate` command.

The decoding engine itself is `LanguageModel.decode_step` (static-shape one-token step over
the caches of `griffinlm.model`) driven by `griffinlm.generate.GenerationMixin`.
"""
from .text import TextStreamer, load_for_inference, stream_text

__all__ = ["TextStreamer", "load_for_inference", "stream_text"]
