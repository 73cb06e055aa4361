"""griffinlm.evaluate building blocks: run cache, power-law fit, matched configs, chunked scoring,
multiple-choice scoring, the lm-evaluation-harness adapter, report tables."""
import json
import statistics
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from griffinlm import LanguageModel, ModelConfig
from griffinlm.data import ByteTokenizer
from griffinlm.evaluate import (HarnessAdapter, RunCache, chunked_token_nats, config_key, continuation_logprobs,
                                load_questions, score_questions)
from griffinlm.evaluate.cli import set_threads
from griffinlm.evaluate.archs import ARCHS, glu_variant_config, matched_archs, param_count
from griffinlm.evaluate.powerlaw import fit_power_law, pareto_frontier, power_law
from griffinlm.evaluate.report import md_table, parse_md_tables

TINY = dict(width=32, depth=3, num_heads=2, local_window=8, mlp_expansion=2.0)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)


def tiny_model(arch: str) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig.preset(f"{arch}-tiny", **TINY)).eval()


# --- run cache ---------------------------------------------------------------------------
def test_run_cache_computes_once_and_keys_by_full_config(tmp_path):
    cache = RunCache(str(tmp_path / "runs"))
    calls = []

    def compute():
        calls.append(1)
        return {"loss": 1.5}
    cfg = {"model": {"width": 32}, "steps": 10, "seed": 0}
    assert cache.run("a", cfg, compute) == {"loss": 1.5}
    assert cache.run("a", dict(reversed(list(cfg.items()))), compute) == {"loss": 1.5}  # key order irrelevant
    assert len(calls) == 1 and cache.hits == 1 and cache.misses == 1
    cache.run("a", {**cfg, "seed": 1}, compute)  # any field change is a new run
    assert len(calls) == 2
    assert config_key(cfg) != config_key({**cfg, "steps": 11})
    files = os.listdir(tmp_path / "runs")
    assert len(files) == 2 and not any(f.startswith(".") for f in files)  # no temporary files left
    record = json.load(open(tmp_path / "runs" / sorted(files)[0]))
    assert set(record) == {"name", "key", "config", "result"}
    # a fresh cache object on the same directory (a re-run) finds them; recompute ignores them
    assert RunCache(str(tmp_path / "runs")).get("a", cfg) == {"loss": 1.5}
    assert RunCache(str(tmp_path / "runs"), recompute=True).get("a", cfg) is None


def test_run_cache_ignores_corrupt_file(tmp_path):
    cache = RunCache(str(tmp_path))
    cfg = {"x": 1}
    os.makedirs(tmp_path, exist_ok=True)
    with open(cache.path("r", cfg), "w") as f:
        f.write('{"key": "trunc')  # a torn write from an older tool
    assert cache.get("r", cfg) is None
    assert cache.run("r", cfg, lambda: {"v": 2}) == {"v": 2}
    assert cache.get("r", cfg) == {"v": 2}


# --- power law -------------------------------------------------------------------------
def test_power_law_fit_recovers_parameters():
    flops = np.geomspace(1e9, 1e13, 7)
    loss = 40.0 * flops ** -0.15 + 0.9
    fit = fit_power_law(flops, loss)
    assert fit["b"] == pytest.approx(0.15, rel=0.05)
    assert fit["c"] == pytest.approx(0.9, abs=0.02)
    assert fit["r2"] > 0.999
    assert power_law(1e11, fit) == pytest.approx(40.0 * 1e11 ** -0.15 + 0.9, rel=1e-3)


def test_pareto_frontier_keeps_only_improving_points():
    flops = [1, 2, 3, 4, 5]
    losses = [5.0, 4.0, 4.5, 3.0, 3.5]
    assert pareto_frontier(flops, losses) == [0, 1, 3]


# --- configs ----------------------------------------------------------------------------
def test_matched_archs_have_equal_parameters():
    for width in (32, 128):
        cfgs = matched_archs(ARCHS, width, 3, 2, 16)
        counts = [param_count(c) for c in cfgs.values()]
        assert max(counts) / min(counts) < 1.02
        assert [c.block_pattern for c in cfgs.values()] == [("global_attention",), ("recurrent",),
                                                            ("recurrent", "recurrent", "attention")]


def test_glu_variants_have_equal_parameters():
    base = ModelConfig.preset("transformer-tiny", width=48, depth=2, num_heads=1)
    counts = {a: param_count(glu_variant_config(base, a)) for a in
              ("relu", "gelu", "swish", "glu", "bilinear", "reglu", "geglu", "swiglu")}
    assert max(counts.values()) / min(counts.values()) < 1.01
    assert glu_variant_config(base, "swiglu").mlp_hidden == 128  # 2/3 of 4 * 48
    learned = glu_variant_config(base, "swish", learnable_beta=True)
    assert param_count(learned) == counts["swish"] + 2  # one beta per layer


# --- scoring ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_scoring_matches_one_forward(arch):
    model = tiny_model(arch)
    tokens = torch.randint(0, 256, (2, 41))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    full = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    for chunk in (7, 16, 64):  # chunks smaller than, equal to and beyond the local window
        torch.testing.assert_close(chunked_token_nats(model, tokens, chunk), full, atol=1e-4, rtol=1e-4)


def test_continuation_logprobs_match_direct_computation():
    model = tiny_model("griffin")
    reqs = [([256, 1, 2, 3], [4, 5]), ([256, 9], [7, 7, 7]), ([256, 1, 2, 3, 4, 5, 6], [1])]
    got = continuation_logprobs(model, reqs, batch_size=2)
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq[:, :-1]), -1)[0]
        idx = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        want = sum(float(logp[i, seq[0, i + 1]]) for i in idx)
        assert lp == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(logp[i].argmax()) == int(seq[0, i + 1]) for i in idx)
    # max_length cuts the context from the left, never the continuation
    short = continuation_logprobs(model, [([256] + list(range(30)), [1, 2])], max_length=8)
    assert math.isfinite(short[0][0])


@pytest.mark.parametrize("arch", ["griffin", "hawk", "transformer"])
def test_shared_contexts_score_as_independent_forwards(arch):
    """Contexts shared by several continuations run once (left-padded in a batch, forked per
    request); every score must equal a plain forward of context + continuation."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    contexts = [[256] + ids(n) for n in (3, 17, 1, 9, 12)]  # lengths around the window of 8
    reqs = [(c, ids(k)) for c in contexts for k in (1, 4, 2)]  # three choices each, one of one token
    reqs += [([256] + ids(11), ids(5))]  # a context of its own
    order = torch.randperm(len(reqs), generator=g).tolist()
    reqs = [reqs[i] for i in order]  # members of one group scattered through the list
    for batch_size in (4, 64, 1):
        got = continuation_logprobs(model, reqs, batch_size=batch_size)
        for (ctx, cont), (lp, greedy) in zip(reqs, got):
            seq = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq).double(), -1)[0]
            idx = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
            assert lp == pytest.approx(sum(float(logp[i, seq[0, i + 1]]) for i in idx), abs=1e-4)
            assert greedy == all(int(logp[i].argmax()) == int(seq[0, i + 1]) for i in idx)


def test_large_logits_take_the_prefill_path_with_the_same_scores(monkeypatch):
    """Above the logits budget (a 256k vocabulary at long contexts) even unshared contexts go
    through prefill_many (last-position logits only); the scores do not change."""
    from griffinlm.evaluate import scoring

    model = tiny_model("griffin")
    reqs = [([256] + list(range(3, 3 + n)), [7, 8, 9][:k]) for n, k in ((5, 1), (11, 3), (2, 2))]
    want = continuation_logprobs(model, reqs, batch_size=4)
    calls = []
    real = model.prefill_many
    monkeypatch.setattr(model, "prefill_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 1)
    got = continuation_logprobs(model, reqs, batch_size=4)
    assert calls  # the memory-bounded path ran
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]


def test_shared_context_batches_count_requests_and_report_progress():
    model = tiny_model("griffin")
    reqs = [([256, 1, 2], [c]) for c in range(5)] + [([256, 3], [1, 2])]
    seen = []
    continuation_logprobs(model, reqs, batch_size=2, progress=seen.append)
    assert seen == [5, 1]  # a group is never split, so a batch may exceed batch_size


# --- multiple choice --------------------------------------------------------------------
def test_load_questions_formats_and_errors(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n\n'
                    '{"question": "sky?", "choices": ["blue", "green"], "answer": "blue", "context": "Look up."}\n')
    qs = load_questions(str(path))
    assert [q.answer for q in qs] == [1, 0]
    assert qs[1].prompt() == "Look up.\nsky?\nAnswer:"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_questions(str(bad))


def test_score_questions_picks_the_most_likely_choice(tmp_path):
    model = tiny_model("hawk")
    tok = ByteTokenizer()
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["aa", "b", "cccc"], "answer": i % 3}) + "\n"
                            for i in range(6)))
    r = score_questions(model, tok, load_questions(str(path)))
    assert r["questions"] == 6 and r["chance"] == pytest.approx(1 / 3)
    expected = sum(int(np.argmax(lls) == i % 3) for i, lls in enumerate(r["loglikelihoods"])) / 6
    assert r["acc"] == pytest.approx(expected)
    assert 0.0 <= r["acc_norm"] <= 1.0


# --- lm-evaluation-harness adapter ------------------------------------------------------
def _req(*args):
    return SimpleNamespace(args=args)  # the harness's Instance exposes `.args`


def test_harness_adapter_handles_the_three_request_types():
    model = tiny_model("griffin")
    tok = ByteTokenizer()
    adapter = HarnessAdapter(model, tok, batch_size=2, chunk=5)
    ll = adapter.loglikelihood([_req("Hello", " world"), _req("", "x")])
    direct = continuation_logprobs(model, [([256] + list(b"Hello"), list(b" world")), ([256], list(b"x"))])
    assert [x[0] for x in ll] == pytest.approx([x[0] for x in direct], abs=1e-5)
    assert all(isinstance(g, bool) for _, g in ll)
    rolling = adapter.loglikelihood_rolling([_req("some text to score")])
    want = -float(chunked_token_nats(model, torch.tensor([[256] + list(b"some text to score")]), 64).sum())
    assert rolling[0] == pytest.approx(want, abs=1e-3)
    out = adapter.generate_until([_req("abc", {"until": ["\n"], "max_gen_toks": 6}), _req("x", {"max_gen_toks": 3})])
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert "\n" not in out[0]


def test_lm_eval_class_needs_lm_eval():
    from griffinlm.evaluate.lm_eval_adapter import lm_eval_model_class
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lm-eval"):
            lm_eval_model_class()
    else:  # installed: the class is an lm_eval LM
        from lm_eval.api.model import LM
        assert issubclass(lm_eval_model_class(), LM)


# --- report tables ----------------------------------------------------------------------
def test_markdown_table_round_trip():
    text = "intro\n\n" + md_table(["model", "params", "bpb"], [["Hawk", 1234, 1.23456], ["Griffin", 99, None]]) + "\n"
    (table,) = parse_md_tables(text)
    assert table == [["model", "params", "bpb"], ["Hawk", "1,234", "1.235"], ["Griffin", "99", "-"]]
    with pytest.raises(ValueError):
        md_table(["a", "b"], [[1]])


# --- intervals and verdicts -------------------------------------------------------------
def test_t_quantiles_match_tables_and_scipy():
    from griffinlm.evaluate.intervals import t_cdf, t_quantile

    # two-sided 95% critical values from any t table
    for df, want in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-3)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776, abs=1e-3)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7.5, 50):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-6)
            assert t_cdf(scipy_stats.t.ppf(p, df), df) == pytest.approx(p, abs=1e-9)


def test_verdicts_come_from_the_interval_not_the_mean():
    from griffinlm.evaluate.intervals import mean_interval, paired_interval, verdict

    # the glu-variants case of the issue: t = 2.9 at n = 3 is not significant (critical 4.30)
    diffs = [0.010, 0.004, 0.013]
    ci = mean_interval(diffs)
    sem = statistics.stdev(diffs) / math.sqrt(3)
    assert 2.5 < ci.mean / sem < 4.3 and ci.lo < 0 < ci.hi and verdict(ci) == "unresolved"
    assert verdict(mean_interval([0.010, 0.011, 0.012])) == "agrees"
    assert verdict(mean_interval([-0.010, -0.011, -0.012])) == "disagrees"
    assert verdict(mean_interval([-0.010, -0.011, -0.012]), claim_positive=False) == "agrees"
    assert verdict(mean_interval([0.5])) == "unresolved"  # one seed: no interval
    gap = paired_interval([1.0, 2.0, 3.0], [0.9, 1.9, 2.8])
    assert gap.mean == pytest.approx(0.1333, abs=1e-4) and gap.n == 3
