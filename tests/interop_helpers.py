"""Tiny random RecurrentGemma models for the interop tests (built locally, no downloads)."""
from __future__ import annotations

import torch

BASE = dict(num_hidden_layers=3, vocab_size=97, hidden_size=32, intermediate_size=96,
            num_attention_heads=4, num_key_value_heads=1, attention_window_size=8)


def make_hf_model(seed: int = 0, **overrides):
    """A RecurrentGemmaForCausalLM in eval mode whose every parameter is perturbed.

    transformers initialises biases and norm scales to zero; perturbing them makes the test
    exercise every bias, the (1 + weight) norms and the Lambda sign. The embedding is scaled up
    so logits are O(1) and greedy decoding is decisive.
    """
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(seed)
    model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 0.5)
            elif p.dim() < 2 or "recurrent_param" in name:
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def save_hf_model(model, directory, **kwargs) -> str:
    model.save_pretrained(str(directory), **kwargs)
    return str(directory)
