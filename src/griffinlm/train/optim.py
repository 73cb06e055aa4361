"""AdamW with the paper's choices: weight decay groups and a warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def decay_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names with weight decay, names without).

    Decayed: matrices and higher-rank weights (linear, conv, block-diagonal gate weights).
    Not decayed: the (tied) embedding; every 1-D tensor (RMSNorm scales, biases, the RG-LRU
    Lambda, whose value sets the recurrence's time scale and must not be pulled to 0); and every
    bias whatever its rank (the block-diagonal gate biases are (heads, block) matrices).
    """
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and id(p) not in embedding and not name.endswith("bias"):
            decay.append(name)
        else:
            no_decay.append(name)
    return decay, no_decay


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float) -> torch.optim.AdamW:
    """AdamW over two parameter groups (group 0 decayed, group 1 not), in named_parameters order."""
    if getattr(model, "quantization", None):
        raise ValueError(f"the model's weights are quantized ({model.quantization}): quantized weights are for "
                         "inference; train the float model (or fine-tune from its float checkpoint)")
    decay, no_decay = decay_groups(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "names": decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "names": no_decay},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from peak/warmup to peak
    over `warmup` steps, then cosine decay to peak * min_ratio at the last step (total - 1)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
