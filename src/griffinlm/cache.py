"""The decoding state pool: `batch_size` independent sequence slots, each at its own position.

A slot holds one sequence's whole decoding state: per recurrent block the conv's last inputs
and the RG-LRU state (fp32), per local-attention block a ring of the last window's keys and
values, per global-attention block keys and values up to `max_length`. For Hawk and Griffin
that is a constant size whatever the sequence length, which is what lets one process decode
many sequences at once. Every tensor is allocated once by `LanguageModel.init_cache` and
updated in place; shapes never change, so a compiled step stays valid.

Slot operations: `reset` (empty, position 0), `copy_` (fork a sequence, the cheap prefix
sharing a constant-size state allows), `select` (a new pool of chosen, possibly repeated,
slots) and `put` (write a pool's slots into chosen ones), `snapshot` / `restore` (one slot's state as a dict of
tensors), and `save_state` / `load_state` (a snapshot in a safetensors file).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .layers import AttentionCache
from .layers.state import SlotState

SlotIndex = int | Sequence[int] | torch.Tensor


@dataclass
class ModelCache:
    """Per-block state pools plus each slot's position.

    Attributes:
        blocks: one `RecurrentCache` or `AttentionCache` per residual block, dim 0 the slot.
        positions: (N,) long, tokens already in each slot.
        doc_start: (N,) long, position in its slot where each slot's current document starts
            (a packed prompt may start a new document mid-slot).
    """

    blocks: list[SlotState]
    positions: torch.Tensor
    doc_start: torch.Tensor

    def __post_init__(self) -> None:
        sizes = [c.entries for c in self.blocks if isinstance(c, AttentionCache) and not c.ring]
        self._capacity = min(sizes) if sizes else None  # shapes never change
        self.all_slots = torch.arange(self.batch_size, device=self.positions.device)  # (N,): every slot in order
        if self.positions.is_cuda:
            # A step compiled with mode="reduce-overhead" updates these in place; Inductor captures
            # it as a CUDA graph only if their addresses are fixed (else: "mutated inputs", no graph).
            for t in self._all_tensors() + [self.all_slots]:
                torch._dynamo.mark_static_address(t)

    @property
    def batch_size(self) -> int:
        """Number of slots N."""
        return self.positions.shape[0]

    @property
    def capacity(self) -> int | None:
        """Most tokens one slot can hold: the smallest global-attention cache, or None (no limit)."""
        return self._capacity

    def nbytes(self) -> int:
        """Bytes held by the pool's tensors."""
        return sum(t.numel() * t.element_size() for t in self._all_tensors())

    # --- checks --------------------------------------------------------------------------------
    def check_slots(self, slots: SlotIndex, name: str = "slots") -> tuple[torch.Tensor, list[int]]:
        """`slots` as a (n,) long tensor on the pool's device and as a list, after checking that
        they are in range and distinct; a ValueError naming the problem otherwise."""
        is_tensor = isinstance(slots, torch.Tensor)
        if is_tensor and (slots.dtype.is_floating_point or slots.dtype == torch.bool or slots.dim() > 1):
            raise ValueError(f"{name} must be a 1-D tensor of integer slot indices, got {slots.dtype} "
                             f"{tuple(slots.shape)}")
        values = [slots] if isinstance(slots, int) else (slots.reshape(-1).tolist() if is_tensor else list(slots))
        if not values:
            raise ValueError(f"{name} is empty")
        for s in values:
            if isinstance(s, bool) or not hasattr(s, "__index__") or not 0 <= s < self.batch_size:
                raise ValueError(f"{name}: slot index {s!r} out of range [0, {self.batch_size}) "
                                 f"(init_cache batch_size)")
        if len(set(values)) != len(values):
            dup = next(s for s in values if values.count(s) > 1)
            raise ValueError(f"{name}: slot {dup} appears more than once in one call")
        device = self.positions.device
        if is_tensor and slots.dtype == torch.long and slots.device == device and slots.dim() == 1:
            return slots, values
        return torch.tensor([int(s) for s in values], dtype=torch.long, device=device), values

    def slot_tensor(self, slots: SlotIndex, name: str = "slots") -> torch.Tensor:
        """`slots` checked (`check_slots`) as a (n,) long tensor."""
        return self.check_slots(slots, name)[0]

    def check_room(self, slots: torch.Tensor, new_tokens: int) -> int | None:
        """ValueError if `new_tokens` more tokens in any of `slots` would overflow a global cache;
        else the most positions any of them then holds (None without global attention)."""
        cap = self._capacity
        if cap is None:
            return None
        if self.positions.device.type == "cpu":  # numpy reads a few CPU ints without torch's op overhead
            reach = int(self.positions.numpy()[slots.numpy()].max()) + new_tokens
        else:
            reach = int(self.positions.index_select(0, slots).max()) + new_tokens
        if reach > cap:
            raise ValueError(f"global attention cache holds {cap} positions per slot but a slot would reach "
                             f"{reach}; pass a larger max_length to init_cache")
        return reach

    # --- slot operations -------------------------------------------------------------------------
    def reset(self, slots: SlotIndex) -> "ModelCache":
        """Empties `slots` (state zeroed, position 0: the next token starts a new sequence)."""
        idx = self.slot_tensor(slots)
        for t in self._all_tensors():
            t.index_fill_(0, idx, 0)
        return self

    def copy_(self, src_slot: int, dst_slots: SlotIndex) -> "ModelCache":
        """Forks the sequence in `src_slot` into each of `dst_slots` (state and position)."""
        src = self.slot_tensor(src_slot, "src_slot")
        dst = self.slot_tensor(dst_slots, "dst_slots")
        if int(src) in dst.tolist():
            raise ValueError(f"dst_slots contains the source slot {int(src)}")
        for t in self._all_tensors():
            t.index_copy_(0, dst, t.index_select(0, src).expand(len(dst), *t.shape[1:]))
        return self

    def snapshot(self, slot: int) -> dict[str, torch.Tensor]:
        """One slot's state as independent tensors: "position", "doc_start" (0-d long) and
        "blocks.{i}.{name}" (the slot's row; a global-attention cache only up to its position)."""
        s = int(self.slot_tensor(slot, "slot"))
        position = int(self.positions[s])
        out = {"position": self.positions[s].clone(), "doc_start": self.doc_start[s].clone()}
        for i, c in enumerate(self.blocks):
            for name, t in c.tensors().items():
                row = t[s]
                if isinstance(c, AttentionCache) and not c.ring:
                    row = row[:, :position]  # (Hkv, position, hd): the filled entries only
                out[f"blocks.{i}.{name}"] = row.clone()
        return out

    def restore(self, slot: int, snapshot: dict[str, torch.Tensor]) -> "ModelCache":
        """Puts a `snapshot` (from this or another pool of the same model) into `slot`. Checks
        every name, shape and dtype first, so a mismatched snapshot leaves the pool unchanged."""
        s = int(self.slot_tensor(slot, "slot"))
        if not isinstance(snapshot, dict):
            raise ValueError(f"snapshot must be a dict of tensors from ModelCache.snapshot, got {type(snapshot).__name__}")
        expected = {"position", "doc_start"} | {f"blocks.{i}.{n}" for i, c in enumerate(self.blocks) for n in c.tensors()}
        missing, extra = sorted(expected - snapshot.keys()), sorted(snapshot.keys() - expected)
        if missing or extra:
            raise ValueError(f"snapshot does not match this model's cache: missing {missing}, unexpected {extra} "
                             f"(a state from another model config?)")
        position = snapshot["position"]
        if position.shape != () or position.dtype != torch.long:
            raise ValueError("snapshot['position'] must be a 0-d long tensor")
        position = int(position)
        writes = []
        for i, c in enumerate(self.blocks):
            for name, t in c.tensors().items():
                key = f"blocks.{i}.{name}"
                got, want = snapshot[key], t[s]
                if isinstance(c, AttentionCache) and not c.ring:
                    if position > want.shape[1]:
                        raise ValueError(f"snapshot holds {position} positions but this cache's global attention "
                                         f"holds {want.shape[1]}; pass a larger max_length to init_cache")
                    want = want[:, :position]
                if got.shape != want.shape:
                    raise ValueError(f"snapshot {key} has shape {tuple(got.shape)} but this model's cache expects "
                                     f"{tuple(want.shape)} (a state from another model config?)")
                if got.dtype != want.dtype:
                    raise ValueError(f"snapshot {key} has dtype {got.dtype} but this cache holds {want.dtype}")
                writes.append((t, want, got))
        for t, _, _ in writes:
            t[s].zero_()
        for _, view, got in writes:
            view.copy_(got)
        self.positions[s] = position
        self.doc_start[s] = int(snapshot["doc_start"])
        return self

    def _all_tensors(self) -> list[torch.Tensor]:
        return [self.positions, self.doc_start] + [t for c in self.blocks for t in c.tensors().values()]

    def select(self, slots: SlotIndex) -> "ModelCache":
        """A new pool whose slot i is a copy of slot slots[i] of this one (a slot may repeat:
        one sequence forked into several, e.g. a shared context scored with several endings)."""
        idx = torch.as_tensor(slots, dtype=torch.long).reshape(-1).to(self.positions.device)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= self.batch_size:
            raise ValueError(f"slots must be a non-empty list of slots in [0, {self.batch_size})")

        def rows(state):
            return dataclasses.replace(state, **{k: t.index_select(0, idx) for k, t in state.tensors().items()})

        return ModelCache([rows(c) for c in self.blocks], self.positions.index_select(0, idx),
                          self.doc_start.index_select(0, idx))

    def put(self, slots: SlotIndex, other: "ModelCache") -> "ModelCache":
        """Writes the slots of pool `other` (of the same model and sizes) into `slots` of this
        one, in order: other's slot i goes to slots[i]."""
        idx = self.slot_tensor(slots)
        mine, theirs = self._all_tensors(), other._all_tensors()
        if len(idx) != other.batch_size or [t.shape[1:] for t in mine] != [t.shape[1:] for t in theirs]:
            raise ValueError(f"cannot put a pool of {other.batch_size} slots into {len(idx)} slots of a pool with "
                             "other state shapes")
        for t, u in zip(mine, theirs):
            t.index_copy_(0, idx, u)
        return self

    def view(self, slot: int) -> "ModelCache":
        """A one-slot pool whose tensors are views of slot `slot` (writes land in this pool)."""
        return ModelCache([c.view(slot) for c in self.blocks], self.positions[slot:slot + 1],
                          self.doc_start[slot:slot + 1])


def save_state(path: str | os.PathLike, snapshot: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes a slot `snapshot` (`ModelCache.snapshot`) to a safetensors file, atomically (a
    temporary file renamed into place, so a crash never leaves a half-written state)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in snapshot.items()}, tmp,
              metadata={"format": "griffinlm-state", **(metadata or {})})
    os.replace(tmp, path)


def load_state(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Reads a snapshot written by `save_state` (restore it with `ModelCache.restore`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"state file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
        state = load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors state file ({e})") from None
    if fmt != "griffinlm-state":
        raise ValueError(f"{path} is a safetensors file but not a griffinlm state (format {fmt!r})")
    return state
