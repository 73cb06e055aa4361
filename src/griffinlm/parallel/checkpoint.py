"""Distributed checkpoints (`torch.distributed.checkpoint`) with resharding, and export.

`save_distributed` writes the model and optimizer state as DCP shards: each rank writes what
it holds (FSDP and TP shards, replicated tensors once), with global shapes and offsets in the
metadata, so `load_distributed` can read them back on any number of ranks and any (dp, tp)
layout, a single process without a process group included. Tensors are keyed by the
parameter names of the unsharded model, the same names as `model.safetensors`.

`export_safetensors` gathers the full weights on rank 0 into the single-file format that
the rest of the project reads (`griffinlm eval`, generation, interop).
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..checkpoint import file_sha256, write_json_durable  # same manifest and fsync'd JSON as single-process

DCP_DIR = "dcp"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def is_distributed_checkpoint(path: str) -> bool:
    """True if the checkpoint directory holds DCP shards (`dcp/.metadata`)."""
    return os.path.isfile(os.path.join(path, DCP_DIR, ".metadata"))


def save_distributed(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Writes `model` (and `optimizer`) as DCP shards into `path`. Every rank must call it."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=path)


def load_distributed(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Reads DCP shards written on any number of ranks into `model` (and `optimizer`) as they
    are laid out on this job's ranks. Every rank must call it; build the optimizer (and
    parallelize the model) first."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU, on rank 0 only (empty elsewhere). Every rank must call it."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def export_safetensors(model: nn.Module, path: str) -> None:
    """Writes the full weights to `path` (model.safetensors) from rank 0. Every rank must call it."""
    import safetensors.torch as st

    weights = full_state_dict(model)
    if _is_main():
        st.save_file({k: v.contiguous() for k, v in weights.items()}, path, metadata={"format": "pt"})


def load_full(model: nn.Module, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None,
              optim_state: dict | None = None) -> None:
    """Loads full (unsharded) weights, and optionally a full optimizer state keyed by parameter
    name, into a parallelized model: each rank keeps its shards."""
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def named_optimizer_state(state: dict, param_groups: list[dict], names: list[str]) -> dict:
    """A `torch.optim` state dict keyed by parameter index (as `Optimizer.state_dict()` gives)
    re-keyed by parameter name, the form `set_optimizer_state_dict` reads.

    names: the parameter names in the optimizer's order (group after group).
    """
    renamed = {names[int(i)]: {k: v for k, v in s.items()} for i, s in state.items()}
    groups = []
    for g in param_groups:
        g = dict(g)
        g["params"] = [names[int(i)] for i in g["params"]]
        groups.append(g)
    return {"state": renamed, "param_groups": groups}


# --- training checkpoints (the layout of griffinlm.checkpoint, with DCP shards) ----------------
def save_training_checkpoint(run_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                             trainer_state: dict, keep_last: int, layout: dict) -> str:
    """Writes checkpoint `step` of a distributed run; every rank must call it. Returns its path.

    The directory has the files of a single-process checkpoint (config.json, model.safetensors
    with the full weights, state.safetensors with rank 0's RNG states, trainer.json with the
    manifest), so every reader of checkpoints works, plus `dcp/`: the model and optimizer
    shards, which `load_training_state` reads back on any number of ranks. Written into a
    temporary directory and renamed, like single-process checkpoints.
    """
    import safetensors.torch as st

    from ..checkpoint import FORMAT_VERSION, checkpoint_dir, list_checkpoints, rng_state

    root = checkpoint_dir(run_dir)
    final = os.path.join(root, f"step_{step:08d}")
    token = [os.getpid()]
    dist.broadcast_object_list(token, src=0)  # one temporary name for all ranks
    tmp = os.path.join(root, f".tmp-step_{step:08d}-{token[0]}")
    if _is_main():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    save_distributed(os.path.join(tmp, DCP_DIR), model, optimizer)
    export_safetensors(model, os.path.join(tmp, "model.safetensors"))
    if _is_main():
        write_json_durable(os.path.join(tmp, "config.json"), model.config.to_dict())
        rng_tensors, rng_scalars = rng_state()
        st.save_file(rng_tensors, os.path.join(tmp, "state.safetensors"))
        manifest = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)), "sha256": file_sha256(os.path.join(tmp, name))}
                    for name in ("config.json", "model.safetensors", "state.safetensors")}
        write_json_durable(os.path.join(tmp, "trainer.json"), {
            "format": FORMAT_VERSION, "step": step, "optimizer_param_groups": [], "rng": rng_scalars,
            "manifest": manifest, "distributed": layout, **trainer_state})
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_training_state(ckpt: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads a verified checkpoint (`griffinlm.checkpoint.Checkpoint`) into a model and optimizer
    laid out on this job's ranks, whatever the layout it was saved from: DCP shards if it has
    them (saved by a distributed run), else the full weights and the single-process optimizer
    state, each rank keeping its shards. Every rank must call it."""
    import safetensors.torch as st

    from ..checkpoint import check_config

    check_config(ckpt.config, model.config, ckpt.path)
    if is_distributed_checkpoint(ckpt.path):
        load_distributed(os.path.join(ckpt.path, DCP_DIR), model, optimizer)
        return
    weights = st.load_file(os.path.join(ckpt.path, "model.safetensors"))
    groups = ckpt.trainer["optimizer_param_groups"]
    names = [n for g in groups for n in g["names"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ckpt.state.items():
        if key.startswith("optim."):
            _, idx, field = key.split(".", 2)
            state.setdefault(int(idx), {})[field] = value
    load_full(model, weights, optimizer, named_optimizer_state(state, groups, names))


def gather_model(model: nn.Module) -> nn.Module | None:
    """A plain single-device copy of a parallelized LanguageModel on rank 0 (None elsewhere),
    e.g. to generate text. Every rank must call it."""
    weights = full_state_dict(model)
    if not _is_main():
        return None
    from ..model import LanguageModel

    plain = LanguageModel(model.config)
    plain.load_state_dict(weights)
    return plain
