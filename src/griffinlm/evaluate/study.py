"""What every study shares: where it writes, on which device, its run cache, and its settings
(a frozen dataclass per study, chosen by budget and then overridden field by field)."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .runcache import RunCache

BUDGETS = ("micro", "small", "medium", "large", "paper")  # "paper": copy-retrieval only

S = TypeVar("S")


@dataclass
class StudyContext:
    """out: report directory (runs are cached under out/runs/); command: shown in the report."""

    out: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    command: str = ""
    recompute: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        self.cache = RunCache(os.path.join(self.out, "runs"), self.recompute)
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()

    def log(self, msg: str) -> None:
        """A progress line with wall time and this process's CPU time (on a busy machine the CPU
        time is the better estimate of the wall time on idle cores)."""
        if not self.quiet:
            wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._cpu0
            print(f"[{wall:7.1f}s wall, {cpu:7.1f}s cpu] {msg}", file=sys.stderr, flush=True)


def resolve_settings(budgets: dict[str, S], budget: str, overrides: dict[str, Any] | None = None) -> S:
    """The settings of `budget` with `overrides` applied (lists become tuples, as fields are tuples)."""
    if budget not in budgets:
        raise ValueError(f"unknown budget {budget!r}; expected one of {sorted(budgets)}")
    base = budgets[budget]
    if not overrides:
        return base
    names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(names)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(base, **fixed)


def settings_dict(settings: Any) -> dict[str, Any]:
    """JSON-safe dict of a settings dataclass (tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(settings).items()}
