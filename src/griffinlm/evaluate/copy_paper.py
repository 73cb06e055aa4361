"""Copying and retrieval trained until solved (`griffinlm study copy-retrieval --budget paper`).

The paper's claims about selective copying and induction heads (Section 6.2) presuppose that the
Transformer solves each task at the training length. Here every architecture follows the same rule:
train in rounds (`rounds.train_rounds`, interleaved across architectures), evaluate greedy
answer-token accuracy at the training length after each round, stop once it reaches
`target_accuracy` or at the step cap; a run that reached the cap unsolved is followed by one from
scratch at the next learning rate of `lrs` (the ladder: one rule for every architecture, so that no
architecture fails for a learning rate it cannot learn at); then the run that solved the task (else
the last) is tested at longer contexts. Every round is in the run cache,
so an interrupted study resumes from its last round, and the report is rewritten after each round.
Accuracies are shown beside the chance rate 1/vocab. The phonebook is not part of the paper budget:
the paper prompts pre-trained models with a phonebook, a different experiment from training on one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..data import make_task
from ..model import LanguageModel
from .archs import ARCH_LABELS, arch_config, matched_archs
from .copy_retrieval import BUDGETS, NAME, TASK_LABELS, CopyRetrievalSettings, task_accuracy, task_settings
from .intervals import one_run_verdict
from .report import md_table, pyplot, write_report
from .rounds import RoundRun, RoundSpec, train_rounds
from .study import StudyContext, settings_dict


def task_value(s: CopyRetrievalSettings, task: str, name: str) -> Any:
    """A per-task setting: "window" is the task's own local window (else local_window); for
    "round_steps" and "max_steps", selective copying's copy_<name> when set."""
    if name == "window":
        own = {"selective_copying": s.copy_window, "induction_heads": s.induction_window}.get(task, 0)
        return own or s.local_window
    own = getattr(s, f"copy_{name}") if task == "selective_copying" else 0
    return own or getattr(s, name)


def first_seed(s: CopyRetrievalSettings) -> int:
    """The seed of the train-until-solved runs (one seed: the first of `seeds`)."""
    seeds = getattr(s, "seeds", None)
    return int(seeds[0]) if seeds else int(getattr(s, "seed", 0))


def eval_batch_size(s: CopyRetrievalSettings, seq_len: int) -> int:
    """Sequences per evaluation batch: batch_size, fewer where eval_tokens caps a batch's tokens."""
    if not s.eval_tokens:
        return s.batch_size
    return max(1, min(s.batch_size, s.eval_tokens // seq_len))


def task_configs(s: CopyRetrievalSettings, task_name: str, task) -> dict[str, Any]:
    """Each architecture's model for `task` (a task object): the task's own vocabulary (259 bytes
    for the phonebook), its local window, one shape for every architecture unless match_params."""
    window = task_value(s, task_name, "window")
    if s.match_params:
        return matched_archs(s.archs, s.width, s.depth, s.num_heads, window, vocab_size=task.vocab_size)
    return {a: arch_config(a, s.width, s.depth, s.num_heads, window, vocab_size=task.vocab_size) for a in s.archs}


def run_until_solved(ctx: StudyContext, s: CopyRetrievalSettings, report_name: str) -> dict:
    """Per task, every architecture trained in rounds until it reaches target_accuracy at the
    training length or its step cap, then tested at the longer lengths; writes `report_name`.md/.png/.json."""
    seed = first_seed(s)
    results: dict[str, dict[str, dict]] = {}
    for task_name in s.tasks:
        train_task = make_task(task_name, **task_settings(s, task_name))
        tests = {f: make_task(task_name, **task_settings(s, task_name, f)) for f in s.test_factors}
        configs = task_configs(s, task_name, train_task)
        params = {a: LanguageModel(c).param_count() for a, c in configs.items()}
        eval_bs = eval_batch_size(s, train_task.seq_len)
        ladder = lrs(s)

        def batch_fn(i: int, task=train_task) -> Any:
            return task.sample(s.batch_size, np.random.default_rng([seed, i]))

        def eval_fn(model, task=train_task) -> dict:
            return task_accuracy(model, task, s.eval_examples, eval_bs, seed)

        def make_run(arch: str, rung: int, task_name=task_name, configs=configs) -> RoundRun:
            spec = RoundSpec(round_steps=task_value(s, task_name, "round_steps"),
                             max_steps=task_value(s, task_name, "max_steps"), target=s.target_accuracy,
                             batch_size=s.batch_size, lr=ladder[rung], warmup_steps=s.warmup_steps, seed=seed)
            key = {"study": NAME, "mode": "until-solved", "task": task_name,
                   "task_settings": task_settings(s, task_name), "arch": arch, "model": configs[arch].to_dict(),
                   "eval_examples": s.eval_examples, "eval_batch": eval_bs}
            name = f"{NAME}-{task_name}-{arch}" + (f"-lr{ladder[rung]:g}" if rung else "")
            return RoundRun(name, key, configs[arch], spec, batch_fn, eval_fn)

        ctx.log(f"{NAME}: {task_name} ({train_task.seq_len} tokens): rounds of "
                f"{task_value(s, task_name, 'round_steps')} steps of {s.batch_size} examples until accuracy >= "
                f"{s.target_accuracy} or {task_value(s, task_name, 'max_steps')} steps, at lr {list(ladder)} in turn")
        attempts: dict[str, list[RoundRun]] = {a: [] for a in s.archs}
        runs = [make_run(a, 0) for a in s.archs]
        while runs:
            for run in runs:
                attempts[run.key["arch"]].append(run)

            def progress(task_name=task_name) -> None:
                results[task_name] = {a: _run_record(tried, params, None) for a, tried in attempts.items()}
                _write(ctx, s, results, report_name)
            train_rounds(runs, ctx.cache, ctx.device, ctx.log, progress, train=s.train)
            unsolved = [r for r in runs if r.stopped == "cap" and len(attempts[r.key["arch"]]) < len(ladder)]
            for r in unsolved:
                r.model = r.optimizer = None  # superseded by the run at the next learning rate
            runs = [make_run(r.key["arch"], len(attempts[r.key["arch"]])) for r in unsolved]
        results[task_name] = {}
        for arch, tried in attempts.items():
            run = tried[-1]
            if not run.stopped:  # not trained to its end (train=False)
                results[task_name][arch] = _run_record(tried, params, None)
                continue
            spec = run.spec
            test_bs = {f: eval_batch_size(s, t.seq_len) for f, t in tests.items()}
            test_n = s.test_examples or s.eval_examples
            key = {**run.key, "rounds": spec.key(), "final_step": run.step, "test_examples": test_n,
                   "tests": {str(f): [task_settings(s, task_name, f), test_bs[f]] for f in s.test_factors}}

            def compute(run=run) -> dict:
                ctx.log(f"{NAME}: {run.name} after {run.step} steps: testing at {list(tests)}x")
                model = run.final_model(ctx.cache, ctx.device)
                return {"by_length": [{"factor": f, "context": t.seq_len,
                                       **task_accuracy(model, t, test_n, test_bs[f], seed)}
                                      for f, t in tests.items()]}
            tested = ctx.cache.run(f"{run.name}-tests", key, compute)
            results[task_name][arch] = _run_record(tried, params, tested["by_length"])
            run.model = run.optimizer = None  # free the memory before the next task
        _write(ctx, s, results, report_name)
    return _write(ctx, s, results, report_name)


def lrs(s: CopyRetrievalSettings) -> tuple[float, ...]:
    """The learning rates an architecture tries in turn (`lrs`, else just `lr`)."""
    return tuple(s.lrs) or (s.lr,)


def _run_record(tried: list[RoundRun], params: dict[str, int], by_length: list[dict] | None) -> dict:
    """One architecture's runs at a task, the last (the one that solved it, or the last tried) in
    full, the earlier ones as one line each in `attempts`."""
    run = tried[-1]
    return {"params": params[run.key["arch"]], "lr": run.spec.lr, "history": run.history, "steps": run.step,
            "stopped": run.stopped or "in progress", "solved": run.solved, "by_length": by_length,
            "attempts": [{"lr": r.spec.lr, "steps": r.step, "stopped": r.stopped or "in progress",
                          "token_accuracy": r.history[-1]["token_accuracy"] if r.history else None}
                         for r in tried[:-1]]}


def _write(ctx: StudyContext, s: CopyRetrievalSettings, results: dict[str, dict[str, dict]],
           report_name: str) -> dict:
    chance = 1.0 / s.vocab
    sections, verdicts = [], []
    for task_name in s.tasks:
        if task_name not in results:
            sections.append(f"## {TASK_LABELS[task_name]} ({task_settings(s, task_name)})\n\nNot started.")
            continue
        res = results[task_name]
        archs = [a for a in s.archs if a in res]
        train_len = make_task(task_name, **task_settings(s, task_name)).seq_len
        cap = task_value(s, task_name, "max_steps")
        summary = [[ARCH_LABELS[a], res[a]["params"], res[a]["lr"], res[a]["steps"], res[a]["stopped"],
                    res[a]["history"][-1]["token_accuracy"] if res[a]["history"] else None,
                    res[a]["history"][-1]["exact_match"] if res[a]["history"] else None, chance,
                    "; ".join(f"lr {t['lr']:g}: {t['steps']} steps, {t['stopped']}, accuracy "
                              f"{t['token_accuracy']:.3f}" for t in res[a]["attempts"]) or "none"] for a in archs]
        t0 = md_table(["model", "params", "lr", "steps trained", "stopped", f"token acc @{train_len}",
                       f"exact @{train_len}", "chance (1/vocab)", "earlier runs (higher lr)"], summary)
        steps = sorted({h["step"] for a in archs for h in res[a]["history"]})
        by_step = {a: {h["step"]: h["token_accuracy"] for h in res[a]["history"]} for a in archs}
        t1 = md_table(["step", *[ARCH_LABELS[a] for a in archs]],
                      [[x, *[by_step[a].get(x) for a in archs]] for x in steps])
        text = (f"## {TASK_LABELS[task_name]} ({task_settings(s, task_name)}, local window "
                f"{task_value(s, task_name, 'window')})\n\nTraining at {train_len} tokens, rounds of "
                f"{task_value(s, task_name, 'round_steps')} steps until token accuracy >= {s.target_accuracy} "
                f"or {cap} steps:\n\n{t0}\n\nAnswer-token accuracy at the training length after each round "
                f"(a dash: that model had stopped):\n\n{t1}")
        tested = [a for a in archs if res[a]["by_length"]]
        if tested:
            contexts = [r["context"] for r in res[tested[0]]["by_length"]]
            rows = [[ARCH_LABELS[a], *[r["token_accuracy"] for r in res[a]["by_length"]], chance,
                     *[r["exact_match"] for r in res[a]["by_length"]]] for a in tested]
            heads = [f"token acc @{c} ({f}x)" for c, f in zip(contexts, s.test_factors)] + ["chance"]
            heads += [f"exact @{c}" for c in contexts]
            text += (f"\n\nAfter training, by test context length in tokens ({s.test_examples or s.eval_examples} "
                     f"held-out examples each):\n\n{md_table(['model', *heads], rows)}")
        untested = [ARCH_LABELS[a] for a in archs if a not in tested]
        if untested:
            text += (f"\n\nNot yet tested beyond the training length: {', '.join(untested)} (training has not "
                     f"finished).")
        sections.append(text)
        verdicts.extend(_verdicts(s, task_name, res, train_len, cap, chance))
    caps = ", ".join(f"{TASK_LABELS[t]} {task_value(s, t, 'max_steps')}" for t in s.tasks)
    default_caps = ", ".join(f"{TASK_LABELS[t]} {task_value(BUDGETS['paper'], t, 'max_steps')}" for t in s.tasks)
    intro = (f"The paper's synthetic setting: every architecture has {s.depth} blocks of width {s.width} "
             f"({s.num_heads} heads, MLP expansion 3, each architecture's own block pattern; "
             f"{'parameters matched through the MLP width' if s.match_params else 'one shape for all, as in the paper'}"
             f"), trained with batches of {s.batch_size} examples, AdamW (linear warmup over {s.warmup_steps} "
             f"steps, then constant), seed {first_seed(s)}. Every architecture follows the same rule: train in "
             f"rounds at lr {lrs(s)[0]:g}, evaluate greedy answer-token accuracy at the training length on "
             f"{s.eval_examples} held-out examples after each round, stop once it reaches {s.target_accuracy} "
             f"or at the step cap; a run that reaches the cap unsolved is followed by one from scratch at the "
             f"next learning rate of {list(lrs(s))}; the run that solved the task (else the last) is then "
             f"tested at the training context times {list(s.test_factors)}. The step "
             f"caps of this run: {caps} (the budget's own, {default_caps}, are about an hour of one CPU core); "
             f"a round's result does not depend on the cap, so "
             f"`--set max_steps=N copy_max_steps=N` continues from the cached rounds. Chance is "
             f"1/vocab = {chance:.4f} per answer token. The paper's claims about these tasks presuppose that "
             f"the Transformer solves each task at the training length; where it did not, the comparison is "
             f"unresolved. Selective copying's length counts the noise and data tokens before the separator "
             f"(the {s.copy_tokens} answer tokens follow it); induction heads' counts the tokens before the "
             f"final trigger. The phonebook task is not part of this budget: the paper prompts pre-trained "
             f"models with a phonebook, while the small budget trains models from scratch on one, which is a "
             f"different experiment.")
    data = {"settings": settings_dict(s), "results": results, "report": f"{ctx.out}/{report_name}.md"}
    plot_ok = _plot(ctx.out, s, results, report_name)
    write_report(ctx.out, report_name, "Copying and retrieval at the paper's setting", ctx.command, intro,
                 sections, verdicts, data, plot_ok)
    return data


def _verdicts(s: CopyRetrievalSettings, task_name: str, res: dict[str, dict], train_len: int,
              cap: int, chance: float) -> list[str]:
    label = TASK_LABELS[task_name]
    archs = [a for a in s.archs if a in res]
    done = all(res[a]["stopped"] in ("solved", "cap") for a in archs)
    steps = ", ".join(f"{ARCH_LABELS[a]} {res[a]['steps']} steps at lr {res[a]['lr']:g} "
                      f"({res[a]['stopped']}, accuracy {res[a]['history'][-1]['token_accuracy']:.3f})"
                      for a in archs if res[a]["history"])
    out = [f"{label}: {steps}; chance {chance:.4f}."]
    if "transformer" not in res:
        return out
    tr = res["transformer"]
    if not tr["solved"]:
        state = "within the cap" if done else "so far (training was interrupted or is still running)"
        acc = tr["history"][-1]["token_accuracy"] if tr["history"] else float("nan")
        out.append(f"{label}: the Transformer did **not** solve the task at the training length ({train_len} "
                   f"tokens) {state}: {tr['steps']} steps, accuracy {acc:.3f}. The paper's precondition is "
                   f"not met, so every comparison on this task is **unresolved**.")
        return out
    solve_step = {a: (res[a]["steps"] if res[a]["solved"] else None) for a in archs}
    out.append(f"{label}: the Transformer solved the task at the training length ({train_len} tokens) after "
               f"{tr['steps']} steps (accuracy {tr['history'][-1]['token_accuracy']:.3f}): the paper's "
               f"precondition is met.")
    if done and len({res[a]["lr"] for a in archs}) > 1:
        shown = ", ".join(f"{ARCH_LABELS[a]} lr {res[a]['lr']:g}" for a in archs)
        out.append(f"{label}: the models were trained at different learning rates ({shown}), so their steps to "
                   f"solve do not compare. Paper: Transformer fastest, Griffin close, Hawk slowest: "
                   f"**unresolved**.")
    elif done:
        order = sorted(archs, key=lambda a: solve_step[a] if solve_step[a] is not None else cap + 1)
        claim = [a for a in ("transformer", "griffin", "hawk") if a in archs]
        shown = ", ".join(f"{ARCH_LABELS[a]} {solve_step[a] if solve_step[a] is not None else f'> {cap}'}"
                          for a in order)
        out.append(f"{label}: steps to solve {shown}. Paper: Transformer fastest, Griffin close, Hawk "
                   f"slowest: {one_run_verdict(order == claim)}; steps are resolved only to the round size "
                   f"({task_value(s, task_name, 'round_steps')}).")
    if archs and all(res[a]["by_length"] for a in archs) and len(s.test_factors) > 1:
        longest = {a: res[a]["by_length"][-1]["token_accuracy"] for a in archs}
        ctx_len = res[archs[0]]["by_length"][-1]["context"]
        parts = ", ".join(f"{ARCH_LABELS[a]} {longest[a]:.3f}" for a in archs)
        rec = [a for a in ("hawk", "griffin") if a in archs]
        agrees = bool(rec) and all(longest[a] > longest["transformer"] for a in rec)
        out.append(f"{label}: accuracy at {s.test_factors[-1]}x the training length ({ctx_len} tokens): {parts} "
                   f"(chance {chance:.4f}). Paper: the Transformer does not extrapolate past its training "
                   f"length while the recurrent models do: {one_run_verdict(agrees)}.")
    return out


def _plot(out: str, s: CopyRetrievalSettings, results: dict[str, dict[str, dict]], report_name: str) -> bool:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(s.tasks), figsize=(4.6 * len(s.tasks), 7), squeeze=False)
    for j, task_name in enumerate(s.tasks):
        res = results.get(task_name, {})
        axes[0][j].set_title(TASK_LABELS[task_name])
        for a in s.archs:
            if a not in res:
                continue
            h = res[a]["history"]
            axes[0][j].plot([x["step"] for x in h], [x["token_accuracy"] for x in h], marker="o", ms=3,
                            label=ARCH_LABELS[a])
            if res[a]["by_length"]:
                r = res[a]["by_length"]
                axes[1][j].plot([x["context"] for x in r], [x["token_accuracy"] for x in r], marker="o", ms=3,
                                label=ARCH_LABELS[a])
        axes[0][j].axhline(s.target_accuracy, color="gray", ls="--", lw=1)
        axes[0][j].set_xlabel("training step")
        axes[1][j].set_xlabel("test context (tokens)")
        axes[1][j].set_xscale("log", base=2)
        axes[1][j].axvline(make_task(task_name, **task_settings(s, task_name)).seq_len, color="gray", ls="--", lw=1)
        if "griffin" in s.archs:
            axes[1][j].axvline(task_value(s, task_name, "window"), color="tab:green", ls=":", lw=1)
        for ax in (axes[0][j], axes[1][j]):
            ax.axhline(1.0 / s.vocab, color="black", ls=":", lw=1)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("answer-token accuracy (training length)")
    axes[1][0].set_ylabel("answer-token accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Copying and retrieval, trained until solved (dashed: target / training length; "
                 "dotted: chance, Griffin window)", fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{out}/{report_name}.png", dpi=110)
    plt.close(fig)
    return True
