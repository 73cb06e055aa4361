"""`KernelViews`: the numpy views a decoding op hands its kernels for one layer's weights and
state pool, made once and kept while the tensors stay the same objects at the same storage, and
the op's bound calls (what a step replays while nothing changed). Used by `ops.decode_step`."""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import numba_common
from .quantized import QuantizedWeight

if TYPE_CHECKING:
    from .decode_step import StepRows

FUSED_CALLS = numba_common.FUSED_CALLS  # kernel calls per op name

EMPTY_ARRAY = np.empty(0, np.float32)


def _kernel_tensor(t: torch.Tensor) -> bool:
    """The ops' shared rule (`numba_common.cpu_fusable`) plus contiguity: the kernels index raw memory.
    A quantized weight (`ops.quantized`) goes as its stored data and scales."""
    if isinstance(t, QuantizedWeight):
        return t.data.device.type == "cpu" and t.data.is_contiguous()
    return numba_common.cpu_fusable(t) and t.is_contiguous()


def _kernel_view(t) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """What a kernel gets for one of an op's tensors: an empty array for None, (data, scale) for a
    quantized weight, else a view of the float32 tensor."""
    if t is None:
        return EMPTY_ARRAY
    if isinstance(t, QuantizedWeight):
        return t.kernel_arrays()
    return numba_common.numpy_view(t.detach())


def weight_arrays(view) -> tuple[np.ndarray, np.ndarray]:
    """A projection weight's kernel arguments (weight, row scales): float32 weights have none."""
    return view if isinstance(view, tuple) else (view, EMPTY_ARRAY)


def _ptr(t) -> int:
    return 0 if t is None else (t.data if isinstance(t, QuantizedWeight) else t).data_ptr()


class KernelViews:
    """The numpy views an op hands its kernel for one layer's weights, made once and kept while
    the same tensor objects sit at the same storage (an optimizer's in-place update keeps them;
    `.to()`, `load_state_dict` into new tensors or a replaced parameter re-makes them). A layer
    owns one per fused op it calls, so a decoding step does not re-derive ~20 views per op, and
    tries `run` (the op's bound call: the streaming kernel's, or the hybrid path's for the step's
    row class, `plans`) before gathering the op's arguments at all."""

    __slots__ = ("tensors", "ptrs", "views", "pool", "pool_arrays", "bound", "name", "hybrid_views", "plans",
                 "plan_inputs")

    def __init__(self) -> None:
        self.tensors: tuple = ()
        self.ptrs: list[int] = []
        self.views: tuple | None = None
        self.pool: tuple = ()
        self.pool_arrays: tuple | None = None
        # The kernel with every argument but x and the step's rows bound (and the op's name for
        # FUSED_CALLS): what `run` calls while nothing changed, so that little Python runs
        # between two kernels of a step.
        self.bound = None
        self.name = ""
        self.hybrid_views: KernelViews | None = None  # the hybrid path's views (other tensors)
        # The hybrid path's bound calls by row class (`gemm_backend.row_class`): its GEMMs'
        # backends and packed weights are resolved per class (`linear.step_products`).
        self.plans: dict[int, object] = {}
        self.plan_inputs: tuple = ()  # the other tensors (projections) the plans were bound to

    def hybrid(self) -> "KernelViews":
        """The memo of the same layer's hybrid path."""
        if self.hybrid_views is None:
            self.hybrid_views = KernelViews()
        return self.hybrid_views

    def run(self, x: torch.Tensor, rows: "StepRows | None", *pool: torch.Tensor) -> torch.Tensor | None:
        """Runs the bound call (the streaming kernel's, or the hybrid path's for this row class)
        on x (n, D) if it is still valid for this step and state pool (nothing changed since it
        was bound) and returns the op's result; else None, and the caller goes the full way
        (gathering its arguments, then the op, which binds the call again)."""
        if rows is None or not rows.unchanged:
            return None
        if rows.fused:
            memo, bound = self, self.bound
        elif rows.hybrid and self.hybrid_views is not None:
            memo = self.hybrid_views
            bound = memo.plans.get(rows.row_class)
        else:
            return None
        if bound is None or len(pool) != len(memo.pool) or not all(map(operator.is_, pool, memo.pool)):
            return None
        out = bound(x, rows)
        FUSED_CALLS[memo.name] += 1
        return x if out is None else out

    def bind(self, row_class: int, name: str, inputs: tuple, bound) -> None:
        """Keeps `bound` as the hybrid path's call for `row_class`. `inputs`: the op's tensors that
        the views do not hold (its projections, which the call's GEMMs read); when they are other
        objects than those of the kept calls (replaced parameters, a LoRA model's re-merged
        weights), every other class's call is dropped first: it would compute with the old ones."""
        if len(inputs) != len(self.plan_inputs) or not all(map(operator.is_, inputs, self.plan_inputs)):
            self.plans.clear()
            self.plan_inputs = inputs
        self.plans[row_class], self.name = bound, name

    def states(self, *pool: torch.Tensor) -> tuple[np.ndarray, ...] | None:
        """Numpy arrays of a state pool's tensors (shared memory; pools are allocated once and
        never reallocated), or None unless they are float32 CPU tensors."""
        if len(pool) != len(self.pool) or not all(map(operator.is_, pool, self.pool)):
            ok = all(map(_kernel_tensor, pool))
            self.pool, self.pool_arrays, self.bound = pool, tuple(t.numpy() for t in pool) if ok else None, None
            self.plans.clear()
        return self.pool_arrays

    def __call__(self, tensors: tuple[torch.Tensor | None, ...], unchanged: bool = False
                 ) -> tuple[np.ndarray, ...] | None:
        """Views of `tensors` (an empty array for None), or None when one cannot go to a kernel
        (not a plain contiguous float32 CPU tensor: a DTensor, bf16, CUDA...). `unchanged`: the
        caller knows these are the tensors of the last call, at the same storage."""
        if unchanged and self.tensors:
            return self.views
        if len(tensors) == len(self.tensors) and all(map(operator.is_, tensors, self.tensors)) and \
                [_ptr(t) for t in tensors] == self.ptrs:
            return self.views
        ptrs = [_ptr(t) for t in tensors]
        ok = all(t is None or _kernel_tensor(t) for t in tensors)
        self.tensors, self.ptrs, self.bound = tensors, ptrs, None
        self.plans.clear()
        self.views = tuple(_kernel_view(t) for t in tensors) if ok else None
        return self.views
