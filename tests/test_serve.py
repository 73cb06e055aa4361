"""`griffinlm serve`: the OpenAI-compatible server on loopback, with the `openai` client and raw
HTTP, every test bounded in requests and time."""
import concurrent.futures as cf
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from griffinlm import LanguageModel, ModelConfig  # noqa: E402
from griffinlm.data import ByteTokenizer  # noqa: E402
from griffinlm.serve.api import create_app  # noqa: E402
from griffinlm.serve.engine import Engine  # noqa: E402
from griffinlm.serve.metrics import ServeMetrics  # noqa: E402

TOK = ByteTokenizer()
CFG = ModelConfig.preset("griffin-tiny", width=64, depth=3, num_heads=2, local_window=8, vocab_size=259)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: Engine, metrics: ServeMetrics):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny", metrics), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def srv():
    torch.manual_seed(0)
    model = LanguageModel(CFG).eval()
    metrics = ServeMetrics()
    engine = Engine(model, TOK, max_batch=8, max_queue=8, chunk_tokens=16, metrics=metrics,
                    prefix_cache_bytes=8 * 2**20)
    server, thread, url = start(engine, metrics)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield SimpleNamespace(url=url, engine=engine, model=model, client=client)
    server.should_exit = True
    thread.join(10)
    engine.stop()


def expected_text(model, prompt: str, max_tokens: int, stop: list[str] | None = None) -> tuple[str, str]:
    """(text, finish_reason) of greedy generation for this prompt alone, by `model.generate`."""
    ids = [TOK.bos_id] + list(TOK.encode(prompt))
    out = model.generate([ids], max_tokens, stop_tokens=[TOK.eos_id])[0][len(ids):].tolist()
    finish = "stop" if out and out[-1] == TOK.eos_id else "length"
    text = bytes(t for t in out if t < 256).decode("utf-8", errors="replace")
    for s in stop or []:
        if s in text:
            text, finish = text[: text.index(s)], "stop"
    return text, finish


def wait_idle(engine: Engine, seconds: float = 10.0) -> None:
    deadline = time.time() + seconds
    while engine.active() or engine.queue:
        assert time.time() < deadline, f"slots still busy: {engine.active()} active, {len(engine.queue)} queued"
        time.sleep(0.02)


def test_completion_and_stream_equal_generate_alone(srv):
    want, finish = expected_text(srv.model, "def main(", 24)
    r = srv.client.completions.create(model="tiny", prompt="def main(", max_tokens=24, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == 10 and 1 <= r.usage.completion_tokens <= 24
    pieces, reasons = [], []
    for chunk in srv.client.completions.create(model="tiny", prompt="def main(", max_tokens=24, temperature=0,
                                               stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == want and reasons[-1] == finish and set(reasons[:-1]) == {None}


def test_chat_completion_plain_and_streamed(srv):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = srv.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    want, _ = expected_text(srv.model, "System: be brief\nUser: hi\nAssistant:", 12, ["\nUser:"])
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in srv.client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True))
    assert streamed == want


def test_32_concurrent_greedy_requests_each_equal_generate_alone(srv):
    shared = "import os\nimport sys\n"
    prompts = [("x" * (i % 7 + 1)) + str(i) for i in range(12)]  # short prompts of different lengths
    prompts += [shared + f"def f{i}():" for i in range(10)]  # a shared prefix, longer than the window of 8
    prompts += ["class A:\n" * (i % 4 + 2) for i in range(10)]  # longer than a prefill chunk of 16
    stops = [["\n"] if i % 5 == 0 else None for i in range(len(prompts))]
    want = [expected_text(srv.model, p, 20, s) for p, s in zip(prompts, stops)]

    def ask(i):
        return srv.client.completions.create(model="tiny", prompt=prompts[i], max_tokens=20, temperature=0,
                                             stop=stops[i])

    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(len(prompts))))
    for i, r in enumerate(got):
        assert (r.choices[0].text, r.choices[0].finish_reason) == want[i], i
    wait_idle(srv.engine)


def test_seeded_sampling_does_not_depend_on_the_batch(srv):
    kw = dict(model="tiny", prompt="for i in", max_tokens=16, temperature=1.0, seed=7)
    alone = srv.client.completions.create(**kw, extra_body={"top_k": 50}).choices[0].text
    with cf.ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(srv.client.completions.create, model="tiny", prompt=f"while {i}", max_tokens=16,
                             temperature=1.0, seed=i) for i in range(6)]
        again = pool.submit(srv.client.completions.create, **kw, extra_body={"top_k": 50})
        assert again.result().choices[0].text == alone
        [f.result() for f in noise]
    two = srv.client.completions.create(model="tiny", prompt="for i in", max_tokens=16, temperature=1.0, seed=3, n=2)
    assert len(two.choices) == 2 and [c.index for c in two.choices] == [0, 1]


def test_bad_requests_answer_400_naming_the_field_and_the_server_goes_on(srv):
    cases = [({"prompt": "a", "max_tokens": 0}, "max_tokens"), ({"prompt": "a", "temperature": -1}, "temperature"),
             ({"prompt": "a", "temperature": "hot"}, "temperature"), ({"prompt": "a", "top_p": 2}, "top_p"),
             ({"prompt": "a", "logprobs": 9}, "logprobs"), ({"max_tokens": 3}, "prompt"),
             ({"prompt": [1, 2, 999]}, "prompt"), ({"prompt": "a", "model": "gpt-9"}, "model"),
             ({"prompt": "a", "stop": [""]}, "stop"), ({"prompt": "a", "n": "two"}, "n")]
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        for body, field in cases:
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == field, (body, r.json())
        r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
        ok = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_models_health_metrics_and_logprobs(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert http.get("/health").json()["status"] == "ok"
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0, "logprobs": 2})
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == 3 and all(v <= 0 for v in lp["token_logprobs"])
        assert all(len(t) == 2 for t in lp["top_logprobs"])
        text = http.get("/metrics").text
        for name in ("griffinlm_requests_total", "griffinlm_queue_length", "griffinlm_active_slots",
                     "griffinlm_generated_tokens_total", "griffinlm_time_to_first_token_seconds_bucket",
                     "griffinlm_inter_token_latency_seconds_bucket"):
            assert name in text, name
        assert 'griffinlm_requests_total{status="200"}' in text


def test_overload_answers_429_and_health_stays_up(srv):
    """40 concurrent long requests against 8 slots + 8 queued: each ends 200 or 429, none hangs."""
    def ask(i):
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            return http.post("/v1/completions", json={"prompt": f"n{i}", "max_tokens": 60, "temperature": 0}).status_code

    with cf.ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(ask, i) for i in range(40)]
        with httpx.Client(base_url=srv.url, timeout=10) as http:
            assert http.get("/health").status_code == 200
        codes = [f.result(timeout=120) for f in futures]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
    wait_idle(srv.engine)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 500, "temperature": 0,
                                                          "stream": True, "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    json.loads(line[6:])
                    break
    wait_idle(srv.engine)


def test_a_failing_request_gets_500_and_the_others_are_served(srv, monkeypatch):
    real = srv.model.prefill

    def flaky(tokens, cache, slot, **kw):
        if int(tokens[-1]) == ord("!"):
            raise RuntimeError("injected failure")
        return real(tokens, cache, slot, **kw)

    monkeypatch.setattr(srv.model, "prefill", flaky)
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        bad = http.post("/v1/completions", json={"prompt": "boom!", "max_tokens": 3})
        assert bad.status_code == 500 and "injected failure" in bad.json()["error"]["message"]
        assert http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 3}).status_code == 200
    wait_idle(srv.engine)


def test_prefix_cache_hit_gives_the_tokens_of_a_miss(srv):
    prefix = "# a shared header of a few chunks\nimport os, sys, re\n"  # 53 tokens with BOS: 3 chunks of 16
    hits, misses = srv.engine.prefixes.hits, srv.engine.prefixes.misses
    first = srv.client.completions.create(model="tiny", prompt=prefix + "x = 1", max_tokens=12, temperature=0)
    second = srv.client.completions.create(model="tiny", prompt=prefix + "x = 1", max_tokens=12, temperature=0)
    other = srv.client.completions.create(model="tiny", prompt=prefix + "y", max_tokens=12, temperature=0)
    want = [expected_text(srv.model, prefix + p, 12)[0] for p in ("x = 1", "y")]
    assert first.choices[0].text == second.choices[0].text == want[0]
    assert other.choices[0].text == want[1]
    assert srv.engine.prefixes.hits - hits >= 2 and srv.engine.prefixes.misses - misses >= 1
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        text = http.get("/metrics").text
    assert 'griffinlm_prefix_cache_lookups_total{result="hit"}' in text
    assert 'griffinlm_prefix_cache_lookups_total{result="miss"}' in text


def test_griffinlm_serve_command_drains_on_sigterm(tmp_path):
    """The CLI serves a checkpoint; SIGTERM lets the running stream finish, then exits 0."""
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import save_file

    model = LanguageModel(CFG).eval()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    port = free_port()
    env = {**os.environ, "GRIFFINLM_DISABLE_NUMBA": "1"}  # no JIT compile in the child
    proc = subprocess.Popen([sys.executable, "-m", "griffinlm", "serve", "--checkpoint", str(tmp_path), "--port",
                             str(port), "--max-batch", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        pieces = []
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 300, "ignore_eos": True,
                                                              "temperature": 0, "stream": True}) as r:
                for line in r.iter_lines():
                    if not pieces:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                    pieces.append(line)
        assert pieces[-2] == "data: [DONE]" or pieces[-1] == "data: [DONE]"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_chat_uses_the_tokenizers_chat_template(tmp_path):
    """A tokenizer_config.json chat template (as a converted RecurrentGemma keeps) renders chat
    prompts; a template that refuses the conversation answers 400."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from griffinlm.data import load_tokenizer
    from griffinlm.inference.chat import ChatFormat

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "user", "model", "hi", "there", ":", "|"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('no system role') }}{% endif %}{{ m['role'] }} : {{ m['content'] }} | "
                "{% endfor %}{% if add_generation_prompt %}model :{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<bos>"}))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    fmt = ChatFormat.for_tokenizer(tok)
    msgs = [{"role": "user", "content": "hi there"}]
    assert fmt.render(msgs) == "<bos>user : hi there | model :"
    ids = fmt.encode(msgs)
    assert ids == [tok.bos_id] + [words.index(w) for w in "user : hi there | model :".split()]
    assert fmt.default_stop == [] and ChatFormat(TOK).default_stop == ["\nUser:"]

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.preset("griffin-tiny", width=32, depth=2, num_heads=2, local_window=8,
                                             vocab_size=tok.vocab_size)).eval()
    metrics = ServeMetrics()
    engine = Engine(model, tok, max_batch=2, max_queue=2, metrics=metrics)
    server, thread, url = start(engine, metrics)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)
            bad = http.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
            assert bad.status_code == 400 and "no system role" in bad.json()["error"]["message"]
            assert bad.json()["error"]["param"] == "messages"
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()


@pytest.mark.parametrize("arch", ["griffin", "transformer"])
def test_copies_of_a_prompt_prefill_it_once_and_sample_as_separate_requests(arch, monkeypatch):
    """OpenAI's n: the copies of a prompt take its first copy's state after the prompt instead of
    prefilling it again (a global-attention state too), and each samples exactly what the same
    request alone would; a copy whose leader is cancelled before its prompt is in prefills the
    prompt itself."""
    from griffinlm.serve.engine import Sampling

    torch.manual_seed(0)
    cfg = CFG if arch == "griffin" else ModelConfig.preset("transformer-tiny", width=64, depth=2, num_heads=2,
                                                             vocab_size=259, max_position=256)
    model = LanguageModel(cfg).eval()
    prompt = [TOK.bos_id] + [int(t) for t in TOK.encode("def main(argv):\n    return 0\n" * 2)]  # 16-token chunks
    prefilled = []
    for name in ("prefill", "prefill_many"):
        fn = getattr(model, name)

        def counted(tokens, *a, _fn=fn, **k):
            prefilled.append(sum(len(t) for t in tokens) if isinstance(tokens, list) else tokens.numel())
            return _fn(tokens, *a, **k)
        monkeypatch.setattr(model, name, counted)

    def run_until_idle(engine: Engine) -> None:
        worker = threading.Thread(target=engine.run_until_idle, daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "the engine did not finish"

    def run(copies: bool, cancel_leader: bool = False) -> list[list[int]]:
        engine = Engine(model, TOK, max_batch=4, max_queue=8, chunk_tokens=16, background=False)
        out: dict[int, list[int]] = {}
        reqs = []
        for j in range(3):
            s = Sampling(max_tokens=12, temperature=1.0, seed=10 + j, ignore_eos=True)
            reqs.append(engine.submit(prompt, s, lambda ev, j=j: ev.kind == "token" and out.setdefault(j, []).append(
                ev.token), copy_of=reqs[0] if copies and j else None))
        if cancel_leader:
            engine.cancel(reqs[0])
        prefilled.clear()
        run_until_idle(engine)
        assert engine.active() == 0 and not engine.copying
        return [out.get(j, []) for j in range(3)]

    alone = run(copies=False)
    assert sum(prefilled) == 3 * len(prompt)
    assert len({tuple(t) for t in alone}) == 3  # three seeds, three samples
    assert run(copies=True) == alone
    assert sum(prefilled) == len(prompt)  # the prompt went through the model once
    fallback = run(copies=True, cancel_leader=True)
    assert fallback[0] == [] and fallback[1:] == alone[1:]
    assert sum(prefilled) == 2 * len(prompt)  # each remaining copy prefilled it
    # a copy submitted once its leader's prompt is in (nothing kept for it) prefills it too
    engine = Engine(model, TOK, max_batch=2, max_queue=2, chunk_tokens=16, background=False)
    got: list[int] = []
    lead = engine.submit(prompt, Sampling(max_tokens=3, temperature=1.0, seed=10, ignore_eos=True), lambda ev: None)
    engine.run_until_idle()
    engine.submit(prompt, Sampling(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True),
                  lambda ev: ev.kind == "token" and got.append(ev.token), copy_of=lead)
    run_until_idle(engine)
    assert got == alone[1]
