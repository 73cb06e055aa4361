"""Scale-out on PyTorch's distributed engine: a (dp, tp) device mesh, Megatron-style tensor
parallelism of Griffin's blocks, FSDP2 / DDP over the data-parallel ranks, distributed
checkpoints with resharding, and the memory planner behind `griffinlm plan`.

The model never imports this package: `parallelize` rewrites a built `LanguageModel` in place.
"""
from .data_parallel import (apply_activation_checkpointing, apply_fsdp, apply_replicate, mixed_precision_policy, parallelize,
                            replicate_trainable, sum_plain_gradients)
from .mesh import ParallelContext, build_context, launched_by_torchrun, setup_distributed, teardown
from .step import ShardedSampler, clip_grad_norm_, dp_sum, local_rows
from .tensor_parallel import TensorParallelError, apply_tensor_parallel, check_tp_degree, tp_plan

__all__ = [
    "ParallelContext", "ShardedSampler", "TensorParallelError", "apply_activation_checkpointing", "apply_fsdp",
    "apply_replicate",
    "apply_tensor_parallel", "build_context", "check_tp_degree", "clip_grad_norm_", "dp_sum",
    "launched_by_torchrun", "local_rows", "mixed_precision_policy", "parallelize", "replicate_trainable",
    "setup_distributed", "sum_plain_gradients", "teardown", "tp_plan",
]
