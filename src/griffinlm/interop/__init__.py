"""Interop with RecurrentGemma checkpoints in the `transformers` format.

Importing this package never imports `transformers`; only safetensors (and, for tokenizers,
sentencepiece / tokenizers) are needed.
"""
from .hf_config import NotRecurrentGemmaError, hf_to_model_config, model_config_to_hf
from .recurrentgemma import empty_model, export_recurrentgemma, hf_state_dict, load_recurrentgemma
from .tokenizer import load_tokenizer

__all__ = [
    "NotRecurrentGemmaError", "hf_to_model_config", "model_config_to_hf", "load_recurrentgemma",
    "export_recurrentgemma", "hf_state_dict", "empty_model", "load_tokenizer",
]
