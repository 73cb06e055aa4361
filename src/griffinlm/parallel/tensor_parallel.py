"""Tensor parallelism as in the Griffin paper (Megatron-style), on PyTorch's DTensor engine.

The plan, per residual block (tp ranks; "col" = ColwiseParallel, "row" = RowwiseParallel):

    temporal_norm, mlp_norm        replicated (every rank holds the whole residual stream)
    MLP        gate_proj, up_proj  col: each rank computes hidden/tp channels
               down_proj           row: partial sums, one all-reduce
    MQA        q_proj              col: each rank holds num_heads/tp whole query heads
               k_proj, v_proj      replicated (the single MQA key/value head); their output
                                   gradient is a partial sum over the ranks' heads, summed
                                   by the block input's backward all-reduce
               o_proj              row: one all-reduce
    recurrent  linear_y, linear_x  col: each rank holds lru_width/tp channels
               conv1d              per channel: weight (W, C) Shard(1), bias Shard(0)
               rg_lru              per channel / per gate block: gate weights (H, bw, bw) and
                                   biases (H, bw) Shard(0) (whole blocks per rank), Lambda
                                   Shard(0); no communication at all
               linear_out          row: one all-reduce

Each block half receives its input once as a replicated DTensor (PrepareModuleInput), so
the backward pass sums the gradients of all its column-parallel branches in a single
all-reduce: one all-reduce per block half in the forward pass and one in the backward pass.
The embedding, the tied output layer and the final norm are replicated.

Layers that compute per head or per channel (attention, Conv1D, RG-LRU) run on local
tensors: after sharding, their head/channel counts are set to the local counts
(`num_heads`, `num_blocks`, `width`, ...), as torchtitan does, so the model code needs no
knowledge of the mesh.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               parallelize_module)

from ..config import GATED_ACTIVATIONS, BlockKind, ModelConfig
from ..layers.blocks import block_spec


class TensorParallelError(ValueError):
    """The model cannot be split over the requested number of tensor-parallel ranks."""


def check_tp_degree(config: ModelConfig, tp: int) -> None:
    """Refuses a TP degree that does not divide what each rank must hold whole.

    Raises:
        TensorParallelError: naming every size that `tp` does not divide.
    """
    if tp < 1:
        raise TensorParallelError(f"tensor-parallel degree must be at least 1, got {tp}")
    if tp == 1:
        return
    specs = [block_spec(k) for k in set(config.block_types)]
    problems = []
    if any(s.is_attention for s in specs):
        if config.num_heads % tp:
            problems.append(f"num_heads={config.num_heads} (attention heads)")
        if config.num_kv_heads > 1 and config.num_kv_heads % tp:
            problems.append(f"num_kv_heads={config.num_kv_heads} (key/value heads; 1 is replicated)")
    if BlockKind.RECURRENT in config.block_types and config.resolved_lru_blocks % tp:
        problems.append(f"lru_num_blocks={config.resolved_lru_blocks} (RG-LRU gate blocks, held whole per rank)")
    if config.resolved_mlp_hidden % tp:
        problems.append(f"mlp hidden width={config.resolved_mlp_hidden}")
    if problems:
        raise TensorParallelError(
            f"tensor-parallel degree {tp} does not divide " + ", ".join(problems)
            + "; choose a --tp that divides each of them")


# --- custom styles ----------------------------------------------------------------------------
class ReplicatedParallel(ParallelStyle):
    """Every rank holds the whole module (e.g. MQA's single key/value projection).

    Its input is a replicated DTensor and its output a local tensor that each rank then uses
    with its own subset of heads, so the output's gradient differs per rank: it is declared
    Partial, and summing it is folded into the block input's backward all-reduce.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(_module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            return tuple(DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
                         if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

        def to_local(_module: nn.Module, output: DTensor, _mesh: DeviceMesh) -> torch.Tensor:
            return output.to_local(grad_placements=(Partial(),))

        distribute_module(module, device_mesh, None, to_dtensor, to_local)
        for param in module.parameters(recurse=False):
            param.register_hook(_sum_partial_grad)
        return module


def _sum_partial_grad(grad: DTensor) -> DTensor:
    """A replicated parameter's gradient, summed over the ranks that each computed a part of it.

    (FSDP does the same redistribution itself for the parameters it manages.)"""
    if any(p.is_partial() for p in grad.placements):
        return grad.redistribute(placements=[Replicate()] * grad.device_mesh.ndim)
    return grad


class LocalShardParallel(ParallelStyle):
    """Parameters sharded on the given dims; the module computes on the local shards.

    For per-channel layers (Conv1D, RG-LRU): their inputs are local channel shards, and each
    rank's gradient for its shard is complete, so no communication is needed.

    Args:
        shard_dims: parameter name (direct parameters of the module) -> dim to shard.
    """

    def __init__(self, shard_dims: dict[str, int]) -> None:
        super().__init__()
        self.shard_dims = shard_dims

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in list(module.named_parameters(recurse=False)):
            if name not in self.shard_dims:
                raise TensorParallelError(f"{type(module).__name__}.{name}: no shard dim in the plan")
            dt = distribute_tensor(param.data, device_mesh, (Shard(self.shard_dims[name]),))
            module.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))
        module.forward = _local_params_forward(module, module.forward)
        return module

    def __repr__(self) -> str:
        return f"LocalShardParallel({self.shard_dims})"


def _local_params_forward(module: nn.Module, forward: Callable[..., Any],
                          grad_placements: tuple[Placement, ...] | None = None) -> Callable[..., Any]:
    """`forward` run with the module's DTensor parameters swapped for their local tensors.

    The swap happens inside the call (after FSDP's pre-forward hook has put the unsharded
    parameters in place) and `to_local` is differentiable, so gradients reach the DTensor
    parameters (with their own placements, or `grad_placements`)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        params = module._parameters
        saved = dict(params)
        try:
            for name, p in saved.items():
                if isinstance(p, DTensor):
                    params[name] = p.to_local(grad_placements=grad_placements)
            return forward(*args, **kwargs)
        finally:
            params.update(saved)

    return run


# --- the plan -------------------------------------------------------------------------------------
# ResidualBlock calls its temporal module as temporal(x, pos, cache): only x is a tensor to
# distribute; the MLP takes x alone.
_TEMPORAL_INPUT = PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                     desired_input_layouts=(Replicate(), None, None))
_MLP_INPUT = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))
def _style(layout: str | tuple[str, dict[str, int]], config: ModelConfig) -> ParallelStyle:
    """A block kind's declared layout of one submodule (`BlockSpec.tp_layout`) as a ParallelStyle."""
    if isinstance(layout, tuple):  # ("local", {param: dim})
        return LocalShardParallel(layout[1])
    if layout == "kv":  # one key/value head is replicated (MQA), more are split like q
        return ReplicatedParallel() if config.num_kv_heads == 1 else ColwiseParallel()
    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}[layout]()


def block_plan(config: ModelConfig, kind: BlockKind | str, prefix: str) -> dict[str, ParallelStyle]:
    """The TP plan of one residual block: module path -> ParallelStyle."""
    plan: dict[str, ParallelStyle] = {f"{prefix}.temporal": _TEMPORAL_INPUT}
    t = f"{prefix}.temporal"
    plan.update({f"{t}.{name}": _style(layout, config) for name, layout in block_spec(kind).tp_layout.items()})
    m = f"{prefix}.mlp"
    plan[m] = _MLP_INPUT
    if config.mlp_activation in GATED_ACTIVATIONS:
        plan[f"{m}.gate_proj"] = ColwiseParallel()
    plan[f"{m}.up_proj"] = ColwiseParallel()
    plan[f"{m}.down_proj"] = RowwiseParallel()
    if config.learnable_swish_beta:
        # A scalar used on every rank's hidden shard: replicated, its gradient a partial sum.
        plan[f"{m}.act"] = _ReplicatedScalar()
    return plan


class _ReplicatedScalar(ParallelStyle):
    """A replicated parameter used on sharded activations (learnable Swish beta)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in list(module.named_parameters(recurse=False)):
            dt = distribute_tensor(param.data, device_mesh, (Replicate(),))
            module.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))
            module._parameters[name].register_hook(_sum_partial_grad)
        module.forward = _local_params_forward(module, module.forward, (Partial(),))
        return module


def tp_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The whole model's plan (the embedding, final norm and output layer stay replicated)."""
    plan: dict[str, ParallelStyle] = {}
    for i, block in enumerate(model.blocks):
        plan.update(block_plan(model.config, block.kind, f"blocks.{i}"))
    return plan


def split_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters that the TP plan (`tp_plan`) shards over the ranks; the others
    are held whole by every rank. The plan is the one source of both (`griffinlm plan` counts
    with this)."""
    split: set[str] = set()
    for path, style in tp_plan(model).items():
        module = model.get_submodule(path)
        if isinstance(style, ColwiseParallel):
            names = [n for n, _ in module.named_parameters(recurse=False)]  # weight and bias split by rows
        elif isinstance(style, RowwiseParallel):
            names = ["weight"]  # the bias is added once, after the reduction: replicated
        elif isinstance(style, LocalShardParallel):
            names = list(style.shard_dims)
        else:
            names = []
        split.update(f"{path}.{n}" for n in names if getattr(module, n, None) is not None)
    return split


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shards `model` (a LanguageModel) in place over the 1-D `tp_mesh`. Returns it.

    Raises:
        TensorParallelError: the TP degree does not divide the heads, gate blocks or MLP width.
    """
    tp = tp_mesh.size()
    check_tp_degree(model.config, tp)
    if tp == 1:
        return model
    parallelize_module(model, tp_mesh, tp_plan(model))  # the layers read their sizes from their weights
    return model
