"""Kernels, each with its sequential or dense reference beside it."""
from .attention_reference import attention_mask, attention_reference
from .block_diagonal import block_diagonal_linear, block_diagonal_linear_reference
from .causal_conv1d import causal_conv1d, causal_conv1d_reference, causal_conv1d_step
from .decode_step import (attention_step, attention_step_reference, logits_reference, logits_step, mlp_step,
                          mlp_step_reference, recurrent_step, recurrent_step_reference)
from .gated_activation import gated_activation, gated_activation_reference
from .linear_scan import linear_scan
from .local_attention import causal_attention
from .rms_norm import rms_norm, rms_norm_reference
from .rglru import rglru, rglru_gates, rglru_step, sqrt_bounded_grad
from .rotary import rotary
from .scan_reference import linear_scan_reference

__all__ = [
    "linear_scan", "linear_scan_reference", "causal_attention", "attention_reference",
    "attention_mask", "block_diagonal_linear", "block_diagonal_linear_reference", "causal_conv1d",
    "causal_conv1d_reference", "gated_activation", "gated_activation_reference", "rms_norm", "rms_norm_reference",
    "rglru", "rglru_gates", "rglru_step", "sqrt_bounded_grad", "causal_conv1d_step", "rotary",
    "recurrent_step", "recurrent_step_reference", "attention_step", "attention_step_reference",
    "mlp_step", "mlp_step_reference", "logits_step", "logits_reference",
]
