"""lm-evaluation-harness: the harness's own command line on the shipped local tasks, checked against
an independent forward pass; sampling seeds per request and repeat; generation that stops early;
bad input and device fallback."""
import glob
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from griffinlm import LanguageModel, ModelConfig
from griffinlm.data import ByteTokenizer
from griffinlm.evaluate import HarnessAdapter
from griffinlm.evaluate.harness import request_seed, sampling_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig.preset("griffin-tiny", width=64, depth=3, num_heads=2, local_window=6)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from safetensors.torch import save_file

    model = tiny_model()
    path = tmp_path_factory.mktemp("ckpt")
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return model, str(path)


def _req(context, gen_kwargs=None, doc_id=None, idx=0):
    args = (context,) if gen_kwargs is None else (context, gen_kwargs)
    return SimpleNamespace(args=args, task_name="t", doc_id=doc_id, idx=idx)


# --- the harness's command line ---------------------------------------------------------
def _forward_logprob(model: LanguageModel, context: str, continuation: str) -> float:
    """log p(continuation | BOS + context) from one plain forward, with the harness's `hf` split
    (trailing whitespace of the context moves to the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx, cont = [256] + list(context.encode()), list(continuation.encode())
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def _greedy_until(model: LanguageModel, context: str, until: str, max_new: int) -> str:
    out = model.generate([[256] + list(context.encode())], max_new)[0].tolist()[len(context) + 1:]
    text = ByteTokenizer().decode([t for t in out if t < 256])
    return text.split(until)[0]


@pytest.mark.slow
def test_the_harness_command_runs_local_tasks_and_matches_a_forward_pass(checkpoint, tmp_path):
    pytest.importorskip("lm_eval")
    model, path = checkpoint
    sampling_yaml = tmp_path / "sampling.yaml"
    sampling_yaml.write_text(f"""task: griffinlm_sampling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.join(ROOT, "examples", "lm_eval", "python_lines.jsonl")}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
repeats: 4
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: true
  temperature: 1.0
filter_list:
  - name: all
    filter:
      - function: take_first
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""")
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}

    def run(output: str):
        cmd = [sys.executable, "-m", "griffinlm.lm_eval", "--model", "griffinlm", "--model_args",
               f"pretrained={path},threads=1", "--tasks", "examples/lm_eval/python_mc.yaml",
               "examples/lm_eval/python_lines.yaml", str(sampling_yaml), "--device", "cuda:0",
               "--batch_size", "3", "--output_path", output, "--log_samples"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    proc = run(str(out))
    assert "griffinlm_python_mc" in proc.stdout and "|" in proc.stdout  # the harness's results table
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    results = json.load(open(results_file))["results"]

    def samples(task, where=out):
        (f,) = glob.glob(str(where / "*" / f"samples_{task}_*.jsonl"))
        return [json.loads(line) for line in open(f)]

    # multiple choice: every choice's log-likelihood and the accuracy, from a plain forward
    mc = samples("griffinlm_python_mc")
    assert len(mc) == 20
    correct = 0
    for s in mc:
        lls = [_forward_logprob(model, s["doc"]["context"], c) for c in s["doc"]["choices"]]
        got = [float(r[0][0]) for r in s["resps"]]  # the harness logs them as strings
        assert got == pytest.approx(lls, abs=1e-3)
        correct += int(max(range(len(lls)), key=lls.__getitem__) == s["doc"]["answer"])
    assert results["griffinlm_python_mc"]["acc,none"] == pytest.approx(correct / len(mc))
    # generation: greedy text up to the newline, as an independent greedy decode gives it
    lines = samples("griffinlm_python_lines")
    for s in lines:
        assert s["resps"][0][0] == _greedy_until(model, s["doc"]["context"], "\n", 16)
    matches = sum(s["resps"][0][0] == s["doc"]["target"] for s in lines) / len(lines)
    assert results["griffinlm_python_lines"]["exact_match,none"] == pytest.approx(matches)
    # sampling with repeats: 4: four different samples per document, the same ones on a rerun
    first = samples("griffinlm_sampling")
    for s in first:
        assert len(s["resps"][0]) == 4
        assert len(set(s["resps"][0])) > 1, s["resps"]
    out2 = tmp_path / "out2"
    run(str(out2))
    assert [s["resps"] for s in samples("griffinlm_sampling", out2)] == [s["resps"] for s in first]


@pytest.mark.slow
def test_griffinlm_eval_tasks_prints_the_table_and_writes_json(checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    from griffinlm.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, path = checkpoint
    rc = main(["eval", "--checkpoint", path, "--tasks", "examples/lm_eval/python_mc.yaml", "--limit", "4",
               "--batch-size", "auto", "--threads", "1", "--device", "auto", "--out", str(tmp_path)])
    assert rc == 0
    assert "griffinlm_python_mc" in capsys.readouterr().out
    (results_file,) = glob.glob(str(tmp_path / "*" / "results_*.json"))
    assert json.load(open(results_file))["results"]["griffinlm_python_mc"]["sample_len"] == 4


def test_model_is_registered_under_its_name_with_pretrained_or_checkpoint(checkpoint):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model, model_registry

    from griffinlm.evaluate import register

    register()
    register()  # idempotent
    cls = get_model("griffinlm")
    assert "hf" in model_registry and "vllm" in model_registry  # the harness's own models are still there
    _, path = checkpoint
    lm = cls.create_from_arg_string(f"pretrained={path}", {"batch_size": "auto", "device": None})
    assert lm.adapter.batch_size == "auto" and lm.adapter.device.type in ("cpu", "cuda")
    lm2 = cls.create_from_arg_string(f"checkpoint={path},dtype=fp32,seed=7", {"batch_size": 2})
    assert lm2.adapter.seed == 7 and lm2.adapter.batch_size == 2
    with pytest.raises(ValueError, match="pretrained=DIR"):
        cls()
    with pytest.raises(ValueError, match="batch_size"):
        cls(pretrained=path, batch_size="lots")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_cuda_device_falls_back_to_cpu_with_a_warning(caplog):
    pytest.importorskip("lm_eval")
    from griffinlm.evaluate.lm_eval_model import harness_device

    with caplog.at_level(logging.WARNING, logger="griffinlm.evaluate"):
        assert harness_device("cuda:0").type == "cpu"
        assert harness_device("auto").type == "cpu"
        assert harness_device(None).type == "cpu"
    assert "CUDA is not available" in caplog.text
    assert harness_device("cpu").type == "cpu"


# --- the adapter: sampling, early stops, empty continuations, auto batch ------------------
def test_sampling_settings_follow_the_hf_model():
    assert sampling_settings({})["temperature"] == 0.0  # greedy by default
    assert sampling_settings({"do_sample": True})["temperature"] == 1.0  # transformers' default
    assert sampling_settings({"temperature": 0.7})["temperature"] == 0.7  # a temperature alone samples
    assert sampling_settings({"do_sample": False, "temperature": 0.7})["temperature"] == 0.0
    s = sampling_settings({"do_sample": True, "top_k": 0, "top_p": 1.0, "until": "\n\n", "max_gen_toks": 5})
    assert (s["top_k"], s["top_p"], s["until"], s["max_tokens"]) == (None, None, ["\n\n"], 5)
    s = sampling_settings({"do_sample": True, "top_k": 3, "top_p": 0.5})
    assert (s["top_k"], s["top_p"]) == (3, 0.5)
    with pytest.raises(ValueError, match="temperature > 0"):
        sampling_settings({"do_sample": True, "temperature": 0.0})


def test_repeats_differ_and_reruns_reproduce(monkeypatch):
    from griffinlm.serve.engine import Engine

    copies = []
    submit = Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, *a, copy_of=None: copies.append(copy_of is not None)
                        or submit(self, *a, copy_of=copy_of))
    adapter = HarnessAdapter(tiny_model(), ByteTokenizer(), batch_size=4, progress=False)
    kwargs = {"do_sample": True, "temperature": 1.0, "max_gen_toks": 12}
    a, b = _req("def f(", kwargs, doc_id=0), _req("import ", kwargs, doc_id=1)
    first = adapter.generate_until([a, a, a, a, b])
    assert copies == [False, True, True, True, False]  # the repeats share the first one's prefill
    assert len(set(first[:4])) == 4  # one generator per (request, repeat)
    assert adapter.generate_until([a, a, a, a, b]) == first
    alone = adapter.generate_until([b])  # a request's samples do not depend on its batch
    assert alone == [first[4]]
    assert request_seed(1234, ("t", 0, 0), 0) != request_seed(1234, ("t", 0, 0), 1)
    # top_k=1 is greedy whatever the temperature
    greedy = adapter.generate_until([_req("def f(", {"max_gen_toks": 12}, doc_id=0)])
    assert adapter.generate_until([_req("def f(", {**kwargs, "top_k": 1}, doc_id=0)]) == greedy


def test_generate_until_stops_at_the_stop_string_within_a_few_steps():
    model = tiny_model()
    adapter = HarnessAdapter(model, ByteTokenizer(), batch_size=2, progress=False)
    context = "x = 1\n"
    full = adapter.generate_until([_req(context, {"max_gen_toks": 8})])[0]
    assert len(full) == 8 and full.isascii()
    stop = full[:3]  # complete at the third generated token
    want = full[:full.index(stop)]
    steps = []
    step = model.step

    def counting_step(*args, **kwargs):
        steps.append(1)
        return step(*args, **kwargs)

    model.step = counting_step
    try:
        out = adapter.generate_until([_req(context, {"until": [stop], "max_gen_toks": 1024})])
    finally:
        del model.step
    assert out == [want]
    assert len(steps) <= 3  # the first token comes from the prefill, then one step per token


def test_generation_is_batched_and_each_row_keeps_its_own_stops():
    model = tiny_model()
    adapter = HarnessAdapter(model, ByteTokenizer(), batch_size=8, progress=False)
    reqs = [_req(f"def f{i}(", {"max_gen_toks": 10}, doc_id=i) for i in range(6)]
    alone = [adapter.generate_until([r])[0] for r in reqs]
    batched_rows = []
    step = model.step

    def counting_step(tokens, *args, **kwargs):
        batched_rows.append(len(tokens))
        return step(tokens, *args, **kwargs)

    model.step = counting_step
    try:
        assert adapter.generate_until(reqs) == alone
    finally:
        del model.step
    assert max(batched_rows) == 6  # the six requests decoded together
    for r, text in zip(reqs, alone):
        assert text == _greedy_until(model, r.args[0], "\x00never", 10)


def test_empty_continuation_scores_zero_with_a_warning(caplog):
    adapter = HarnessAdapter(tiny_model(), ByteTokenizer(), batch_size=2, progress=False)
    with caplog.at_level(logging.WARNING, logger="griffinlm.evaluate"):
        out = adapter.loglikelihood([_req("abc", "d"), SimpleNamespace(args=("abc", "")), _req("x", "yz")])
    assert out[1] == (0.0, True)
    assert out[0][0] < 0 and out[2][0] < 0
    assert "empty continuation" in caplog.text


def test_batch_size_auto_is_measured_and_changes_no_result():
    model = tiny_model()
    reqs = [_req(f"context {i}", f" continuation {i * i}") for i in range(7)]
    one = HarnessAdapter(model, ByteTokenizer(), batch_size=1, progress=False)
    auto = HarnessAdapter(model, ByteTokenizer(), batch_size="auto", max_batch_size=8, progress=False)
    want = one.loglikelihood(reqs)
    got = auto.loglikelihood(reqs)
    assert auto.measured_batch is not None and 1 <= auto.measured_batch <= 8
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    with pytest.raises(ValueError, match="batch_size"):
        HarnessAdapter(model, ByteTokenizer(), batch_size=0)


def test_rolling_batches_texts_of_different_lengths():
    from griffinlm.evaluate import chunked_token_nats

    model = tiny_model()
    texts = ["a short one", "a somewhat longer text to score", "mid length text"]
    adapter = HarnessAdapter(model, ByteTokenizer(), batch_size=3, chunk=7, progress=False)
    got = adapter.loglikelihood_rolling([_req(t) for t in texts])
    for t, g in zip(texts, got):
        want = -float(chunked_token_nats(model, torch.tensor([[256] + list(t.encode())]), 64).sum())
        assert g == pytest.approx(want, abs=1e-3)
