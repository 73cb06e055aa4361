"""Study 5, downstream multiple choice: log-likelihood scoring of tasks in local JSONL files.

Each line: {"question": str, "choices": [str, ...], "answer": int (index) or str (the right choice)},
optionally "context" (a passage shown before the question). Every choice is scored by the
log-probability of " " + choice after the prompt "{context}\\n{question}\\nAnswer:". Reported:
accuracy by total log-likelihood (acc), and by log-likelihood per byte of the choice (acc_norm,
which does not favour short answers), against the chance rate 1 / choices.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..data import Tokenizer
from ..model import LanguageModel
from .report import md_table, pyplot, write_report
from .scoring import continuation_logprobs
from .study import StudyContext

NAME = "multiple-choice"


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int
    context: str = ""

    def prompt(self) -> str:
        return (f"{self.context}\n" if self.context else "") + f"{self.question}\nAnswer:"


def load_questions(path: str) -> list[Question]:
    """Questions of a JSONL file; raises ValueError naming the line of a malformed record."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                choices = tuple(str(c) for c in rec["choices"])
                answer = rec["answer"]
                if isinstance(answer, str) and not answer.lstrip("-").isdigit():
                    answer = choices.index(answer)  # the answer given as the text of a choice
                answer = int(answer)
                if len(choices) < 2 or not 0 <= answer < len(choices):
                    raise ValueError(f"need >= 2 choices and 0 <= answer < {len(choices)}")
                out.append(Question(str(rec["question"]), choices, answer, str(rec.get("context", ""))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: bad multiple-choice record ({e}); expected "
                                 '{"question": ..., "choices": [...], "answer": index or choice}') from None
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def score_questions(model: LanguageModel, tok: Tokenizer, questions: list[Question], batch_size: int = 16,
                    max_length: int | None = None) -> dict[str, Any]:
    """acc, acc_norm, chance and per-question choices' log-likelihoods."""
    requests, owners = [], []
    for qi, q in enumerate(questions):
        ctx_ids = [tok.bos_id] + [int(t) for t in tok.encode(q.prompt())]
        for choice in q.choices:
            requests.append((ctx_ids, [int(t) for t in tok.encode(" " + choice)]))
            owners.append(qi)
    scores = continuation_logprobs(model, requests, batch_size, max_length)
    per_q: list[list[float]] = [[] for _ in questions]
    for qi, (lp, _) in zip(owners, scores):
        per_q[qi].append(lp)
    correct = correct_norm = 0
    chance = 0.0
    for q, lps in zip(questions, per_q):
        norm = [lp / max(1, len((" " + c).encode("utf-8"))) for lp, c in zip(lps, q.choices)]
        correct += int(max(range(len(lps)), key=lps.__getitem__) == q.answer)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == q.answer)
        chance += 1.0 / len(q.choices)
    n = len(questions)
    return {"questions": n, "acc": correct / n, "acc_norm": correct_norm / n, "chance": chance / n,
            "loglikelihoods": per_q}


def run_multiple_choice(ctx: StudyContext, model: LanguageModel, tok: Tokenizer, task_files: list[str],
                        model_name: str, batch_size: int = 16) -> dict:
    """Scores every task file (cached by model identity and file content) and writes
    multiple-choice.md/.png/.json."""
    results = {}
    fingerprint = _model_fingerprint(model)
    for path in task_files:
        questions = load_questions(path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        key = {"study": NAME, "model": fingerprint, "task_sha256": digest, "tokenizer": tok.to_dict()}
        name = os.path.splitext(os.path.basename(path))[0]

        def compute(questions=questions, name=name) -> dict:
            ctx.log(f"{NAME}: scoring {len(questions)} questions of {name}")
            with torch.no_grad():
                return score_questions(model, tok, questions, batch_size, model.config.max_position)
        results[name] = ctx.cache.run(f"{NAME}-{name}", key, compute)
    rows = [[name, r["questions"], r["acc"], r["acc_norm"], r["chance"]] for name, r in results.items()]
    table = md_table(["task", "questions", "acc", "acc_norm", "chance"], rows)
    plot_ok = _plot(ctx.out, results, model_name)
    intro = (f"Model: {model_name} ({model.param_count():,} non-embedding parameters). Each choice is scored by "
             f"log p(' ' + choice | prompt); acc picks the highest total log-likelihood, acc_norm the highest "
             f"per byte of the choice.")
    verdicts = [f"{name}: acc {r['acc']:.3f} vs chance {r['chance']:.3f} "
                f"({'above' if r['acc'] > r['chance'] else 'not above'} chance)." for name, r in results.items()]
    data = {"model": model_name, "results": {k: {x: v for x, v in r.items() if x != "loglikelihoods"}
                                             for k, r in results.items()}}
    write_report(ctx.out, NAME, "Multiple choice", ctx.command, intro, [f"## Accuracy\n\n{table}"], verdicts,
                 data, plot_ok)
    return data


def _model_fingerprint(model: LanguageModel) -> dict[str, Any]:
    """The config and a checksum of the weights (so a retrained model is not served stale scores)."""
    total = 0.0
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            total += float(p.double().sum()) * (i + 1) + float(p.double().abs().sum())
    return {"config": model.config.to_dict(), "weights": f"{total:.10e}" if math.isfinite(total) else "nan"}


def _plot(out: str, results: dict[str, dict], model_name: str) -> bool:
    plt = pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [results[n]["acc"] for n in names], width=0.4, label="acc")
    ax.bar([x + 0.2 for x in xs], [results[n]["acc_norm"] for n in names], width=0.4, label="acc_norm")
    ax.scatter(list(xs), [results[n]["chance"] for n in names], color="k", marker="_", s=400, label="chance")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Multiple choice: {model_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}/{NAME}.png", dpi=120)
    plt.close(fig)
    return True
