"""Study 2, copying and retrieval: selective copying, induction heads and phonebook lookup.

Each architecture (equal parameters, equal steps) is trained on each task at its training length;
accuracy on the answer tokens is recorded against training steps, then measured on the same task
at longer contexts (the paper, Section 6.2: the Transformer learns these tasks fastest, Griffin
is close, Hawk is weakest at retrieval; Griffin's local attention limits retrieval beyond its
window, and the Transformer does not extrapolate past its training length).

Every architecture is trained for each seed (initialisation, training data and held-out examples);
comparisons between architectures are paired by seed and called from 95% Student-t intervals over
the seeds (`intervals`). Each accuracy is shown beside its chance rate (`chance_rates`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import SyntheticSampler, answer_accuracy, make_task
from ..precision import autocast
from .archs import ARCH_LABELS, ARCHS, matched_archs
from .intervals import Interval, mean_interval, paired_interval, verdict
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
    seeds: tuple[int, ...] = (0, 1, 2)
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
    # Train until solved (round_steps > 0): rounds of round_steps steps, each followed by an
    # evaluation at the training length, until accuracy >= target_accuracy or max_steps; the copy_*
    # fields set selective copying's own rounds and cap (0: as round_steps / max_steps).
    round_steps: int = 0
    max_steps: int = 0
    copy_round_steps: int = 0
    copy_max_steps: int = 0
    target_accuracy: float = 0.99
    warmup_steps: int = 100
    # Train until solved: the learning rates each architecture tries in order, a run from scratch at
    # the next one after a run that reached the cap unsolved (empty: lr only).
    lrs: tuple[float, ...] = ()
    # False: no training, the report from the cached rounds (a run whose next round is not cached
    # stays in progress; finished runs are still tested)
    train: bool = True
    # Per-task local windows (0: local_window); match_params False keeps one shape for every
    # architecture (the paper's convention) instead of resizing MLPs to Griffin's parameter count.
    copy_window: int = 0
    induction_window: int = 0
    match_params: bool = True
    test_examples: int = 0  # examples per accuracy at the test lengths (0: eval_examples)
    eval_tokens: int = 0  # at most this many tokens per evaluation batch (0: batch_size sequences)


BUDGETS = {
    "micro": CopyRetrievalSettings(width=32, num_heads=2, local_window=8, steps=4, batch_size=4, eval_every=2,
                                   eval_examples=8, copy_length=16, copy_tokens=3, induction_length=16,
                                   phonebook_entries=2, test_factors=(1, 2), seeds=(0, 1)),
    "small": CopyRetrievalSettings(),
    "medium": CopyRetrievalSettings(width=128, steps=2000, local_window=128, copy_length=128,
                                    induction_length=128, phonebook_entries=16),
    "large": CopyRetrievalSettings(width=512, depth=6, num_heads=4, steps=20000, batch_size=64, lr=1e-3,
                                   local_window=512, copy_length=1024, copy_tokens=16, induction_length=1024,
                                   phonebook_entries=64, phonebook_name_len=5, phonebook_digits=7),
    # The paper's synthetic setting (Section 6.2 and its appendix): 5 blocks of width 64, one shape for
    # every architecture; selective copying of 16 data tokens (vocabulary 16) hidden in 1024 tokens
    # with a local window of 512; induction heads over 256 tokens with a window of 128. The phonebook
    # is left out: the paper prompts pre-trained models with a phonebook, it does not train on one.
    # The step caps are sized for about an hour of one CPU core; raise them with --set (cached rounds
    # are kept: a round's result does not depend on the cap).
    "paper": CopyRetrievalSettings(tasks=("induction_heads", "selective_copying"), width=64, depth=5,
                                   num_heads=2, batch_size=32, lr=3e-3, eval_examples=256, test_examples=128,
                                   copy_length=1024, copy_tokens=16, induction_length=256, vocab=16,
                                   copy_window=512, induction_window=128, match_params=False,
                                   round_steps=100, max_steps=1200, copy_round_steps=50, copy_max_steps=50,
                                   warmup_steps=100, eval_tokens=32768, test_factors=(1, 2, 4, 8), seeds=(0,),
                                   lrs=(3e-3, 1e-3)),
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


def chance_rates(s: CopyRetrievalSettings, task: str) -> dict[str, float]:
    """The accuracy of a model that knows the task's format but not the answer (a fraction): the
    copy tasks' answers are uniform over `vocab` data tokens (1/vocab per token); the phonebook's
    are uniform digits then a newline, so knowing the format gives (digits / 10 + 1) / (digits + 1)
    per answer token. "token": per answer token; "exact": the whole answer."""
    if task == "selective_copying":
        return {"token": 1.0 / s.vocab, "exact": (1.0 / s.vocab) ** s.copy_tokens}
    if task == "induction_heads":
        return {"token": 1.0 / s.vocab, "exact": 1.0 / s.vocab}
    if task == "phonebook":
        d = s.phonebook_digits
        return {"token": (d / 10 + 1) / (d + 1), "exact": 0.1 ** d}
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
    if s.round_steps:  # train until solved (the paper budget): its own module and report
        from .copy_paper import run_until_solved
        return run_until_solved(ctx, s, f"{NAME}-{budget}" if budget == "paper" else NAME)
    vocab = 259  # the byte vocabulary: the phonebook needs it, and every run keeps the same embedding
    configs = matched_archs(s.archs, s.width, s.depth, s.num_heads, s.local_window, vocab_size=vocab)
    every = s.eval_every or max(1, s.steps // 8)
    # results[task][arch]: one run per seed, in the order of s.seeds
    results: dict[str, dict[str, list[dict]]] = {t: {a: [] for a in s.archs} for t in s.tasks}
    for seed in s.seeds:
        spec = study_settings(s.steps, s.batch_size, s.lr, seed)
        for task_name in s.tasks:
            train_task = make_task(task_name, **task_settings(s, task_name))
            tests = {f: make_task(task_name, **task_settings(s, task_name, f)) for f in s.test_factors}
            for arch in s.archs:
                cfg = configs[arch]
                key = {"study": NAME, "task": task_name, "task_settings": task_settings(s, task_name),
                       "arch": arch, "model": cfg.to_dict(), "train": run_key(spec), "eval_every": every,
                       "eval_examples": s.eval_examples,
                       "tests": {str(f): task_settings(s, task_name, f) for f in s.test_factors}}

                def compute(cfg=cfg, arch=arch, train_task=train_task, tests=tests, task_name=task_name,
                            spec=spec) -> dict:
                    ctx.log(f"{NAME}: {task_name} / {arch} seed {spec.seed}: {s.steps} steps of {s.batch_size} "
                            f"examples ({train_task.seq_len} tokens)")
                    sampler = SyntheticSampler(train_task, s.batch_size, spec.seed)

                    def probe(model) -> dict:
                        return task_accuracy(model, train_task, s.eval_examples, s.batch_size, spec.seed)
                    model, info = train_model(cfg, sampler.next_batch, spec, ctx.device, probe, every, ctx.log)
                    by_length = []
                    for f, t in tests.items():
                        acc = task_accuracy(model, t, s.eval_examples, s.batch_size, spec.seed)
                        by_length.append({"factor": f, "context": t.seq_len, **acc})
                    return {"params": info["params"], "train_seconds": info["train_seconds"],
                            "history": info["history"], "by_length": by_length}
                results[task_name][arch].append(
                    ctx.cache.run(f"{NAME}-{task_name}-{arch}-seed{seed}", key, compute))
    return _write(ctx, s, results)


def _iv(iv: Interval, digits: int = 3, sign: bool = False) -> str:
    f = f"+.{digits}f" if sign else f".{digits}f"
    return f"{iv.mean:{f}} [{iv.lo:{f}}, {iv.hi:{f}}]"


def _final(runs: list[dict], k: int, field: str = "token_accuracy") -> list[float]:
    """Per seed: the accuracy at test length index `k` after training."""
    return [r["by_length"][k][field] for r in runs]


def _write(ctx: StudyContext, s: CopyRetrievalSettings, results: dict[str, dict[str, list[dict]]]) -> dict:
    sections = []
    for task_name in s.tasks:
        res = results[task_name]
        chance = chance_rates(s, task_name)
        steps = [h["step"] for h in res[s.archs[0]][0]["history"]]
        rows = [[ARCH_LABELS[a], res[a][0]["params"],
                 *[float(np.mean([r["history"][i]["token_accuracy"] for r in res[a]])) for i in range(len(steps))],
                 _iv(mean_interval([_auc(r["history"]) for r in res[a]]))] for a in s.archs]
        t1 = md_table(["model", "params", *[f"step {x}" for x in steps], "mean over training (95% CI)"], rows)
        contexts = [r["context"] for r in res[s.archs[0]][0]["by_length"]]
        rows2 = [[ARCH_LABELS[a], *[_iv(mean_interval(_final(res[a], k))) for k in range(len(contexts))],
                  *[float(np.mean(_final(res[a], k, "exact_match"))) for k in range(len(contexts))]] for a in s.archs]
        rows2.append(["chance" if task_name != "phonebook" else "format only", *[chance["token"]] * len(contexts),
                      *[chance["exact"]] * len(contexts)])
        heads = [f"token acc @{c} ({f}x)" for c, f in zip(contexts, s.test_factors)]
        heads += [f"exact @{c} (mean)" for c in contexts]
        t2 = md_table(["model", *heads], rows2)
        sections.append(f"## {TASK_LABELS[task_name]} ({task_settings(s, task_name)})\n\n"
                        f"Answer-token accuracy on held-out examples during training (mean over seeds; last column: "
                        f"the mean over the evaluations, with its 95% interval over seeds; chance "
                        f"{chance['token']:.3f}):\n\n{t1}\n\n"
                        f"After training, by test context length in tokens (trained at {contexts[0]}; token accuracy "
                        f"as mean [95% interval] over seeds):\n\n{t2}")
    plot_ok = _plot(ctx.out, s, results)
    intro = (f"Each model (width {s.width}, depth {s.depth}, {s.num_heads} heads, Griffin local window "
             f"{s.local_window}; parameters matched through the MLP width) is trained {s.steps} steps of "
             f"{s.batch_size} examples per task (lr {s.lr}) for each seed of {list(s.seeds)} (the seed sets the "
             f"initialisation, the training examples and the held-out ones; runs of one seed are paired across "
             f"architectures); accuracy is greedy prediction of the answer tokens on {s.eval_examples} held-out "
             f"examples. Test contexts are the training context times {list(s.test_factors)}. Intervals: 95% "
             f"Student-t over the {len(s.seeds)} seeds (n - 1 degrees of freedom). Chance: the copy tasks' answer "
             f"tokens are uniform over {s.vocab} data tokens; the phonebook's format-only rate is that of a model "
             f"that writes the right format (digits, then a newline) with random digits. The phonebook task here "
             f"trains models from scratch on books; the paper's phonebook experiment prompts pre-trained models, "
             f"so it is not the paper's experiment.")
    data = {"settings": settings_dict(s), "chance": {t: chance_rates(s, t) for t in s.tasks}, "results": results}
    write_report(ctx.out, NAME, "Copying and retrieval", ctx.command, intro, sections, _verdicts(s, results),
                 data, plot_ok)
    return data


def _auc(history: list[dict]) -> float:
    """Mean accuracy over the training evaluations: how fast a task is learned."""
    return float(np.mean([h["token_accuracy"] for h in history]))


# The paper's learning-speed ordering (Section 6.2), as pairs (faster, slower).
SPEED_CLAIMS = (("transformer", "griffin"), ("transformer", "hawk"), ("griffin", "hawk"))


def _verdicts(s: CopyRetrievalSettings, results: dict[str, dict[str, list[dict]]]) -> list[str]:
    out = []
    n = len(s.seeds)
    for task_name in s.tasks:
        res = results[task_name]
        label = TASK_LABELS[task_name]
        chance = chance_rates(s, task_name)["token"]
        above = {a: paired_interval(_final(res[a], 0), [chance] * n) for a in s.archs}
        at1 = ", ".join(f"{ARCH_LABELS[a]} {_iv(mean_interval(_final(res[a], 0)))}" for a in s.archs)
        if task_name == "phonebook" and not any(iv.lo > 0 for iv in above.values()):
            out.append(f"{label}: accuracy at the training length {at1}, against the format-only rate {chance:.3f}: no "
                       f"model's 95% interval lies above it, so no model has learned to look numbers up and no "
                       f"comparison is reported (and this is not the paper's experiment: see above).")
            continue
        gaps = [(x, y, paired_interval([_auc(r["history"]) for r in res[x]], [_auc(r["history"]) for r in res[y]]))
                for x, y in SPEED_CLAIMS if x in s.archs and y in s.archs]
        calls = [verdict(g) for _, _, g in gaps]
        overall = ("agrees" if calls and all(c == "agrees" for c in calls) else
                   "disagrees" if "disagrees" in calls else "unresolved")
        parts = "; ".join(f"{ARCH_LABELS[x]} minus {ARCH_LABELS[y]} {_iv(g, sign=True)} ({verdict(g)})"
                          for x, y, g in gaps)
        out.append(f"{label}: learning speed (mean accuracy over the training evaluations), paired over {n} seeds: "
                   f"{parts}. Paper: Transformer fastest, Griffin close, Hawk slowest: **{overall}**. Accuracy at "
                   f"the training length (chance {chance:.3f}): {at1}.")
        if len(s.test_factors) > 1:
            far = len(s.test_factors) - 1
            ctx_len = res[s.archs[0]][0]["by_length"][far]["context"]
            accs = ", ".join(f"{ARCH_LABELS[a]} {_iv(mean_interval(_final(res[a], far)))}" for a in s.archs)
            line = (f"{label} at {s.test_factors[far]}x the training length ({ctx_len} tokens; chance {chance:.3f}): "
                    f"{accs}.")
            if task_name == "induction_heads" and "transformer" in s.archs:
                for a in s.archs:
                    if a != "transformer":
                        g = paired_interval(_final(res[a], far), _final(res["transformer"], far))
                        line += (f" {ARCH_LABELS[a]} minus Transformer {_iv(g, sign=True)}; paper: the recurrent "
                                 f"models extrapolate, the Transformer does not: **{verdict(g)}**.")
            if "griffin" in s.archs and ctx_len > s.local_window:
                line += (f" The longest test context is beyond Griffin's local window ({s.local_window}), so there "
                         f"only its recurrence can retrieve.")
            out.append(line)
    return out


def _band(values: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values[seed][point] -> mean, 95% lo, 95% hi per point (lo = hi = mean with one seed)."""
    ivs = [mean_interval([v[i] for v in values]) for i in range(len(values[0]))]
    mean = np.asarray([iv.mean for iv in ivs])
    lo = np.asarray([iv.lo if np.isfinite(iv.lo) else iv.mean for iv in ivs])
    hi = np.asarray([iv.hi if np.isfinite(iv.hi) else iv.mean for iv in ivs])
    return mean, lo, hi


def _plot(out: str, s: CopyRetrievalSettings, results: dict[str, dict[str, list[dict]]]) -> bool:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(s.tasks), figsize=(4.2 * len(s.tasks), 7), squeeze=False)
    for j, task_name in enumerate(s.tasks):
        res = results[task_name]
        for k, a in enumerate(s.archs):
            color = f"C{k}"
            steps = [x["step"] for x in res[a][0]["history"]]
            mean, lo, hi = _band([[x["token_accuracy"] for x in r["history"]] for r in res[a]])
            axes[0][j].plot(steps, mean, marker="o", ms=3, color=color, label=ARCH_LABELS[a])
            axes[0][j].fill_between(steps, lo, hi, color=color, alpha=0.2)
            ctxs = [x["context"] for x in res[a][0]["by_length"]]
            mean, lo, hi = _band([[x["token_accuracy"] for x in r["by_length"]] for r in res[a]])
            axes[1][j].plot(ctxs, mean, marker="o", ms=3, color=color, label=ARCH_LABELS[a])
            axes[1][j].fill_between(ctxs, lo, hi, color=color, alpha=0.2)
        chance = chance_rates(s, task_name)["token"]
        axes[0][j].set_title(TASK_LABELS[task_name])
        axes[0][j].set_xlabel("training step")
        axes[1][j].set_xlabel("test context (tokens)")
        axes[1][j].set_xscale("log", base=2)
        axes[1][j].axvline(res[s.archs[0]][0]["by_length"][0]["context"], color="gray", ls="--", lw=1)
        if "griffin" in s.archs:
            axes[1][j].axvline(s.local_window, color="tab:green", ls=":", lw=1)
        for ax in (axes[0][j], axes[1][j]):
            ax.axhline(chance, color="black", ls="-.", lw=0.8)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("answer-token accuracy")
    axes[1][0].set_ylabel("answer-token accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Copying and retrieval, mean over seeds {list(s.seeds)} with 95% t bands "
                 f"(dashed: training length; dotted: Griffin window; dash-dot: chance / format-only)")
    fig.tight_layout()
    fig.savefig(f"{out}/{NAME}.png", dpi=110)
    plt.close(fig)
    return True
