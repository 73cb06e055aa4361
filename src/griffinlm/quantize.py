"""Weight-only quantization of a model for inference: `quantize_(model, "int8" | "bf16")`.

In place, every projection (`layers.Linear`: the recurrent block's input and output projections,
attention q/k/v/o, the MLP's gate/up/down) and the tied embedding / output layer get a
`ops.quantized.QuantizedWeight` (int8 with per-output-row scales, or bf16) instead of their fp32
weight. The RG-LRU (gates, Lambda), norms, conv, biases and the recurrent state stay fp32. All
remaining parameters stop requiring gradients: a quantized model is for inference; training it
is refused with a clear error. The decoding kernels read the quantized weights directly
(`ops.decode_step_numba`), so a step streams a quarter (int8) or half (bf16) of the bytes.

A quantized model saves like any other (`checkpoint.save_weights_file`: `...weight.data` int8/bf16
beside `...weight.scale`, the mode in the file's metadata) and `checkpoint.load_weights_file`
rebuilds the quantized structure before loading it.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers.adapters import is_adapter
from .layers.linear import Linear
from .ops.quantized import MODES, QuantizedWeight

class QuantizedEmbedding(nn.Module):
    """The tied embedding with a quantized table: forward(ids (...)) -> (..., D) float32, and
    `.weight` (a QuantizedWeight) for the tied output layer."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids)


def quantization_of(model: nn.Module) -> str | None:
    """"int8", "bf16" or None (not quantized)."""
    return getattr(model, "quantization", None)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")


def quantize_(model: nn.Module, mode: str, *, empty: bool = False) -> nn.Module:
    """Quantizes `model` (a LanguageModel) in place and returns it (see the module docstring).

    `empty`: make the quantized buffers without converting values (the structure of a saved
    quantized model, about to be loaded)."""
    check_mode(mode)
    if quantization_of(model) is not None:
        raise ValueError(f"the model is already quantized ({quantization_of(model)}); quantize the float model once")
    if any(is_adapter(m) for m in model.modules()):
        raise ValueError("the model holds LoRA adapters: merge them into the weights first "
                         "(griffinlm.finetune.lora.merge_lora, or load the fine-tuning run with griffinlm.load)")
    with torch.no_grad():
        for module in list(model.modules()):
            if isinstance(module, Linear):
                w = module.weight
                q = QuantizedWeight.empty(tuple(w.shape), mode, w.device) if empty else QuantizedWeight.quantize(w, mode)
                del module.weight
                module.weight = q
        emb = model.embed
        q = QuantizedWeight.empty(tuple(emb.weight.shape), mode, emb.weight.device) if empty else \
            QuantizedWeight.quantize(emb.weight, mode)
        model.embed = QuantizedEmbedding(q)
    for p in model.parameters():
        p.requires_grad_(False)
    model.quantization = mode
    return model.eval()


def save_quantized(model: nn.Module, directory: str) -> None:
    """Writes a quantized model as a checkpoint directory (config.json + model.safetensors with
    the quantization in its metadata), loadable by `griffinlm generate/eval/serve --checkpoint`."""
    import json
    import os

    from .checkpoint import save_weights_file

    mode = quantization_of(model)
    if mode is None:
        raise ValueError("the model is not quantized: call quantize_(model, mode) first")
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, "model.safetensors.tmp")
    save_weights_file(model, tmp)
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=1)
