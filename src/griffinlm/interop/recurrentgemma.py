"""Load RecurrentGemma checkpoints (`transformers` format) into griffinlm, and export back.

Loading is memory-lean: the model is built with its parameters on the meta device (no
allocation, no random init), then each tensor is read from its safetensors shard, converted,
and put in place one at a time, so peak memory is one copy of the weights plus one tensor.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..model import LanguageModel
from ..ops.quantized import QuantizedWeight
from .hf_config import NotRecurrentGemmaError, hf_to_model_config, model_config_to_hf
from .weights import (INDEX_FILE, SINGLE_FILE, TIED_HEAD, check_tensors, read_headers, shard_files,
                      tensor_rules)

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_hf_config(path: str | os.PathLike) -> tuple[str, dict]:
    """(directory, config.json dict) of a RecurrentGemma checkpoint; clear errors otherwise."""
    directory = os.fspath(path)
    if os.path.isfile(directory) and os.path.basename(directory) == "config.json":
        directory = os.path.dirname(directory) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"RecurrentGemma checkpoint directory not found: {directory}")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise NotRecurrentGemmaError(f"{directory} is not a RecurrentGemma checkpoint: it has no config.json")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except ValueError as e:
        raise NotRecurrentGemmaError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise NotRecurrentGemmaError(f"{cfg_path} does not hold a JSON object")
    if hf.get("model_type") != "recurrent_gemma":
        raise NotRecurrentGemmaError(f"{directory} is not a RecurrentGemma checkpoint: config.json has model_type "
                                     f"{hf.get('model_type')!r}, expected 'recurrent_gemma'")
    return directory, hf


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers (e.g. RoPE
    frequencies, which a checkpoint does not store) stay real so they need no recomputation."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config: ModelConfig) -> LanguageModel:
    """A LanguageModel whose parameters are on the meta device (to be assigned)."""
    with parameters_on_meta():
        return LanguageModel(config)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(module._modules.get(leaf), QuantizedWeight):  # quantized as it is read
        q = QuantizedWeight.quantize(tensor, module._modules[leaf].mode)
        module._modules[leaf].data, module._modules[leaf].scale = q.data, q.scale
        return
    old = module._parameters[leaf]
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def load_recurrentgemma(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, quantize: str | None = None) -> LanguageModel:
    """A griffinlm `LanguageModel` holding a RecurrentGemma checkpoint, in eval mode.

    Args:
        path: a `transformers` RecurrentGemma directory (config.json + model.safetensors, or
            shards listed by model.safetensors.index.json).
        dtype: parameter dtype (torch dtype or "float32"/"bfloat16"/"float16"); default: the
            dtype the embedding is stored in.
        device: where the parameters go (default CPU); tensors are moved one at a time.
        quantize: "int8" or "bf16" (`griffinlm.quantize`): each projection and the embedding is
            quantized as it is read, so no full-precision copy of the model is ever held; the
            other parameters are float32 (`dtype` is then ignored).

    Its logits on tokens (B, T) equal `RecurrentGemmaForCausalLM`'s (up to float rounding).
    Raises NotRecurrentGemmaError for a directory that is not a RecurrentGemma checkpoint, and
    ValueError naming missing, unexpected or mis-shaped tensors.
    """
    directory, hf = read_hf_config(path)
    config = hf_to_model_config(hf)
    files = shard_files(directory)
    found = read_headers(files)
    model = empty_model(config)
    rules = tensor_rules({n: tuple(p.shape) for n, p in model.named_parameters()})
    check_tensors(rules, {k: (f, s) for k, (f, s, _) in found.items()})
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} unknown; expected one of {sorted(DTYPE_NAMES)}")
        dtype = DTYPE_NAMES[dtype]
    if dtype is None:
        dtype = _DTYPES.get(found["model.embed_tokens.weight"][2], torch.float32)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if quantize is not None:
        from ..quantize import quantize_

        quantize_(model, quantize, empty=True)  # the quantized structure, on meta until assigned
        dtype = torch.float32

    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name == TIED_HEAD:  # the output layer is the embedding
                    continue
                rule = rules[name]
                # copy=True: safetensors hands out views of the memory-mapped file; owning the
                # memory keeps the model valid if the file is later overwritten (e.g. re-export).
                tensor = rule.from_hf(f.get_tensor(name)).to(device=device, dtype=dtype, copy=True)
                _assign(model, rule.ours, tensor)
    for module in model.modules():  # buffers were built on CPU; keep their dtype (fp32 RoPE)
        for bname, buf in module._buffers.items():
            if buf is not None:
                module._buffers[bname] = buf.to(device)
    return model.eval()


def hf_state_dict(model: LanguageModel) -> dict[str, torch.Tensor]:
    """Our weights under RecurrentGemma names and layouts (tensors share memory where the layout is the same)."""
    rules = tensor_rules({n: tuple(p.shape) for n, p in model.named_parameters()})
    params = dict(model.named_parameters())
    return {hf: rule.to_hf(params[rule.ours].detach()).contiguous().cpu() for hf, rule in rules.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}.get(dtype, "float32")


def export_recurrentgemma(model: LanguageModel, out_dir: str | os.PathLike,
                          special_ids: dict[str, int] | None = None,
                          max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Writes `model` as a `transformers` RecurrentGemma directory; returns the files written.

    config.json + model.safetensors, or shards model-0000i-of-0000n.safetensors with
    model.safetensors.index.json when the weights exceed `max_shard_bytes`. Raises ValueError
    naming the config fields RecurrentGemma cannot express.
    """
    from safetensors.torch import save_file

    out = os.fspath(out_dir)
    dtype = next(model.parameters()).dtype
    hf_cfg = model_config_to_hf(model.config, special_ids, _dtype_name(dtype))
    tensors = hf_state_dict(model)
    os.makedirs(out, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    written = [os.path.join(out, "config.json")]
    with open(written[0], "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if len(shards) == 1:
        written.append(os.path.join(out, SINGLE_FILE))
        save_file(shards[0], written[-1], metadata={"format": "pt"})
        return written
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
        written.append(os.path.join(out, fname))
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    written.append(os.path.join(out, INDEX_FILE))
    with open(written[-1], "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return written
