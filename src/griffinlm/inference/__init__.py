"""Inference: streaming text from a model (`griffinlm.load` reads one), and the `generate` command.

`stream_text` / `generate_text` are the one text-generation loop (used by `griffinlm generate`
and by the training run's sample): prompt text in, continuation text out, with EOS and stop
strings. The decoding itself is `LanguageModel.generate_stream` (`griffinlm.generate`): each
prompt prefills its own cache slot, then one token per step.
"""
from .text import StopStrings, TextOutput, TextStreamer, check_stop, generate_text, stream_text

__all__ = ["StopStrings", "TextOutput", "TextStreamer", "check_stop", "generate_text", "stream_text"]
