"""The base of every block's decoding state: a dataclass of tensors whose dim 0 is the slot."""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn as nn

from .adapters import adapter_state, adapters_in


class SlotState:
    """Mixin for a block's state dataclass: tensor fields of shape (N, ...), one row per slot
    of the pool, allocated once and updated in place. `ModelCache` implements every slot
    operation (reset, copy, snapshot, restore) over `tensors()`, once for all block kinds."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by field name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def view(self, slot: int):
        """The same state restricted to one slot: (1, ...) views, so writes land in the pool."""
        return dataclasses.replace(self, **{k: t[slot:slot + 1] for k, t in self.tensors().items()})


class TreeWatch:
    """Tells cheaply (one pass over cached references) whether any submodule, parameter or buffer object of a
    module tree was replaced, or any tensor's storage moved (`.to()`, `param.data = ...`), since
    the last call. In-place updates (an optimizer step, `load_state_dict`) are not changes, except
    under peft's LoRA wrappers, whose adapted parameters are sums rather than views
    (`adapters.adapter_state`).

    The decoding step asks once per token (`LanguageModel.step`) and, when nothing changed, lets
    every layer reuse the arguments it gathered for its fused op (`StepArgs`, `KernelViews`)
    instead of re-reading tens of attributes per layer. Plain Python attributes (a norm's eps, a
    head count) are not watched: they are construction-time settings."""

    __slots__ = ("dicts", "keys", "objects", "tensors", "ptrs", "adapters", "adapter_state")

    def __init__(self) -> None:
        self.dicts: list[dict] = []
        self.keys: list[str] = []
        self.objects: list = []
        self.tensors: list[torch.Tensor] = []
        self.ptrs: list[int] = []
        self.adapters: list[nn.Module] = []
        self.adapter_state: tuple = ()

    def __reduce__(self):
        return TreeWatch, ()  # a copied or unpickled model starts watching its own tree

    def unchanged(self, root: nn.Module) -> bool:
        """False on the first call and after any change (then it starts watching anew)."""
        if (self.dicts and all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.objects))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs
                and (not self.adapters or adapter_state(self.adapters) == self.adapter_state)):
            return True
        entries = [(d, k, o) for m in root.modules() for d in (m._modules, m._parameters, m._buffers)
                   for k, o in d.items()]
        self.dicts, self.keys, self.objects = (list(e) for e in zip(*entries))
        self.tensors = [o for _, _, o in entries if isinstance(o, torch.Tensor)]
        self.ptrs = list(map(torch.Tensor.data_ptr, self.tensors))
        self.adapters = adapters_in(root)
        self.adapter_state = adapter_state(self.adapters)
        return False


class StepArgs:
    """A layer's arguments for its fused decoding op, gathered once and reused while the
    model's `TreeWatch` says nothing changed (nn.Module attribute lookups are slow, and a
    block's step makes tens of them per token)."""

    __slots__ = ("args",)

    def __init__(self) -> None:
        self.args: tuple | None = None

    def get(self, build, unchanged: bool) -> tuple:
        """The memo when `unchanged`, else `build()` (and remember it)."""
        if not unchanged or self.args is None:
            self.args = build()
        return self.args
