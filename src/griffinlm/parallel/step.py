"""What a training step needs on a mesh: each rank's rows of the batch, global sums, clipping.

The global batch is the one a single process would draw (the sampler's state is the same on
every rank, so checkpoints are interchangeable); each DP rank reads only its contiguous block
of rows, and TP ranks of one replica read the same rows.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..data import Batch, BatchSampler
from .mesh import ParallelContext


def row_block(rows: int, ctx: ParallelContext) -> slice:
    """This DP rank's contiguous rows of a global batch of `rows`.

    Raises:
        ValueError: the rows do not split evenly over the DP ranks.
    """
    if rows % ctx.dp_size:
        raise ValueError(f"a micro-batch of {rows} sequences does not split over {ctx.dp_size} data-parallel "
                         f"ranks; choose --batch-size / --grad-accum divisible by {ctx.dp_size}")
    n = rows // ctx.dp_size
    return slice(ctx.dp_rank * n, (ctx.dp_rank + 1) * n)


class _RowShard:
    """A PackedSequences view that reads only this rank's rows of each requested batch."""

    def __init__(self, data: Any, ctx: ParallelContext) -> None:
        self.data, self.ctx = data, ctx

    def __len__(self) -> int:
        return len(self.data)

    def get(self, indices: np.ndarray) -> Batch:
        return self.data.get(np.asarray(indices)[row_block(len(indices), self.ctx)])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.data, name)


class ShardedSampler:
    """Wraps a training sampler (`next_batch`, `state_dict`, `load_state_dict`) so that
    `next_batch` returns this rank's rows of the global batch.

    A corpus sampler (`BatchSampler`) reads only those rows from disk; other samplers (synthetic
    tasks generate a batch from a seed) draw the global batch and keep the rows.
    """

    def __init__(self, sampler: Any, ctx: ParallelContext) -> None:
        self.sampler, self.ctx = sampler, ctx
        if isinstance(sampler, BatchSampler):
            row_block(sampler.batch_size, ctx)  # fail early on an uneven split
            sampler.data = _RowShard(sampler.data, ctx)
            self._slice = False
        else:
            self._slice = True

    def next_batch(self) -> Batch:
        batch = self.sampler.next_batch()
        return local_rows(batch, self.ctx) if self._slice else batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


def local_rows(batch: Batch, ctx: ParallelContext) -> Batch:
    """This DP rank's rows of a global batch. num_bytes is split in proportion to counted
    targets (exact for synthetic tasks, where a byte is a target)."""
    if ctx.dp_size == 1:
        return batch
    s = row_block(batch.tokens.shape[0], ctx)
    mask = batch.loss_mask[s]
    total = max(1, batch.num_targets)
    return Batch(batch.tokens[s], batch.targets[s], batch.segment_pos[s], mask,
                 batch.num_bytes * float(mask.sum()) / total)


def dp_sum(values: Iterable[float], ctx: ParallelContext, device: torch.device | None = None) -> list[float]:
    """Sums python numbers over the DP ranks (TP ranks hold the same values)."""
    values = list(values)
    if not ctx.distributed or ctx.dp_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device or ctx.device)
    dist.all_reduce(t, group=ctx.mesh.get_group("dp"))
    return t.tolist()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a model whose gradients are DTensors on any mesh
    (TP shards, FSDP shards, both) mixed with plain tensors. Returns the global L2 norm.

    Squared norms are summed locally per set of mesh dims a gradient is sharded over, then
    all-reduced over exactly those dims (a replicated dim is counted once).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    sums: dict[tuple, torch.Tensor] = {}
    locals_: list[torch.Tensor] = []
    for g in grads:
        groups: tuple = ()
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                raise RuntimeError(f"a gradient is still a partial sum ({g.placements}): it was not reduced")
            # Any non-replicated dim holds disjoint pieces (Shard, or FSDP's _StridedShard over a
            # TP shard, which is not a Shard subclass): sum over it.
            groups = tuple(g.device_mesh.get_group(i) for i, pl in enumerate(g.placements) if not pl.is_replicate())
            local = g.to_local()
        else:
            local = g
        locals_.append(local)
        sq = local.detach().float().pow(2).sum()
        sums[groups] = sums[groups] + sq if groups in sums else sq
    device = locals_[0].device if locals_ else torch.device("cpu")
    total = torch.zeros((), device=device)
    for groups, sq in sums.items():
        for group in groups:
            dist.all_reduce(sq, group=group)
        total += sq
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for local in locals_:
        local.mul_(coef.to(local.dtype))
    return norm

