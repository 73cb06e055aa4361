"""The lm-evaluation-harness model "griffinlm" (imports lm_eval: needs the `eval` extra).

    python -m griffinlm.lm_eval --model griffinlm --model_args pretrained=runs/demo,dtype=fp32 --tasks ...

Model arguments (`--model_args k=v,...`):
  pretrained     a `griffinlm train` run, a checkpoint directory or a converted RecurrentGemma
                 (`checkpoint=` is the same)
  device         from --device: cuda[:N] falls back to CPU (with a warning) where CUDA is
                 missing, as the harness's `hf` model does; auto: CUDA when present, else CPU
  batch_size     from --batch_size: an integer, or auto (measured; see `HarnessAdapter`)
  max_batch_size ceiling of batch_size=auto (default 64)
  dtype          auto, fp32 or bf16 (GEMM precision; auto: bf16 on CUDA, fp32 on CPU)
  quantize       int8 or bf16 weight-only quantization of the projections (CPU inference)
  max_length     longest sequence fed to the model (default the model's max_position)
  seed           sampling seed of generate_until (default 1234, the harness's torch seed)
  max_gen_toks   generation budget where a task gives none (default 256)
  threads        CPU threads for torch and numba
  tokenizer      override the checkpoint's tokenizer ('byte' or a tokenizer file)
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM

from .harness import HarnessAdapter

log = logging.getLogger("griffinlm.evaluate")


def harness_device(device: str | None) -> torch.device:
    """The device for a harness `device` argument: CUDA falls back to CPU where it is missing."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("no CUDA device: evaluating on CPU")
        return torch.device("cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: evaluating on CPU", device)
        return torch.device("cpu")
    return torch.device(device)


def parse_batch_size(batch_size: int | str) -> int | str:
    """An integer, or "auto" (the harness also writes "auto:N": measured once here)."""
    if isinstance(batch_size, str):
        if batch_size == "auto" or batch_size.startswith("auto:"):
            return "auto"
        if batch_size.isdigit():
            return int(batch_size)
        raise ValueError(f"batch_size must be an integer or 'auto', got {batch_size!r}")
    return batch_size


class GriffinLMEval(LM):
    """lm-evaluation-harness model for griffinlm checkpoints (arguments: the module docstring)."""

    def __init__(self, pretrained: str | None = None, checkpoint: str | None = None, device: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, dtype: str = "auto",
                 quantize: str | None = None, max_length: int | None = None, seed: int = 1234,
                 max_gen_toks: int = 256, threads: int | None = None, tokenizer: str | None = None,
                 **unused: Any) -> None:
        super().__init__()
        if pretrained and checkpoint and pretrained != checkpoint:
            raise ValueError(f"give one of pretrained= and checkpoint= (got {pretrained!r} and {checkpoint!r})")
        path = pretrained or checkpoint
        if not path:
            raise ValueError("the griffinlm model needs pretrained=DIR (a run, checkpoint or converted directory)")
        unused.pop("trust_remote_code", None)  # the harness may pass it; nothing here runs remote code
        if unused:
            log.warning("griffinlm ignores these model arguments: %s", ", ".join(sorted(unused)))
        if quantize not in (None, "int8", "bf16"):
            raise ValueError(f"quantize must be int8 or bf16, got {quantize!r}")
        if threads:
            from .cli import set_threads

            set_threads(int(threads))
        from ..loading import load

        model, tok = load(str(path), harness_device(device), tokenizer=tokenizer, quantize=quantize)
        self.path = str(path)
        self.adapter = HarnessAdapter(model, tok, parse_batch_size(batch_size),
                                      int(max_length) if max_length else None,
                                      max_batch_size=int(max_batch_size or 64), dtype=str(dtype), seed=int(seed),
                                      max_gen_toks=int(max_gen_toks))

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        results = self.adapter.loglikelihood(requests, disable_tqdm)
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        results = self.adapter.loglikelihood_rolling(requests, disable_tqdm)
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, r)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        results = self.adapter.generate_until(requests, disable_tqdm)
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("generate_until", req.args, r)
        return results

    @property
    def tokenizer_name(self) -> str:
        return f"griffinlm:{self.path}"

    def get_model_info(self) -> dict:
        cfg = self.adapter.model.config
        return {"model_source": "griffinlm", "model_name": self.path, "model_block_types": list(cfg.block_types),
                "model_num_parameters": sum(p.numel() for p in self.adapter.model.parameters())}
