"""The base of every block's decoding state: a dataclass of tensors whose dim 0 is the slot."""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn as nn


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


class StepArgs:
    """A layer's arguments for its fused decoding op, gathered once and gathered again when a
    parameter, buffer or submodule of the watched modules is replaced (each nn.Module attribute
    lookup costs about half a microsecond, and a block's step makes tens of them per token).
    In-place updates (an optimizer step, `load_state_dict`) keep the same objects and are seen."""

    __slots__ = ("args", "dicts", "keys", "objects")

    def __init__(self) -> None:
        self.args: tuple | None = None
        self.dicts: list[dict] = []
        self.keys: list[str] = []
        self.objects: list = []

    def get(self, build, *modules: nn.Module) -> tuple:
        """`build()` the first time and whenever an entry of `modules`' trees changed."""
        if torch.compiler.is_compiling():
            return build()
        if self.args is None or not all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.objects)):
            self.args = build()
            entries = [(d, k, o) for m in modules for sub in m.modules()
                       for d in (sub._modules, sub._parameters, sub._buffers) for k, o in d.items()]
            self.dicts, self.keys, self.objects = (list(e) for e in zip(*entries)) if entries else ([], [], [])
        return self.args
