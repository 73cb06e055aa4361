"""Weight-only quantized weights for inference: int8 with per-output-row scales, or bf16.

A `QuantizedWeight` stands for the float32 weight (N, K) it was made from:
    int8:  w ~ data (N, K) int8 * scale (N,) float32,  scale = max |w[n]| / 127 per row
    bf16:  w ~ data (N, K) bfloat16 (round to nearest even)
It is a module holding the two buffers, so a `Linear` (or the tied embedding) whose `weight` is one
keeps working: `.to()` moves it, the state dict holds `weight.data` / `weight.scale`, and
`ops.linear.linear(x, w, b)` hands it to `quantized_linear`:
  - a few rows (a decoding step's): the numba kernel `decode_step_numba.linear_rows` streams the
    stored weight once, converting in registers (int8 -> f32 times the row scale; bf16 -> f32
    by a 16-bit shift), so a step reads a quarter (int8) or half (bf16) of the fp32 bytes;
  - many rows: one oneDNN bf16 GEMM on the bf16 weight (int8: on a bf16 copy of the dequantized
    weight, made once per weight and kept, so an int8 model holds 3 bytes per weight at most, still
    below fp32's 4) where the CPU has native bf16, else an fp32 GEMM on the dequantized weight.
`quantized_linear_reference` is the dequantized fp32 product. Quantized weights carry no
gradient: they are for inference (see `griffinlm.quantize`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import numba_common
from . import gemm_backend as gb
from .gemm_backend import COPIES, GEMM_CALLS, native_bf16

MODES = ("int8", "bf16")
STREAM_ROWS = 6  # up to this many rows the streaming kernel beats a bf16 GEMM (the decode step's MAX_BATCH)


class QuantizedWeight(nn.Module):
    """A weight (N, K) stored quantized (see the module docstring). Shapes as the fp32 weight's."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("data", data)
        self.register_buffer("scale", scale)

    @classmethod
    def quantize(cls, weight: torch.Tensor, mode: str) -> "QuantizedWeight":
        """From a float weight (N, K)."""
        w = weight.detach().float()
        if mode == "bf16":
            return cls(w.to(torch.bfloat16).contiguous(), None)
        if mode == "int8":
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (N,)
            data = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
            return cls(data, scale.contiguous())
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")

    @classmethod
    def empty(cls, shape: tuple[int, int], mode: str, device=None) -> "QuantizedWeight":
        """Placeholder buffers of the right dtypes and shapes, for loading a saved state dict."""
        if mode == "bf16":
            return cls(torch.empty(shape, dtype=torch.bfloat16, device=device), None)
        if mode == "int8":
            return cls(torch.empty(shape, dtype=torch.int8, device=device),
                       torch.empty(shape[0], dtype=torch.float32, device=device))
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")

    @property
    def mode(self) -> str:
        return "int8" if self.data.dtype == torch.int8 else "bf16"

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def numel(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight it stands for, (N, K) in `dtype`."""
        if self.scale is None:
            return self.data.to(dtype)
        return (self.data.to(torch.float32) * self.scale[:, None]).to(dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` (...) -> (..., K) float32 (an embedding lookup)."""
        out = self.data[ids].to(torch.float32)
        return out if self.scale is None else out * self.scale[ids].unsqueeze(-1)

    def kernel_arrays(self):
        """(data, scale) as numpy arrays for the numba kernels: int8 data with its scales, or the
        bf16 bits as uint16 with an empty scale."""
        import numpy as np

        if self.scale is None:
            return self.data.view(torch.int16).numpy().view(np.uint16), np.empty(0, np.float32)
        return self.data.numpy(), self.scale.numpy()

    def extra_repr(self) -> str:
        return f"{self.mode}, shape={tuple(self.shape)}"


def bf16_weight(weight: QuantizedWeight) -> torch.Tensor:
    """The bf16 form a GEMM multiplies: a bf16 weight's own data; for int8 the dequantized bf16
    copy, made once per weight and kept (None-safe: made afresh past the copies' budget)."""
    if weight.scale is None:
        return weight.data
    got = COPIES.get("int8_bf16", weight.data, lambda _: weight.dequantize(torch.bfloat16))
    return weight.dequantize(torch.bfloat16) if got is None else got


def stacked_bf16_products(x: torch.Tensor, weights: tuple[QuantizedWeight, ...],
                          biases: tuple[torch.Tensor | None, ...]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a decoding step's rows x (M, K) above the streaming kernel's rows, on a CPU with native
    bf16: a call a (M', K) -> (M', sum N) float32 computing every product of x's projections on the
    quantized weights (biases added in fp32) as one oneDNN bf16 GEMM on their bf16 forms stacked
    and packed once (cached), where that is the measured choice over separate bf16 GEMMs (as
    `quantized_linear` runs them); the outputs round to bf16 as that path's do. None elsewhere."""
    if not (x.dim() == 2 and x.shape[0] > STREAM_ROWS and x.device.type == "cpu" and x.dtype == torch.float32
            and native_bf16() and not torch.is_grad_enabled()):
        return None
    forms = tuple(bf16_weight(w) for w in weights)
    packed = COPIES.get("packed_bf16", forms, lambda ws: torch.ops.mkldnn._reorder_linear_weight(
        torch.cat(ws) if len(ws) > 1 else ws[0], gb.MAX_ROW_CLASS))
    if packed is None:  # over the copies' budget
        return None
    bias = None
    if any(b is not None for b in biases):
        full = tuple(torch.zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases))
        bias = full[0].detach().float() if len(full) == 1 else torch.cat(full).detach().float()
    M, K = x.shape
    xb = x.to(torch.bfloat16)

    def candidates():
        return {"mkl": lambda: [F.linear(xb, w) for w in forms],
                "onednn_packed": lambda: torch.ops.mkldnn._linear_pointwise(xb, packed, None, "none", [], "")}

    if gb.choose("forward_stacked", torch.bfloat16, M, sum(w.shape[0] for w in weights), K,
                 candidates) != "onednn_packed":
        return None

    def run(a: torch.Tensor) -> torch.Tensor:
        GEMM_CALLS["quantized_stacked_bf16:" + weights[0].mode] += 1
        out = torch.ops.mkldnn._linear_pointwise(a.to(torch.bfloat16), packed, None, "none", [], "").float()
        return out if bias is None else out.add_(bias)
    return run


def quantized_linear_reference(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """x (..., K) @ dequantized weight^T + bias, in float32."""
    return F.linear(x.float(), weight.dequantize(), None if bias is None else bias.float())


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a quantized W: (..., K) -> (..., N) float32 (see the module docstring)."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("quantized weights are for inference only: a quantized model cannot be trained or "
                           "differentiated (quantize a copy after training, or load the float checkpoint)")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    if x2.shape[0] <= STREAM_ROWS and numba_common.cpu_fusable(x2):
        from .decode_step_numba import linear_rows

        data, scale = weight.kernel_arrays()
        out = torch.empty(x2.shape[0], weight.shape[0])
        b = torch.empty(0) if bias is None else bias.detach().float().contiguous()
        linear_rows(x2.contiguous().numpy(), data, scale, b.numpy(), out.numpy(), numba_common.threads())
        GEMM_CALLS[f"quantized_stream:{weight.mode}"] += 1
    elif x.device.type == "cpu" and native_bf16() or x.device.type == "cuda":
        out = F.linear(x2.to(torch.bfloat16), bf16_weight(weight)).float()
        if bias is not None:
            out.add_(bias.float())
        GEMM_CALLS[f"quantized_gemm_bf16:{weight.mode}"] += 1
    else:
        out = quantized_linear_reference(x2, weight, bias)
        GEMM_CALLS[f"quantized_gemm_fp32:{weight.mode}"] += 1
    return out.view(*shape[:-1], weight.shape[0])
