"""The base of every block's decoding state: a dataclass of tensors whose dim 0 is the slot."""
from __future__ import annotations

import dataclasses

import torch


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
