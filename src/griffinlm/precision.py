"""Compute precision of a job (train, eval, generate): "fp32", "bf16", or "auto".

"auto" is bf16 autocast on CUDA and fp32 on CPU. "bf16" on CPU is `torch.autocast("cpu",
torch.bfloat16)`: the linear layers' GEMMs take bf16 operands with fp32 out (`ops.linear`),
while master weights, norms, the RG-LRU and its state, and the loss stay fp32. It is refused on
a CPU without native bf16 arithmetic, where it would be emulated and slower than fp32.

Under FSDP's bf16 parameter policy (`parallel.mixed_precision_policy`) the parameters are
gathered in bf16 for compute, but the modules of `fp32_parameter_modules` (every RMSNorm and
every RG-LRU) get an fp32 policy of their own: Lambda rounded to bf16 would move the decay
rate a = sigmoid(Lambda) by up to 3.2 % (log a = -softplus(-Lambda), c = 8), and the norms'
scales would lose their low bits, so one-GPU (autocast, fp32 parameters) and many-GPU runs
would differ. The RG-LRU's state is fp32 in both (`ops.lru`).
"""
from __future__ import annotations

import contextlib

import torch

from .ops.gemm_backend import native_bf16

DTYPES = ("auto", "fp32", "bf16")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {dtype!r}")


def compute_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """The GEMM dtype of `dtype` on `device`; raises for bf16 on a CPU that lacks it."""
    check_dtype(dtype)
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return torch.float32
    if device.type == "cpu" and not native_bf16():
        raise ValueError(f"dtype bf16 needs native bf16 arithmetic (AVX512-BF16 or AMX); this CPU "
                         f"(torch capability {torch.backends.cpu.get_cpu_capability()}) would emulate it, "
                         f"slower than fp32: use dtype fp32")
    return torch.bfloat16


def autocast(device: torch.device, dtype: str = "auto"):
    """The autocast context of `dtype` on `device` (a null context for fp32)."""
    if compute_dtype(device, dtype) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def fp32_parameter_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules whose parameters stay fp32 under a low-precision parameter policy (FSDP):
    every RMSNorm (scales) and every RG-LRU (Lambda; its block-diagonal gate weights come
    along, cast to the input's dtype at use). In module order, children before parents."""
    from .layers import RGLRU, RMSNorm

    return [m for m in model.modules() if isinstance(m, (RMSNorm, RGLRU))]
