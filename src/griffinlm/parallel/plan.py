"""The memory and communication a (dp x tp) layout costs per GPU: the calculation behind
`griffinlm plan` and docs/distributed.md.

Memory per GPU (bytes), for P parameters of which P_tp are split by tensor parallelism:
    states       16 bytes per parameter (fp32 master weight 4, fp32 gradient 4, AdamW moments
                 8), divided by tp for TP-split parameters and by dp as well under FSDP
    fsdp buffers the bf16 copy of two blocks gathered at once (the running one and the
                 prefetched one) and one block's fp32 unsharded gradient before reduce-scatter;
                 without FSDP the bf16 copy of the whole local model
    activations  what backward keeps for one micro-batch (see `activation_bytes`)

Communication per GPU per optimizer step (bytes each rank sends, ring algorithms):
    all-reduce of N bytes over n ranks: 2 (n-1)/n N;  all-gather / reduce-scatter: (n-1)/n N.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GATED_ACTIVATIONS, ModelConfig
from ..layers.blocks import block_spec
from .tensor_parallel import TensorParallelError, check_tp_degree, split_parameters

GIB = 1024**3
STATE_BYTES = 16  # fp32 weight + fp32 grad + two fp32 AdamW moments


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model split by how TP treats them."""

    total: int
    tp_split: int  # sharded over TP ranks (column/row-parallel linears, conv, RG-LRU)
    replicated: int  # held whole by every TP rank (embedding, norms, MQA key/value, row biases)
    largest_block: int  # the biggest residual block (FSDP gathers one block at a time)


def count_params(config: ModelConfig) -> ParamCounts:
    """Parameter counts from a model built on the meta device (no memory)."""
    from ..model import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(config)
    sharded = split_parameters(model)  # from the TP plan itself
    total = split = 0
    for name, p in model.named_parameters():
        total += p.numel()
        split += p.numel() if name in sharded else 0
    largest = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    return ParamCounts(total, split, total - split, largest)


def activation_bytes(config: ModelConfig, tokens: int, tp: int, act_bytes: int = 2,
                     checkpointing: bool = False) -> int:
    """Bytes backward keeps for `tokens` (= micro-batch x sequence) tokens on one GPU.

    Per block: the two RMSNorms' inputs and outputs (replicated: every TP rank holds the whole
    residual stream) plus their fp32 internals; the MLP's branch outputs (hidden/tp channels);
    the recurrent block's 7 tensors of lru_width/tp channels plus 3 fp32 RG-LRU internals;
    attention's q, k, v before and after RoPE and its output (a fused kernel stores no
    scores). The head keeps bf16 and fp32 logits and the fp32 softmax, vocab wide and
    replicated. With activation checkpointing, each block keeps only its input, and one
    block's activations live at a time.
    """
    D, a = config.width, act_bytes
    R, M = config.resolved_lru_width, config.resolved_mlp_hidden
    q = config.num_heads * config.resolved_head_dim
    kv = config.num_kv_heads * config.resolved_head_dim
    kv_local = kv if config.num_kv_heads == 1 else kv // tp
    branches = 4 if config.mlp_activation in GATED_ACTIVATIONS else 2
    common = 4 * D * a + 2 * D * 4 + branches * M // tp * a
    attention = (3 * q // tp + 4 * kv_local) * a
    recurrent = 7 * R // tp * a + 3 * R // tp * 4
    blocks = [common + (attention if block_spec(k).is_attention else recurrent) for k in config.block_types]
    head = 2 * D * a + config.vocab_size * (a + 4 + 4)
    if checkpointing:
        return tokens * (len(blocks) * D * a + max(blocks) + head)
    return tokens * (sum(blocks) + head)


@dataclass(frozen=True)
class LayoutPlan:
    """Per-GPU memory (bytes) and communication (bytes sent per step) of one layout."""

    dp: int
    tp: int
    fsdp: bool
    params: int  # parameters held per GPU (sharded)
    states: int
    buffers: int
    activations: int
    comm_dp: int
    comm_tp: int

    @property
    def total(self) -> int:
        return self.states + self.buffers + self.activations


def plan_layout(config: ModelConfig, dp: int, tp: int, fsdp: bool = True, micro_batch: int = 1,
                seq_len: int = 2048, act_bytes: int = 2, checkpointing: bool = False,
                counts: ParamCounts | None = None) -> LayoutPlan:
    """Memory and communication per GPU for `dp` x `tp` GPUs.

    Raises:
        TensorParallelError: tp does not divide the heads, gate blocks or MLP width.
    """
    check_tp_degree(config, tp)
    c = counts or count_params(config)
    local = c.tp_split // tp + c.replicated  # parameters of one TP rank's model copy
    shard = dp if fsdp else 1
    params = local // shard
    states = STATE_BYTES * params
    block = c.largest_block // tp
    buffers = (2 * block * act_bytes + block * 4) if fsdp else local * act_bytes
    acts = activation_bytes(config, micro_batch * seq_len, tp, act_bytes, checkpointing)
    comm_dp = dp_comm_bytes(local, dp, fsdp, act_bytes, _root_params(config))
    comm_tp = tp_comm_bytes(config, micro_batch * seq_len, tp, act_bytes, checkpointing)
    return LayoutPlan(dp, tp, fsdp, params, states, buffers, acts, comm_dp, comm_tp)


def _root_params(config: ModelConfig) -> int:
    """Parameters outside the residual blocks (embedding + final norm)."""
    return config.vocab_size * config.width + config.width


def dp_comm_bytes(local_params: int, dp: int, fsdp: bool, param_bytes: int = 2, root_params: int = 0,
                  grad_bytes: int = 4) -> int:
    """Bytes one rank sends per step for data parallelism over `dp` ranks.

    FSDP: all-gather the (param_bytes) weights in forward and again in backward (the root's
    `root_params`, kept after forward, once), reduce-scatter the fp32 gradients.
    DDP: all-reduce the fp32 gradients.
    """
    if dp == 1:
        return 0
    ring = (dp - 1) / dp
    if fsdp:
        gathered = (2 * local_params - root_params) * param_bytes
        return int(ring * (gathered + local_params * grad_bytes))
    return int(2 * ring * local_params * grad_bytes)


def tp_comm_bytes(config: ModelConfig, tokens: int, tp: int, act_bytes: int = 2, checkpointing: bool = False) -> int:
    """Bytes one rank sends per step for tensor parallelism over `tp` ranks (`tokens` per
    replica per step): per block half, one all-reduce of the (tokens, width) activations in
    forward and one in backward; plus, per attention block with one replicated key/value head,
    the all-reduce of the k_proj/v_proj weight gradients (fp32). Activation checkpointing
    repeats the forward all-reduces in backward."""
    if tp == 1:
        return 0
    ring = 2 * (tp - 1) / tp
    passes = 3 if checkpointing else 2
    activations = passes * 2 * config.depth * tokens * config.width * act_bytes
    n_attn = sum(block_spec(k).is_attention for k in config.block_types)
    kv_grads = 0
    if config.num_kv_heads == 1:
        kv = config.resolved_head_dim * config.width + (config.resolved_head_dim if config.attention_qkv_bias else 0)
        kv_grads = n_attn * 2 * kv * 4
    return int(ring * (activations + kv_grads))


def layouts(config: ModelConfig, gpus: int, max_tp: int = 8) -> list[tuple[int, int]]:
    """(dp, tp) pairs with dp * tp = gpus and a TP degree the model allows (at most `max_tp`,
    the GPUs of one node, where the per-block all-reduces stay on NVLink)."""
    out = []
    for tp in range(1, min(gpus, max_tp) + 1):
        if gpus % tp:
            continue
        try:
            check_tp_degree(config, tp)
        except TensorParallelError:
            continue
        out.append((gpus // tp, tp))
    return out


def format_table(config_name: str, plans: list[LayoutPlan], micro_batch: int, seq_len: int,
                 gpu_memory_gib: float | None = None) -> str:
    """A plain-text table of plans (GiB per GPU; communication in GiB sent per GPU per step)."""
    lines = [f"{config_name}: per-GPU memory (GiB) for micro-batch {micro_batch} x {seq_len} tokens, "
             f"bf16 compute, fp32 master weights, gradients and AdamW moments",
             f"{'layout':>14} {'fsdp':>5} {'params':>9} {'states':>8} {'buffers':>8} {'activ.':>8} {'total':>8}"
             f" {'dp comm':>8} {'tp comm':>8}" + ("  fits" if gpu_memory_gib else "")]
    for p in plans:
        row = (f"{f'{p.dp} dp x {p.tp} tp':>14} {'yes' if p.fsdp else 'no':>5} {p.params / 1e9:8.2f}B "
               f"{p.states / GIB:8.1f} {p.buffers / GIB:8.1f} {p.activations / GIB:8.1f} {p.total / GIB:8.1f}"
               f" {p.comm_dp / GIB:8.2f} {p.comm_tp / GIB:8.2f}")
        if gpu_memory_gib:
            row += "  yes" if p.total / GIB <= gpu_memory_gib else "  no"
        lines.append(row)
    return "\n".join(lines)
