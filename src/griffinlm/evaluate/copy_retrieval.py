"""Study 2, copying and retrieval: selective copying, induction heads and phonebook lookup.

Each architecture (equal parameters, equal steps) is trained on each task at its training length;
accuracy on the answer tokens is recorded against training steps, then measured on the same task
at longer contexts (the paper, Section 6.2: the Transformer learns these tasks fastest, Griffin
is close, Hawk is weakest at retrieval; Griffin's local attention limits retrieval beyond its
window, and the Transformer does not extrapolate past its training length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import SyntheticSampler, answer_accuracy, make_task
from ..precision import autocast
from .archs import ARCH_LABELS, ARCHS, matched_archs
from .intervals import one_run_verdict
from .report import md_table, pyplot, write_report
from .study import StudyContext, resolve_settings, settings_dict
from .training import run_key, study_settings, train_model

NAME = "copy-retrieval"
TASKS = ("selective_copying", "induction_heads", "phonebook")
TASK_LABELS = {"selective_copying": "Selective copying", "induction_heads": "Induction heads",
               "phonebook": "Phonebook lookup"}
_HELD_OUT = 1_000_003  # seed offset of evaluation examples: a stream training never draws


@dataclass(frozen=True)
class CopyRetrievalSettings:
    """Task sizes at training time: copy_length noise+data tokens with copy_tokens to copy;
    induction_length tokens before the query; phonebook_entries lines of names of name_len letters
    and numbers of phonebook_digits digits. test_factors multiply the context (length or entries)
    at test time. eval_examples: examples per accuracy measurement; eval_every 0: steps / 8."""

    archs: tuple[str, ...] = ARCHS
    tasks: tuple[str, ...] = TASKS
    width: int = 64
    depth: int = 3
    num_heads: int = 2
    local_window: int = 64
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    eval_every: int = 0
    eval_examples: int = 128
    vocab: int = 16
    copy_length: int = 64
    copy_tokens: int = 8
    induction_length: int = 64
    phonebook_entries: int = 8
    phonebook_name_len: int = 3
    phonebook_digits: int = 4
    test_factors: tuple[int, ...] = (1, 2, 4, 8)


BUDGETS = {
    "micro": CopyRetrievalSettings(width=32, num_heads=2, local_window=8, steps=4, batch_size=4, eval_every=2,
                                   eval_examples=8, copy_length=16, copy_tokens=3, induction_length=16,
                                   phonebook_entries=2, test_factors=(1, 2)),
    "small": CopyRetrievalSettings(),
    "medium": CopyRetrievalSettings(width=128, steps=2000, local_window=128, copy_length=128,
                                    induction_length=128, phonebook_entries=16),
    "large": CopyRetrievalSettings(width=512, depth=6, num_heads=4, steps=20000, batch_size=64, lr=1e-3,
                                   local_window=512, copy_length=1024, copy_tokens=16, induction_length=1024,
                                   phonebook_entries=64, phonebook_name_len=5, phonebook_digits=7),
}


def task_settings(s: CopyRetrievalSettings, task: str, factor: int = 1) -> dict[str, Any]:
    """The synthetic task's constructor settings, its context scaled by `factor`."""
    if task == "selective_copying":
        return {"length": s.copy_length * factor, "num_tokens": s.copy_tokens, "vocab": s.vocab}
    if task == "induction_heads":
        return {"length": s.induction_length * factor, "vocab": s.vocab}
    if task == "phonebook":
        return {"num_entries": s.phonebook_entries * factor, "name_len": s.phonebook_name_len,
                "num_digits": s.phonebook_digits}
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


@torch.no_grad()
def task_accuracy(model, task, examples: int, batch_size: int, seed: int) -> dict[str, float]:
    """Greedy answer accuracy on `examples` held-out examples: per answer token and exact match."""
    device = next(model.parameters()).device
    tok_sum, exact_sum, n = 0.0, 0.0, 0
    for i in range(max(1, -(-examples // batch_size))):
        size = min(batch_size, examples - n) if examples > n else batch_size
        batch = task.sample(size, np.random.default_rng([seed + _HELD_OUT, i])).to(device)
        with autocast(device):
            logits = model(batch.tokens, segment_pos=batch.segment_pos)
        token_acc, exact = answer_accuracy(logits.float(), batch)
        tok_sum += token_acc * size
        exact_sum += exact * size
        n += size
    return {"token_accuracy": tok_sum / n, "exact_match": exact_sum / n}


def run_copy_retrieval(ctx: StudyContext, budget: str = "small", overrides: dict[str, Any] | None = None) -> dict:
    """Runs (or completes, from the run cache) the study and writes copy-retrieval.md/.png/.json."""
    s = resolve_settings(BUDGETS, budget, overrides)
    vocab = 259  # the byte vocabulary: the phonebook needs it, and every run keeps the same embedding
    configs = matched_archs(s.archs, s.width, s.depth, s.num_heads, s.local_window, vocab_size=vocab)
    spec = study_settings(s.steps, s.batch_size, s.lr, s.seed)
    every = s.eval_every or max(1, s.steps // 8)
    results: dict[str, dict[str, dict]] = {}
    for task_name in s.tasks:
        train_task = make_task(task_name, **task_settings(s, task_name))
        tests = {f: make_task(task_name, **task_settings(s, task_name, f)) for f in s.test_factors}
        results[task_name] = {}
        for arch in s.archs:
            cfg = configs[arch]
            key = {"study": NAME, "task": task_name, "task_settings": task_settings(s, task_name), "arch": arch,
                   "model": cfg.to_dict(), "train": run_key(spec), "eval_every": every,
                   "eval_examples": s.eval_examples,
                   "tests": {str(f): task_settings(s, task_name, f) for f in s.test_factors}}

            def compute(cfg=cfg, arch=arch, train_task=train_task, tests=tests, task_name=task_name) -> dict:
                ctx.log(f"{NAME}: {task_name} / {arch}: {s.steps} steps of {s.batch_size} examples "
                        f"({train_task.seq_len} tokens)")
                sampler = SyntheticSampler(train_task, s.batch_size, s.seed)

                def probe(model) -> dict:
                    return task_accuracy(model, train_task, s.eval_examples, s.batch_size, s.seed)
                model, info = train_model(cfg, sampler.next_batch, spec, ctx.device, probe, every, ctx.log)
                by_length = []
                for f, t in tests.items():
                    acc = task_accuracy(model, t, s.eval_examples, s.batch_size, s.seed)
                    by_length.append({"factor": f, "context": t.seq_len, **acc})
                return {"params": info["params"], "train_seconds": info["train_seconds"],
                        "history": info["history"], "by_length": by_length}
            results[task_name][arch] = ctx.cache.run(f"{NAME}-{task_name}-{arch}", key, compute)
    return _write(ctx, s, results)


def _write(ctx: StudyContext, s: CopyRetrievalSettings, results: dict[str, dict[str, dict]]) -> dict:
    sections = []
    for task_name in s.tasks:
        res = results[task_name]
        steps = [h["step"] for h in res[s.archs[0]]["history"]]
        rows = [[ARCH_LABELS[a], res[a]["params"], *[h["token_accuracy"] for h in res[a]["history"]]]
                for a in s.archs]
        t1 = md_table(["model", "params", *[f"step {x}" for x in steps]], rows)
        contexts = [r["context"] for r in res[s.archs[0]]["by_length"]]
        rows2 = [[ARCH_LABELS[a], *[r["token_accuracy"] for r in res[a]["by_length"]],
                  *[r["exact_match"] for r in res[a]["by_length"]]] for a in s.archs]
        heads = [f"token acc @{c} ({f}x)" for c, f in zip(contexts, s.test_factors)]
        heads += [f"exact @{c}" for c in contexts]
        t2 = md_table(["model", *heads], rows2)
        sections.append(f"## {TASK_LABELS[task_name]} ({task_settings(s, task_name)})\n\n"
                        f"Answer-token accuracy on held-out examples during training:\n\n{t1}\n\n"
                        f"After training, by test context length in tokens (trained at {contexts[0]}):\n\n{t2}")
    plot_ok = _plot(ctx.out, s, results)
    intro = (f"Each model (width {s.width}, depth {s.depth}, {s.num_heads} heads, Griffin local window "
             f"{s.local_window}; parameters matched through the MLP width) is trained {s.steps} steps of "
             f"{s.batch_size} examples per task (lr {s.lr}, seed {s.seed}); accuracy is greedy prediction of "
             f"the answer tokens on {s.eval_examples} held-out examples. Test contexts are the training "
             f"context times {list(s.test_factors)}.")
    data = {"settings": settings_dict(s), "results": results}
    write_report(ctx.out, NAME, "Copying and retrieval", ctx.command, intro, sections, _verdicts(s, results),
                 data, plot_ok)
    return data


def _auc(history: list[dict]) -> float:
    """Mean accuracy over the training evaluations: how fast a task is learned."""
    return float(np.mean([h["token_accuracy"] for h in history]))


def _verdicts(s: CopyRetrievalSettings, results: dict[str, dict[str, dict]]) -> list[str]:
    out = []
    for task_name in s.tasks:
        res = results[task_name]
        speed = {a: _auc(res[a]["history"]) for a in s.archs}
        order = sorted(s.archs, key=lambda a: -speed[a])
        ranking = " > ".join(f"{ARCH_LABELS[a]} {speed[a]:.2f}" for a in order)
        claim = [a for a in ("transformer", "griffin", "hawk") if a in s.archs]
        if max(speed.values()) - min(speed.values()) < 0.02:
            verdict = "**inconclusive**: the models are indistinguishable at this budget"
        else:
            verdict = one_run_verdict(order == claim)
        out.append(f"{TASK_LABELS[task_name]}: learning speed (mean accuracy over training) {ranking}. Paper: "
                   f"Transformer fastest, Griffin close, Hawk slowest: {verdict}.")
        if len(s.test_factors) > 1:
            longest = {a: res[a]["by_length"][-1]["token_accuracy"] for a in s.archs}
            first = {a: res[a]["by_length"][0]["token_accuracy"] for a in s.archs}
            parts = ", ".join(f"{ARCH_LABELS[a]} {first[a]:.2f} -> {longest[a]:.2f}" for a in s.archs)
            ctx_len = res[s.archs[0]]["by_length"][-1]["context"]
            note = ""
            if "griffin" in s.archs and ctx_len > s.local_window:
                note = (f" The longest test context ({ctx_len} tokens) is beyond Griffin's local window "
                        f"({s.local_window}), so there only its recurrence can retrieve.")
            out.append(f"{TASK_LABELS[task_name]}: accuracy at the training length -> at {s.test_factors[-1]}x: "
                       f"{parts}.{note}")
    return out


def _plot(out: str, s: CopyRetrievalSettings, results: dict[str, dict[str, dict]]) -> bool:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(s.tasks), figsize=(4.2 * len(s.tasks), 7), squeeze=False)
    for j, task_name in enumerate(s.tasks):
        res = results[task_name]
        for a in s.archs:
            h = res[a]["history"]
            axes[0][j].plot([x["step"] for x in h], [x["token_accuracy"] for x in h], marker="o", ms=3,
                            label=ARCH_LABELS[a])
            r = res[a]["by_length"]
            axes[1][j].plot([x["context"] for x in r], [x["token_accuracy"] for x in r], marker="o", ms=3,
                            label=ARCH_LABELS[a])
        axes[0][j].set_title(TASK_LABELS[task_name])
        axes[0][j].set_xlabel("training step")
        axes[1][j].set_xlabel("test context (tokens)")
        axes[1][j].set_xscale("log", base=2)
        axes[1][j].axvline(res[s.archs[0]]["by_length"][0]["context"], color="gray", ls="--", lw=1)
        if "griffin" in s.archs:
            axes[1][j].axvline(s.local_window, color="tab:green", ls=":", lw=1)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("answer-token accuracy")
    axes[1][0].set_ylabel("answer-token accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Copying and retrieval (dashed: training length; dotted: Griffin window)")
    fig.tight_layout()
    fig.savefig(f"{out}/{NAME}.png", dpi=110)
    plt.close(fig)
    return True
