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
REPLAYS = "step_plan_replay"  # its entry counting the steps a `StepPlan` replayed

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

    def __reduce__(self):
        # a copy or an unpickled model starts with an empty memo: the bound calls close over
        # this model's arrays (and cannot be pickled)
        return KernelViews, ()

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
        memo, bound = self.current(rows)
        if bound is None or not memo.holds(pool):
            return None
        out = bound(x, rows)
        FUSED_CALLS[memo.name] += 1
        return x if out is None else out

    def holds(self, pool: tuple) -> bool:
        """Whether `pool` is the state pool (the same tensor objects) this memo's calls bound."""
        return len(pool) == len(self.pool) and all(map(operator.is_, pool, self.pool))

    def current(self, rows: "StepRows") -> tuple["KernelViews | None", object]:
        """(memo, call): the bound call a step of `rows`' kind would run (the streaming kernel's,
        or the hybrid path's for its row class) and the memo that holds it; (None, None) when
        there is none. Whether it is still valid is `run`'s business (or `StepPlan`'s)."""
        if rows.fused:
            return self, self.bound
        if rows.hybrid and self.hybrid_views is not None:
            return self.hybrid_views, self.hybrid_views.plans.get(rows.row_class)
        return None, None

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
        if not self.holds(pool):
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


class StepPlan:
    """A decoding step's bound calls in order, read from its ops' `KernelViews` after a step in
    which every op bound one: while the model is unchanged (`rows.unchanged`), the rows are of the
    same kind (streaming, or hybrid of the same row class), the same state pool is stepped and
    every memo still holds the call it held then, the next step replays them without walking
    the module tree (the same calls `KernelViews.run` would make, after the same checks).

    ops: (views, state) per op in step order, state the op's `SlotState` (its tensors are the
    pool the op's kernels bound, in declaration order) or None; the last op returns the logits."""

    __slots__ = ("kind", "views", "memos", "calls", "names", "pools")

    def __init__(self, kind, views, memos, calls, names, pools) -> None:
        self.kind, self.views, self.memos, self.calls, self.names, self.pools = (
            kind, views, memos, calls, names, pools)

    def __reduce__(self):
        return _no_plan, ()  # as KernelViews: a copied or unpickled model captures its own

    @staticmethod
    def _kind(rows: "StepRows") -> tuple:
        return rows.fused, rows.hybrid, rows.row_class

    @classmethod
    def capture(cls, ops: list[tuple[KernelViews, object]], rows: "StepRows") -> "StepPlan | None":
        """The plan of the step just made with `rows`, or None when some op has no bound call
        over its state's tensors (it ran its reference, or cannot bind)."""
        views, memos, calls, names, pools = [], [], [], [], []
        for v, state in ops:
            if v is None:
                return None
            memo, call = v.current(rows)
            if call is None:
                return None
            pool = () if state is None else tuple(state.tensors().items())
            if not memo.holds(tuple(t for _, t in pool)):
                return None
            views.append(v)
            memos.append(memo)
            calls.append(call)
            names.append(memo.name)
            pools.append((state, pool))
        return cls(cls._kind(rows), views, memos, calls, names, pools)

    def valid(self, rows: "StepRows", states: list) -> bool:
        """Whether a step of `rows` over the per-op `states` (as given to `capture`) may replay."""
        if not rows.unchanged or self._kind(rows) != self.kind:
            return False
        for v, memo, call, (state, pool), now in zip(self.views, self.memos, self.calls, self.pools, states):
            m, c = v.current(rows)
            if state is not now or m is not memo or c is not call:
                return False
            for name, t in pool:
                if getattr(state, name) is not t:
                    return False
        return True

    def replay(self, x: torch.Tensor, rows: "StepRows") -> torch.Tensor:
        """x (n, D) -> the last op's result (the logits), each op's call in turn."""
        FUSED_CALLS[REPLAYS] += 1
        for call, name in zip(self.calls, self.names):
            out = call(x, rows)
            FUSED_CALLS[name] += 1
            if out is not None:
                x = out
        return x


def _no_plan() -> None:
    return None
