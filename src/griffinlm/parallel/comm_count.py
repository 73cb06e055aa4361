"""Counting the bytes a rank communicates: a dispatch mode that sees every collective.

Both kinds of collectives pass through the dispatcher: c10d ops (FSDP's all-gathers and
reduce-scatters, `replicate`'s all-reduces, explicit `dist.*` calls) and functional
collectives (DTensor's redistributions in tensor parallelism), so one `TorchDispatchMode`
counts them all, whoever issues them.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# op name (without namespace / overload) -> (kind, which tensor's size is the payload)
_OPS = {
    "allreduce_": ("all_reduce", "input"), "all_reduce": ("all_reduce", "input"),
    "all_reduce_coalesced": ("all_reduce", "input"), "allreduce_coalesced_": ("all_reduce", "input"),
    "_allgather_base_": ("all_gather", "output"), "allgather_": ("all_gather", "output"),
    "all_gather_into_tensor": ("all_gather", "output"), "all_gather_into_tensor_coalesced": ("all_gather", "output"),
    "allgather_into_tensor_coalesced_": ("all_gather", "output"),
    "_reduce_scatter_base_": ("reduce_scatter", "input"), "reduce_scatter_": ("reduce_scatter", "input"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"), "reduce_scatter_tensor_coalesced": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "input"),
    "broadcast_": ("broadcast", "input"), "broadcast": ("broadcast", "input"),
    "all_to_all_single": ("all_to_all", "input"), "alltoall_base_": ("all_to_all", "input"),
}


def _group_size(ns: str, args: tuple) -> int:
    """Ranks in the collective's group: a ProcessGroup argument (c10d ops) or a group name
    (functional collectives)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in args:
        if ns == "_c10d_functional" and isinstance(a, str) and not a.isalpha():
            try:
                return _resolve_process_group(a).size()
            except (KeyError, RuntimeError, ValueError):
                continue
        if ns == "c10d" and isinstance(a, torch.ScriptObject):
            try:
                return int(a.size())
            except (AttributeError, RuntimeError):
                continue
    return dist.get_world_size() if dist.is_initialized() else 1


class CommCounter(TorchDispatchMode):
    """Records each collective issued while active: count, payload bytes, and the bytes this
    rank sends under ring algorithms (all-reduce 2(n-1)/n of the payload; all-gather and
    reduce-scatter (n-1)/n of the full tensor).

    Example:
        with CommCounter() as c:
            train_step()
        c.summary()  # {"all_reduce": {"calls": ..., "payload": ..., "sent": ...}, ...}
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "payload": 0, "sent": 0.0})

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        ns = func.namespace
        name = func._schema.name.split("::")[-1]
        if ns in ("c10d", "_c10d_functional") and name in _OPS:
            kind, which = _OPS[name]
            n = _group_size(ns, args)
            # c10d ops take (output, input, ...) except all-reduce/broadcast (tensors, ...);
            # functional collectives take the local input first.
            index = 1 if ns == "c10d" and which == "input" and kind in ("reduce_scatter", "all_to_all") else 0
            tensors = [t for t in tree_leaves(args[index]) if isinstance(t, torch.Tensor)]
            payload = sum(t.numel() * t.element_size() for t in tensors)
            if which == "output" and ns == "_c10d_functional":
                payload *= n  # the functional all-gather's argument is the local shard
            ring = (n - 1) / n if n > 1 else 0.0
            sent = payload * ring * (2 if kind == "all_reduce" else 1)
            r = self.records[kind]
            r["calls"] += 1
            r["payload"] += payload
            r["sent"] += sent
        return func(*args, **kwargs)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per kind of collective: calls, payload bytes, bytes sent by this rank."""
        return {k: dict(v) for k, v in self.records.items()}
