"""Kernels, each with its sequential or dense reference beside it: one folder per op family
(`scan`, `lru` (the RG-LRU), `conv`, `attention` (with `rotary`), `norm`, `activation`,
`block_diag`), the numba plumbing they share in `numba_common`, and the modules used across
them (`linear`, `gemm_backend`, `quantized`, `buffer_pool`, `decode_step`). Folder names differ
from the functions exported here, so no function hides a module."""
from .activation import gated_activation, gated_activation_reference
from .attention import causal_attention
from .attention.reference import attention_mask, attention_reference
from .attention.rotary import rotary
from .block_diag import block_diagonal_linear, block_diagonal_linear_reference
from .conv import causal_conv1d, causal_conv1d_reference, causal_conv1d_step
from .decode_step import (attention_step, attention_step_reference, logits_reference, logits_step, mlp_step,
                          mlp_step_reference, recurrent_step, recurrent_step_reference)
from .lru import rglru, rglru_gates, rglru_step, sqrt_bounded_grad
from .norm import rms_norm, rms_norm_reference
from .scan import linear_scan
from .scan.reference import linear_scan_reference

__all__ = [
    "linear_scan", "linear_scan_reference", "causal_attention", "attention_reference",
    "attention_mask", "block_diagonal_linear", "block_diagonal_linear_reference", "causal_conv1d",
    "causal_conv1d_reference", "gated_activation", "gated_activation_reference", "rms_norm", "rms_norm_reference",
    "rglru", "rglru_gates", "rglru_step", "sqrt_bounded_grad", "causal_conv1d_step", "rotary",
    "recurrent_step", "recurrent_step_reference", "attention_step", "attention_step_reference",
    "mlp_step", "mlp_step_reference", "logits_step", "logits_reference",
]
