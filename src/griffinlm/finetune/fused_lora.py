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


class FusedLoraLinear(PeftLoraLinear):
    """peft's `lora.Linear` over our `Linear`, forward through `ops.lora_linear`. `dropout_stream`:
    set per data-parallel rank (`lora.set_dropout_stream`) so that ranks drop independently."""

    dropout_stream = 0

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
                           stream=self.dropout_stream)
