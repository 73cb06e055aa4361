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
