"""`FusedLoraLinear`: peft's LoRA Linear whose forward runs `ops.lora_linear` where it can.

Registered for our `layers.Linear` by `lora.apply_lora` (peft's custom-module dispatch), so the
adapted layers keep peft's structure, parameter names, merging and saving, and only the forward
changes: the base product on our fastest GEMM, the dropout as a numba kernel, the low-rank update
added in place. Anything else (several active adapters, DoRA and other variants, LoRA biases,
merged or disabled adapters, bf16 autocast, other devices) is peft's own forward.
"""
from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as PeftLoraLinear

from ..layers.adapters import is_plain_lora
from ..ops.lora import fusable, lora_linear


def default_dropout_stream() -> int:
    """The process's rank once torch.distributed is initialized, else 0: data-parallel ranks,
    which draw the same seeds from one RNG state, then drop different units (LoRA trains data
    parallel only, so the global rank is the DP rank)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class FusedLoraLinear(PeftLoraLinear):
    """peft's `lora.Linear` over our `Linear`, forward through `ops.lora_linear`. `dropout_stream`:
    None (the default) takes `default_dropout_stream()` at each call, so ranks drop independently
    without being told; `lora.set_dropout_stream` fixes it."""

    dropout_stream: int | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1:
            return super().forward(x, *args, **kwargs)
        name = adapters[0]
        base, lora_a, lora_b = self.get_base_layer(), self.lora_A[name], self.lora_B[name]
        if (not is_plain_lora(self, name) or lora_b.bias is not None or self.fan_in_fan_out
                or not fusable(x, base.weight, base.bias, lora_a.weight, lora_b.weight)):
            return super().forward(x, *args, **kwargs)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
        return lora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight, self.scaling[name], p,
                           stream=default_dropout_stream() if self.dropout_stream is None else self.dropout_stream)
