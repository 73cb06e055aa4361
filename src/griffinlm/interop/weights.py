"""Tensor names and layouts: our `LanguageModel` state dict <-> RecurrentGemma's.

Two tensors change layout on the way; the rest are renamed only:
- Conv1D: ours is time-major (W, C) with weight[W-1] on the current token; transformers keeps
  nn.Conv1d's (C, 1, W), whose last tap also multiplies the current token (causal padding).
- RG-LRU: our `lambda_` is the paper's Lambda (a = sigmoid(Lambda)); RecurrentGemma's
  `recurrent_param` is its negative (log a = -softplus(recurrent_param)).
Both transforms are exact (transpose, negation), so conversion round-trips bit for bit.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

HF_PREFIX = "model."
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# our name inside a residual block -> RecurrentGemma's name inside `model.layers.{i}.`
_BLOCK_RENAMES = {
    "temporal_norm.weight": "temporal_pre_norm.weight",
    "mlp_norm.weight": "channel_pre_norm.weight",
    "temporal.conv1d.weight": "temporal_block.conv_1d.weight",
    "temporal.conv1d.bias": "temporal_block.conv_1d.bias",
    "temporal.rg_lru.gate_r_weight": "temporal_block.rg_lru.recurrent_gate_weight",
    "temporal.rg_lru.gate_r_bias": "temporal_block.rg_lru.recurrent_gate_bias",
    "temporal.rg_lru.gate_i_weight": "temporal_block.rg_lru.input_gate_weight",
    "temporal.rg_lru.gate_i_bias": "temporal_block.rg_lru.input_gate_bias",
    "temporal.rg_lru.lambda_": "temporal_block.rg_lru.recurrent_param",
}
_TOP_RENAMES = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.final_norm.weight"}
# transformers may also write the tied output layer; it must equal the embedding
TIED_HEAD = "lm_head.weight"


def _conv_to_hf(t: torch.Tensor) -> torch.Tensor:
    return t.t()[:, None, :].contiguous()  # (W, C) -> (C, 1, W)


def _conv_from_hf(t: torch.Tensor) -> torch.Tensor:
    return t[:, 0, :].t().contiguous()  # (C, 1, W) -> (W, C)


def _negate(t: torch.Tensor) -> torch.Tensor:
    return -t


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _conv_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[1], 1, shape[0]) if len(shape) == 2 else shape


@dataclass(frozen=True)
class TensorRule:
    """How one of our tensors is stored in a RecurrentGemma checkpoint."""

    ours: str
    hf: str
    to_hf: Callable[[torch.Tensor], torch.Tensor]
    from_hf: Callable[[torch.Tensor], torch.Tensor]
    hf_shape: tuple[int, ...]


def hf_name(ours: str) -> tuple[str, str]:
    """(RecurrentGemma name, transform kind in {"same", "conv", "negate"}) of one of our names."""
    if ours in _TOP_RENAMES:
        return _TOP_RENAMES[ours], "same"
    parts = ours.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks":
        raise KeyError(f"no RecurrentGemma name for tensor {ours!r}")
    rest = parts[2]
    if rest in _BLOCK_RENAMES:
        name = _BLOCK_RENAMES[rest]
    elif rest.startswith("temporal."):
        name = "temporal_block." + rest[len("temporal."):]
    elif rest.startswith("mlp."):
        name = "mlp_block." + rest[len("mlp."):]
    else:
        raise KeyError(f"no RecurrentGemma name for tensor {ours!r}")
    kind = "conv" if rest == "temporal.conv1d.weight" else "negate" if rest == "temporal.rg_lru.lambda_" else "same"
    return f"{HF_PREFIX}layers.{parts[1]}.{name}", kind


def tensor_rules(shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorRule]:
    """Rules keyed by RecurrentGemma name, for our tensors `shapes` {our name: our shape}."""
    rules = {}
    for ours, shape in shapes.items():
        name, kind = hf_name(ours)
        to_hf, from_hf = {"same": (_same, _same), "conv": (_conv_to_hf, _conv_from_hf),
                          "negate": (_negate, _negate)}[kind]
        hf_shape = _conv_shape(tuple(shape)) if kind == "conv" else tuple(shape)
        rules[name] = TensorRule(ours, name, to_hf, from_hf, hf_shape)
    return rules


def shard_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint directory: those named by the index, or the single file.

    Raises FileNotFoundError when there are none (pickled `.bin` weights are refused, never loaded).
    """
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [p for p in files if not os.path.isfile(os.path.join(directory, p))]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
        return [os.path.join(directory, p) for p in files]
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    found = sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))
    if found:
        return [os.path.join(directory, p) for p in found]
    pickles = sorted(p for p in os.listdir(directory) if p.endswith((".bin", ".pt", ".pth")))
    hint = (f" (found {pickles}: pickled weights are not loaded for safety; convert them to safetensors)"
            if pickles else "")
    raise FileNotFoundError(f"no .safetensors weights in {directory}{hint}")


def read_headers(files: list[str]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{tensor name: (file, shape, dtype e.g. "F32")} from the safetensors headers only (no tensor
    data is read)."""
    from safetensors import safe_open

    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in found:
                    raise ValueError(f"tensor {name!r} appears in both {found[name][0]} and {path}")
                info = f.get_slice(name)
                found[name] = (path, tuple(info.get_shape()), info.get_dtype())
    return found


def check_tensors(rules: dict[str, TensorRule], found: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor (both shapes)."""
    problems = []
    missing = sorted(set(rules) - set(found))
    if missing:
        problems.append(f"missing tensors: {missing}")
    unexpected = sorted(set(found) - set(rules) - {TIED_HEAD})
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    for name in sorted(set(rules) & set(found)):
        want, got = rules[name].hf_shape, found[name][1]
        if want != got:
            problems.append(f"shape mismatch for {name}: checkpoint has {list(got)}, config implies {list(want)}")
    if TIED_HEAD in found and found[TIED_HEAD][1] != rules[_TOP_RENAMES["embed.weight"]].hf_shape:
        problems.append(f"shape mismatch for {TIED_HEAD}: checkpoint has {list(found[TIED_HEAD][1])}, "
                        f"config implies {list(rules[_TOP_RENAMES['embed.weight']].hf_shape)}")
    if problems:
        raise ValueError("RecurrentGemma checkpoint does not match its config: " + "; ".join(problems))
