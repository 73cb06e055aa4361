"""Data parallelism over the mesh's "dp" dimension, and `parallelize`, the one entry point.

FSDP2 (`fully_shard`) wraps each residual block, then the root (embedding + final norm):
parameters, gradients and optimizer states are sharded across the DP ranks; a block's
parameters are all-gathered just before it runs (forward and again in backward) and its
gradients reduce-scattered right after its backward. Without `fsdp`, the same blocks are
wrapped by FSDP2's `replicate` (DDP semantics: whole parameters on every rank, one gradient
all-reduce per block). Both compose with tensor parallelism: a TP-sharded parameter becomes
a 2-D DTensor (Shard(0) over dp, its TP placement over tp).

Mixed precision: with a bf16 `param_dtype`, the norms and RG-LRUs
(`precision.fp32_parameter_modules`) are wrapped first as FSDP units of their own with an fp32
parameter policy that leaves their inputs' dtype alone, so Lambda, the norm scales and the
recurrent state are fp32 as in a single-device autocast run (see `griffinlm.precision`).

A model that trains only a few parameters (LoRA adapters on a frozen base) is replicated more
simply (`replicate_trainable`): every parameter stays a plain tensor, so the fused CPU kernels,
peft's merging and saving and the single-process checkpoint format all apply unchanged; the
trainable parameters are broadcast from rank 0 once, and their gradients summed over the DP
ranks in one flat all-reduce per optimizer step (`sum_plain_gradients`, called by the training
step). A frozen base needs no synchronisation: every rank loaded the same weights.

Gradients are summed, not averaged, across DP ranks: each rank's loss is already divided by
the number of target tokens of the whole global batch, so the sum is exactly the gradient of
one process on that batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .mesh import ParallelContext
from .tensor_parallel import apply_tensor_parallel


def mixed_precision_policy(device: torch.device, dtype: torch.dtype | None = None) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on GPU; plain fp32 on CPU (the default)."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _low_precision(policy: MixedPrecisionPolicy) -> bool:
    return policy.param_dtype is not None and policy.param_dtype != torch.float32


# fp32 parameters, fp32 gradient reduction, and the inputs left in the dtype they arrive in
# (the enclosing block's bf16): the module computes as it would under single-device autocast.
FP32_POLICY = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)


def _shard_fp32_modules(module: nn.Module, dp_mesh: DeviceMesh, policy: MixedPrecisionPolicy,
                        shard: Callable[..., None]) -> list[nn.Module]:
    """Under a low-precision policy, wrap `module`'s norms and RG-LRUs as units with FP32_POLICY
    (before their parent: FSDP wraps children first). Returns the wrapped modules."""
    from ..precision import fp32_parameter_modules

    if not _low_precision(policy):
        return []
    mods = fp32_parameter_modules(module)
    for m in mods:
        shard(m, mesh=dp_mesh, mp_policy=FP32_POLICY)
    return mods


def _sum_gradients(modules: list[nn.Module]) -> None:
    for m in modules:
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: gloo has neither AVG nor PREMUL_SUM.
            m.set_force_sum_reduction_for_comms(True)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """FSDP2 over each residual block and the root. Returns the model (modified in place)."""
    mp_policy = mp_policy or MixedPrecisionPolicy()
    fp32 = []
    for block in model.blocks:
        fp32 += _shard_fp32_modules(block, dp_mesh, mp_policy, fully_shard)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy)
    fp32 += _shard_fp32_modules(model.final_norm, dp_mesh, mp_policy, fully_shard)
    # The root's parameters (embedding, final norm) are needed first in backward: keep them.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)
    _sum_gradients([*fp32, *model.blocks, model])
    return model


def apply_replicate(model: nn.Module, dp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """DDP (FSDP2's `replicate`): whole parameters everywhere, gradients all-reduced per block."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    mp_policy = mp_policy or MixedPrecisionPolicy()
    fp32 = []
    for block in model.blocks:
        fp32 += _shard_fp32_modules(block, dp_mesh, mp_policy, replicate)
        replicate(block, mesh=dp_mesh, mp_policy=mp_policy)
    fp32 += _shard_fp32_modules(model.final_norm, dp_mesh, mp_policy, replicate)
    replicate(model, mesh=dp_mesh, mp_policy=mp_policy)
    _sum_gradients([*fp32, *model.blocks, model])
    return model


def replicate_trainable(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Data parallelism for a model whose trainable parameters are few (LoRA adapters): they are
    broadcast from DP rank 0 (plain tensors, nothing wrapped); `sum_plain_gradients` sums their
    gradients at each step. Raises ValueError with tensor parallelism (not supported here)."""
    if ctx.tp_size > 1:
        raise ValueError("adapter training runs data parallel only: no --tp")
    if ctx.dp_size > 1:
        group = ctx.mesh.get_group("dp")
        src = dist.get_global_rank(group, 0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=src, group=group)
    return model


@torch.no_grad()
def sum_plain_gradients(parameters, ctx: ParallelContext) -> None:
    """Sums the gradients of plain-tensor parameters over the DP ranks, as one flat all-reduce
    (the DTensor parameters of FSDP / replicate reduce their own in backward; none here then)."""
    if not ctx.distributed or ctx.dp_size == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None and type(p.grad) is torch.Tensor]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ctx.mesh.get_group("dp"))
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recomputes each residual block's activations in backward instead of keeping them
    (torch's composable `checkpoint`: hooks on the block, parameter names unchanged). Applied
    once; a block already checkpointed is left as it is."""
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        if not getattr(block, "_griffinlm_checkpointed", False):
            checkpoint(block)
            block._griffinlm_checkpointed = True
    return model


def parallelize(model: nn.Module, ctx: ParallelContext, fsdp: bool = False,
                mp_policy: MixedPrecisionPolicy | None = None, activation_checkpointing: bool = False,
                trainable_only: bool = False) -> nn.Module:
    """Activation checkpointing (if asked), tensor parallel over ctx's "tp" dim, then FSDP (or
    DDP) over its "dp" dim. In place; the model itself never knows. trainable_only: a model
    that trains a few parameters on a frozen base (`replicate_trainable`; no FSDP or TP).

    Build the optimizer after this call: the parameters are replaced by DTensors.
    A single-process context gets activation checkpointing only.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if not ctx.distributed:
        return model
    if trainable_only:
        if fsdp:
            raise ValueError("adapter training runs data parallel only: no --fsdp")
        return replicate_trainable(model, ctx)
    if ctx.tp_size > 1:
        apply_tensor_parallel(model, ctx.mesh["tp"])
    if fsdp or ctx.dp_size > 1:
        # FSDP2 refills its unsharded parameters through collectives, which bump no version
        # counter: no cached packed / stacked / bf16 copies of them (they would go stale)
        from ..ops.gemm_backend import disable_weight_copies
        disable_weight_copies()
    if fsdp:
        apply_fsdp(model, ctx.mesh["dp"], mp_policy)
    elif ctx.dp_size > 1:
        apply_replicate(model, ctx.mesh["dp"], mp_policy)
    return model
