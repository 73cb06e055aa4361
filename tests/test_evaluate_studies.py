"""Each study end to end on the micro budget: report, plot and JSON written, every table complete
with finite numbers, and a re-run served entirely from the run cache."""
import json
import math
import os
import random

import pytest
import torch

from griffinlm.cli import main
from griffinlm.evaluate.cli import set_threads
from griffinlm.evaluate.report import parse_md_tables
from griffinlm.evaluate.study import StudyContext

STUDIES = ("extrapolation", "copy-retrieval", "glu-variants", "scaling")
# Columns that may legitimately hold no number (the paper has no value for learned-beta variants).
OPTIONAL = {"paper log-ppl (65k steps)"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread and one numba thread (a parallel scan pool fights for cores)."""
    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus of long-ish documents, and a private corpus cache."""
    root = tmp_path_factory.mktemp("evalcorpus")
    rng = random.Random(0)
    words = "def return self value import class for while lambda yield none true false data".split()
    for i in range(10):
        lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(60)]
        (root / f"doc{i}.txt").write_text("\n".join(lines))
    old = os.environ.get("GRIFFINLM_CACHE")
    os.environ["GRIFFINLM_CACHE"] = str(root / "cache")
    yield str(root)
    if old is None:
        os.environ.pop("GRIFFINLM_CACHE", None)
    else:
        os.environ["GRIFFINLM_CACHE"] = old


def _number(cell: str) -> float:
    return float(cell.replace(",", "").replace("%", ""))


def _numbers(cell: str) -> list[float]:
    """A cell's numbers: one, or "mean [lo, hi]" (an interval)."""
    if "[" in cell:
        mean, rest = cell.split("[", 1)
        return [_number(mean)] + [_number(x) for x in rest.rstrip("]").split(", ")]
    return [_number(cell.split(",")[0] if ", " in cell else cell)]


def check_report(out: str, name: str) -> list[list[list[str]]]:
    """The report exists with its plot; every table is rectangular and its numeric cells finite."""
    md = os.path.join(out, f"{name}.md")
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 1000
    text = open(md).read()
    assert f"![{name}]({name}.png)" in text and "griffinlm study" in text and "## Miniature vs paper" in text
    tables = parse_md_tables(text)
    assert tables
    for table in tables:
        header = table[0]
        assert len(table) > 1
        for row in table[1:]:
            assert len(row) == len(header)
            for head, cell in zip(header[1:], row[1:]):
                if cell == "-":
                    assert head in OPTIONAL, f"{name}: empty cell under {head!r}"
                    continue
                if cell in ("yes", "no", "gated", "ungated") or any(c.isalpha() and c != "e" for c in cell):
                    continue
                assert all(map(math.isfinite, _numbers(cell))), f"{name}: {head}={cell}"
    data = json.load(open(os.path.join(out, f"{name}.json")))
    assert data
    return tables


@pytest.mark.parametrize("name", STUDIES)
def test_study_micro_end_to_end(name, corpus, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["study", name, "--budget", "micro", "--out", out, "--quiet"]
    if name != "copy-retrieval":  # the synthetic tasks need no corpus
        args += ["--set", f"data={corpus}"]
    assert main(args) == 0
    tables = check_report(out, name)
    if name == "extrapolation":
        assert [r[0] for r in tables[0][1:]] == ["Transformer (MQA, global)", "Hawk", "Griffin"]
        # the paired difference past T_train, up to 4x T_train on micro, with its verdict
        assert tables[0][0][2:] == ["[16, 32)", "[32, 64)", "all positions >= 16", "verdict (last bucket)"]
        assert all(r[-1] in ("agrees", "disagrees", "unresolved") for r in tables[0][1:])
    if name == "copy-retrieval":
        assert len(tables) == 6  # per task: accuracy vs step and vs test length
    if name == "glu-variants":
        assert len(tables[0]) == 1 + 10  # every variant, learned betas included
        assert tables[1][0] == ["FFN", "seed", "beta per layer"]
    if name == "scaling":
        assert len(tables[0]) == 1 + 3 * 2 * 2 and len(tables[1]) == 1 + 3
    runs = os.listdir(os.path.join(out, "runs"))
    # a second invocation computes nothing: every run comes from the cache
    before = {f: os.path.getmtime(os.path.join(out, "runs", f)) for f in runs}
    capsys.readouterr()
    assert main(args) == 0
    assert {f: os.path.getmtime(os.path.join(out, "runs", f)) for f in runs} == before


def test_study_resumes_after_partial_run(corpus, tmp_path):
    """Runs of a killed study are kept; the next invocation computes only the missing ones."""
    from griffinlm.evaluate.glu_variants import run_glu_variants
    ctx = StudyContext(str(tmp_path), quiet=True)
    run_glu_variants(ctx, "micro", {"data": corpus, "variants": ["relu", "swiglu"], "seeds": [0]})
    assert ctx.cache.misses == 2
    ctx = StudyContext(str(tmp_path), quiet=True)
    run_glu_variants(ctx, "micro", {"data": corpus, "variants": ["relu", "swiglu", "geglu"], "seeds": [0]})
    assert (ctx.cache.hits, ctx.cache.misses) == (2, 1)


def test_multiple_choice_cli(tmp_path, capsys):
    tasks = tmp_path / "toy.jsonl"
    tasks.write_text("".join(json.dumps({"question": f"Pick {i}", "choices": ["yes", "no", "maybe"], "answer": i % 3})
                             + "\n" for i in range(4)))
    out = str(tmp_path / "mc")
    assert main(["study", "multiple-choice", "--model", "hawk-tiny", "--tasks", str(tasks), "--out", out,
                 "--quiet"]) == 0
    assert "acc" in capsys.readouterr().out
    (table,) = check_report(out, "multiple-choice")
    assert table[1][0] == "toy" and table[1][1] == "4"
    assert main(["study", "multiple-choice", "--tasks", str(tasks), "--out", out]) == 2  # no model given


def test_unknown_setting_is_a_clear_error(tmp_path, capsys):
    assert main(["study", "scaling", "--budget", "micro", "--out", str(tmp_path), "--set", "widht=3"]) == 2
    assert "unknown setting" in capsys.readouterr().err


def _until_solved(tmp_path, **overrides):
    """The copy-retrieval study in its train-until-solved mode on micro sizes (induction heads only)."""
    from griffinlm.evaluate.copy_retrieval import run_copy_retrieval
    ctx = StudyContext(str(tmp_path), command="griffinlm study copy-retrieval --budget micro", quiet=True)
    settings = {"tasks": ["induction_heads"], "round_steps": 2, "max_steps": 6, "match_params": False,
                "warmup_steps": 2, **overrides}
    return ctx, run_copy_retrieval(ctx, "micro", settings)


def test_copy_retrieval_until_solved_stops_at_target_or_cap(tmp_path):
    """Every architecture stops after the first round that reaches the target, else at the step cap;
    each round is cached, and raising the cap resumes from the cached rounds."""
    ctx, data = _until_solved(tmp_path / "solved", target_accuracy=0.0)
    res = data["results"]["induction_heads"]
    assert all(r["stopped"] == "solved" and r["steps"] == 2 and len(r["history"]) == 1 for r in res.values())
    check_report(str(tmp_path / "solved"), "copy-retrieval")

    out = tmp_path / "cap"
    ctx, data = _until_solved(out, target_accuracy=1.01)
    res = data["results"]["induction_heads"]
    assert all(r["stopped"] == "cap" and [h["step"] for h in r["history"]] == [2, 4, 6] for r in res.values())
    assert all(len(r["by_length"]) == 2 for r in res.values())  # tested at 1x and 2x after training
    text = open(out / "copy-retrieval.md").read()
    assert "precondition is not met" in text and "**unresolved**" in text and "chance" in text
    assert ctx.cache.misses == 3 * (3 + 1)  # three rounds and the tests per architecture
    # only the last round's state is kept; a higher cap trains one more round from it
    assert len([f for f in os.listdir(out / "runs") if f.endswith(".pt")]) == 3
    ctx, data = _until_solved(out, target_accuracy=1.01, max_steps=8)
    assert (ctx.cache.hits, ctx.cache.misses) == (3 * 3, 3 * 2)
    assert all(r["steps"] == 8 for r in data["results"]["induction_heads"].values())


def test_copy_retrieval_until_solved_tries_the_next_learning_rate(tmp_path):
    """With a ladder of learning rates, a run that reaches the cap unsolved is followed by one from
    scratch at the next rate; the report gives each model's rate and earlier runs, and models
    trained at different rates are not ranked by steps to solve."""
    ctx, data = _until_solved(tmp_path / "solved", target_accuracy=0.0, lrs=[0.01, 0.001])
    res = data["results"]["induction_heads"]
    assert all(r["solved"] and r["lr"] == 0.01 and r["attempts"] == [] for r in res.values())

    out = tmp_path / "ladder"
    ctx, data = _until_solved(out, target_accuracy=1.01, max_steps=4, lrs=[0.01, 0.001])
    res = data["results"]["induction_heads"]
    for r in res.values():
        assert r["stopped"] == "cap" and r["lr"] == 0.001 and r["steps"] == 4 and len(r["history"]) == 2
        assert [(a["lr"], a["steps"], a["stopped"]) for a in r["attempts"]] == [(0.01, 4, "cap")]
        assert len(r["by_length"]) == 2  # the last run is the one tested
    assert ctx.cache.misses == 3 * (2 * 2 + 1)
    text = open(out / "copy-retrieval.md").read()
    assert "lr 0.01: 4 steps, cap" in text and "[0.01, 0.001]" in text
    # the first rung's rounds are those of a run without a ladder (the same cache entries); only
    # its tests are new (the ladder tested the last run)
    ctx, data = _until_solved(out, target_accuracy=1.01, max_steps=4, lr=0.01)
    assert ctx.cache.misses == 3


def test_copy_retrieval_report_from_the_cache_without_training(tmp_path):
    """train=False renders an interrupted study from its cached rounds: nothing is trained, a run
    whose next round is not cached stays in progress (untested, no next learning rate), and
    finished runs are reported as before."""
    out = tmp_path / "study"
    _until_solved(out, target_accuracy=1.01, max_steps=4)
    ctx, data = _until_solved(out, target_accuracy=1.01, max_steps=8, lrs=[0.003, 0.001], train=False)
    assert ctx.cache.misses == 0
    for r in data["results"]["induction_heads"].values():
        assert r["stopped"] == "in progress" and r["steps"] == 4 and r["by_length"] is None and r["attempts"] == []
    assert "Not yet tested beyond the training length" in open(out / "copy-retrieval.md").read()
    ctx, data = _until_solved(out, target_accuracy=1.01, max_steps=4, train=False)
    assert all(r["stopped"] == "cap" and r["by_length"] for r in data["results"]["induction_heads"].values())


def test_copy_retrieval_steps_to_solve_compare_only_at_one_learning_rate():
    from dataclasses import replace

    from griffinlm.evaluate.archs import ARCH_LABELS
    from griffinlm.evaluate.copy_paper import _verdicts
    from griffinlm.evaluate.copy_retrieval import BUDGETS
    s = replace(BUDGETS["paper"], tasks=("induction_heads",))

    def record(lr: float, steps: int) -> dict:
        return {"lr": lr, "steps": steps, "stopped": "solved", "solved": True, "by_length": None, "attempts": [],
                "history": [{"step": steps, "token_accuracy": 1.0, "exact_match": 1.0}]}
    same = {"transformer": record(3e-3, 300), "griffin": record(3e-3, 400), "hawk": record(3e-3, 900)}
    text = " ".join(_verdicts(s, "induction_heads", same, 257, 1200, 1 / 16))
    T, G, H = (ARCH_LABELS[a] for a in ("transformer", "griffin", "hawk"))
    assert f"steps to solve {T} 300, {G} 400, {H} 900" in text and "different learning" not in text
    mixed = {**same, "transformer": record(1e-3, 300)}
    text = " ".join(_verdicts(s, "induction_heads", mixed, 257, 1200, 1 / 16))
    assert f"different learning rates ({T} lr 0.001, {H} lr 0.003, {G} lr 0.003)" in text
    assert f"steps to solve {T}" not in text and "**unresolved**" in text


def test_copy_retrieval_resumed_rounds_match_uninterrupted(tmp_path):
    """A round trained from a stored state gives the numbers an uninterrupted run gives."""
    _, whole = _until_solved(tmp_path / "whole", target_accuracy=1.01, max_steps=4)
    _until_solved(tmp_path / "parts", target_accuracy=1.01, max_steps=2)
    _, parts = _until_solved(tmp_path / "parts", target_accuracy=1.01, max_steps=4)
    for arch, run in whole["results"]["induction_heads"].items():
        other = parts["results"]["induction_heads"][arch]["history"]
        for a, b in zip(run["history"], other):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
            assert a["token_accuracy"] == b["token_accuracy"]


def test_copy_retrieval_paper_budget_is_the_papers_setting():
    """--budget paper: vocabulary 16, selective copying of 16 tokens in 1024 with window 512, induction
    heads over 256 with window 128, 5 blocks of width 64 of each architecture's pattern, no phonebook;
    the small and micro budgets keep the fixed-step mode."""
    from griffinlm.data import make_task
    from griffinlm.evaluate.copy_paper import task_configs
    from griffinlm.evaluate.copy_retrieval import BUDGETS, task_settings
    s = BUDGETS["paper"]
    assert "phonebook" not in s.tasks and s.round_steps > 0 and s.target_accuracy == 0.99
    assert task_settings(s, "selective_copying") == {"length": 1024, "num_tokens": 16, "vocab": 16}
    assert task_settings(s, "induction_heads") == {"length": 256, "vocab": 16}
    assert BUDGETS["small"].round_steps == 0 and BUDGETS["micro"].round_steps == 0
    for task_name, window in (("selective_copying", 512), ("induction_heads", 128)):
        task = make_task(task_name, **task_settings(s, task_name))
        cfgs = task_configs(s, task_name, task)
        for arch, cfg in cfgs.items():
            assert (cfg.width, cfg.depth, cfg.vocab_size) == (64, 5, task.vocab_size)
            kinds = [k.value for k in cfg.block_types]
            expected = {"transformer": ["global_attention"] * 5, "hawk": ["recurrent"] * 5,
                        "griffin": ["recurrent", "recurrent", "attention", "recurrent", "recurrent"]}[arch]
            assert kinds == expected, arch
        assert cfgs["griffin"].local_window == window


def test_synthetic_tasks_follow_the_papers_definitions():
    """Selective copying: the data tokens scattered among noise, then a separator and the data tokens
    in order (the only scored positions); induction heads: a trigger followed by its target once in
    the context, the trigger again at the end, and the target the only scored answer."""
    import numpy as np

    from griffinlm.data import InductionHeads, SelectiveCopying
    sc = SelectiveCopying(length=1024, num_tokens=16, vocab=16)
    b = sc.sample(4, np.random.default_rng(0))
    assert b.tokens.shape == (4, sc.seq_len) and sc.seq_len == 1024 + 16
    for i in range(4):
        ctx = b.tokens[i, :1024]
        data = ctx[ctx != sc.noise_id]
        assert len(data) == 16 and int(data.max()) < 16
        assert int(b.tokens[i, 1024]) == sc.sep_id
        assert b.loss_mask[i].nonzero().flatten().tolist() == list(range(1024, 1040))
        assert torch.equal(b.targets[i, 1024:], data)
    ih = InductionHeads(length=256, vocab=16)
    b = ih.sample(64, np.random.default_rng(1))
    assert b.tokens.shape == (64, 257)
    for i in range(64):
        row = b.tokens[i]
        where = (row == ih.trigger_id).nonzero().flatten().tolist()
        assert len(where) == 2 and where[1] == 256 and where[0] < 255
        assert b.loss_mask[i].nonzero().flatten().tolist() == [256]
        assert int(b.targets[i, 256]) == int(row[where[0] + 1]) < 16
