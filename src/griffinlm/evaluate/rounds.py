"""Training in rounds until a task is solved: evaluation after every round, early stopping at a
target accuracy or a step cap, every round cached so an interrupted study resumes where it stopped.

A round is `round_steps` optimizer steps followed by an evaluation (`eval_fn`). Its result (step,
train loss, the evaluation's numbers) is stored in the study's `RunCache` under the run's key plus
the round number, and the model, optimizer and data position after it in a torch file beside the
cached JSON; the next round starts from that file. The learning rate warms up linearly and then
stays constant, so a round's result does not depend on the step cap: raising the cap later extends
a run from its cached rounds instead of starting again.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..data import Batch
from ..model import LanguageModel
from ..parallel import ParallelContext
from ..train.optim import make_optimizer
from ..train.step import optimizer_step
from .runcache import RunCache

EvalFn = Callable[[LanguageModel], dict[str, Any]]
BatchFn = Callable[[int], Batch]  # batch index -> training batch (a pure function of the index)


@dataclass(frozen=True)
class RoundSpec:
    """round_steps: optimizer steps per round; max_steps: the cap (a multiple of round_steps is
    reached at the end of the round that crosses it); target: the accuracy (`metric` of the round's
    evaluation) that counts as solved. AdamW settings as in `TrainConfig`'s defaults."""

    round_steps: int
    max_steps: int
    target: float = 0.99
    metric: str = "token_accuracy"
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0

    def key(self) -> dict[str, Any]:
        """What decides a round's result (the cap and target do not: they only decide when to stop)."""
        return {"round_steps": self.round_steps, "batch_size": self.batch_size, "lr": self.lr,
                "warmup_steps": self.warmup_steps, "weight_decay": self.weight_decay, "betas": list(self.betas),
                "eps": self.eps, "grad_clip": self.grad_clip, "seed": self.seed, "schedule": "warmup-constant"}


def lr_at_step(spec: RoundSpec, step: int) -> float:
    """Linear warmup to `spec.lr` over `warmup_steps`, then constant (step is 0-based)."""
    if spec.warmup_steps > 0 and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    return spec.lr


@dataclass
class RoundRun:
    """One model trained in rounds. `history` holds one record per completed round; `stopped` is
    set once the run reached its target ("solved") or its cap ("cap")."""

    name: str
    key: dict[str, Any]
    model_cfg: ModelConfig
    spec: RoundSpec
    batch_fn: BatchFn
    eval_fn: EvalFn
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    model: LanguageModel | None = None
    optimizer: torch.optim.Optimizer | None = None

    @property
    def step(self) -> int:
        return self.history[-1]["step"] if self.history else 0

    @property
    def solved(self) -> bool:
        return bool(self.history) and self.history[-1][self.spec.metric] >= self.spec.target

    def _round_name(self, r: int) -> str:
        return f"{self.name}-r{r}"

    def _round_key(self, r: int) -> dict[str, Any]:
        return {**self.key, "rounds": self.spec.key(), "round": r}

    def state_path(self, cache: RunCache, r: int) -> str:
        """The torch file holding the model, optimizer and step after round r."""
        return cache.path(self._round_name(r), self._round_key(r))[:-len(".json")] + ".pt"

    def _update_stopped(self) -> None:
        if self.solved:
            self.stopped = "solved"
        elif self.step >= self.spec.max_steps:
            self.stopped = "cap"
        else:
            self.stopped = ""

    def _build(self, device: torch.device) -> None:
        torch.manual_seed(self.spec.seed)
        self.model = LanguageModel(self.model_cfg).to(device)
        self.optimizer = make_optimizer(self.model, self.spec.lr, self.spec.weight_decay, self.spec.betas,
                                        self.spec.eps)

    def _load(self, cache: RunCache, r: int, device: torch.device) -> bool:
        """Loads the state after round r (a fresh model for r = 0); False when its file is missing."""
        self._build(device)
        if r == 0:
            return True
        path = self.state_path(cache, r)
        if not os.path.exists(path):
            return False
        state = torch.load(path, map_location=device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return True

    def _save(self, cache: RunCache, r: int) -> None:
        os.makedirs(cache.directory, exist_ok=True)
        path = self.state_path(cache, r)
        tmp = path + ".tmp"
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, tmp)
        os.replace(tmp, path)

    def next_round_cached(self, cache: RunCache) -> bool:
        r = len(self.history) + 1
        return cache.get(self._round_name(r), self._round_key(r)) is not None

    def advance(self, cache: RunCache, device: torch.device, log: Callable[[str], None] | None = None) -> None:
        """Completes the next round: from the cache when stored, else by training from the previous
        round's state (restarting from scratch if that state's file is gone)."""
        r = len(self.history) + 1
        found = cache.get(self._round_name(r), self._round_key(r))
        if found is not None:
            cache.hits += 1
            self.history.append(found)
            self._update_stopped()
            if log is not None:
                log(f"  {self.name} round {r} (step {found['step']}) from the cache: "
                    f"{self.spec.metric} {found[self.spec.metric]:.4f}")
            return
        if self.model is None and not self._load(cache, r - 1, device):
            if log is not None:
                log(f"  {self.name}: the state after round {r - 1} is missing; replaying rounds 1..{r - 1}")
            self._replay(r - 1, device)
        cache.misses += 1
        record = self._train_round(r, device)
        self._save(cache, r)
        cache.put(self._round_name(r), self._round_key(r), record)
        old = self.state_path(cache, r - 1) if r > 1 else None
        if old and os.path.exists(old):
            os.unlink(old)  # only the latest state is needed to resume
        self.history.append(record)
        self._update_stopped()
        if log is not None:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
            log(f"  {self.name} round {r}: step {record['step']}, {shown}")

    def _replay(self, rounds: int, device: torch.device) -> None:
        """Retrains rounds 1..`rounds` from a fresh model without evaluating (training is
        deterministic given the seed, so this rebuilds a state whose file was removed)."""
        self._build(device)
        for i in range(1, rounds + 1):
            self._train_round(i, device, evaluate=False)

    def _train_round(self, r: int, device: torch.device, evaluate: bool = True) -> dict[str, Any]:
        """Trains round r (steps (r-1)*round_steps .. r*round_steps - 1) and evaluates."""
        par = ParallelContext(None, device)
        model, spec = self.model, self.spec
        model.train()
        t0 = time.perf_counter()
        losses = []
        first = (r - 1) * spec.round_steps
        for step in range(first, first + spec.round_steps):
            result = optimizer_step(model, self.optimizer, [self.batch_fn(step)], par,
                                    lr=lr_at_step(spec, step), grad_clip=spec.grad_clip, dtype="fp32")
            losses.append(result.loss)
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {"round": r, "step": first + spec.round_steps,
                                  "train_loss": sum(losses[-10:]) / len(losses[-10:]),
                                  "round_seconds": seconds}
        model.eval()
        if evaluate:
            with torch.no_grad():
                record.update(self.eval_fn(model))
        return record

    def final_model(self, cache: RunCache, device: torch.device) -> LanguageModel:
        """The model after the last completed round (loaded from its state file if not in memory)."""
        if self.model is None:
            r = len(self.history)
            if not self._load(cache, r, device):
                self._replay(r, device)
        self.model.eval()
        return self.model


def train_rounds(runs: list[RoundRun], cache: RunCache, device: torch.device,
                 log: Callable[[str], None] | None = None,
                 after_round: Callable[[], None] | None = None, train: bool = True) -> None:
    """Advances every run round by round, interleaved (round r of each run before round r + 1 of
    any), until each has stopped; `after_round` is called after every round of the group (e.g. to
    rewrite a report of the progress so far). `train=False`: cached rounds only, a run whose next
    round is not in the cache stays where it is (not stopped: in progress)."""
    waiting: set[int] = set()
    while any(not run.stopped and id(run) not in waiting for run in runs):
        for run in runs:
            if run.stopped or id(run) in waiting:
                continue
            if not train and not run.next_round_cached(cache):
                waiting.add(id(run))
                continue
            run.advance(cache, device, log)
        if after_round is not None:
            after_round()
