"""`griffinlm serve` under load: tokens/s, time to first token and inter-token latency through HTTP.

For each architecture (the width-512, 6-layer Griffin, Hawk and MQA Transformer of BENCHMARKS.md,
random weights) it saves a checkpoint, starts `griffinlm serve` in a subprocess on loopback, and
drives it with this script's own asyncio client: at each concurrency level c, c clients each send
--requests-per-client streaming completions (a --prompt-tokens token-id prompt, --new-tokens
generated past EOS), one after another. Reported per level: total generated tokens/s (wall clock
from the first request to the last token), time to first token and inter-token latency (p50,
p99). In the same run, without HTTP: the offline rate of `model.step` at batch = the largest c
(the server-overhead baseline), and for Griffin `transformers`' RecurrentGemma `generate()` on the
same weights and prompts in static batches of c (the peer).

    python benchmarks/serve.py                          # writes docs/results/serve.json
    python benchmarks/serve.py --quick --no-write       # a smoke test
    python benchmarks/serve.py --long                   # the paper's shape; writes docs/results/serve_long.json

--long: 4,096-token prompts at 16 clients (Griffin, Hawk, the MQA Transformer; the server's peak
RSS against a 256-token run), and the prefix cache: time to first token of requests sharing a
2,048-token prefix, the first (a miss) against the next ones (hits).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_PATH = os.path.join(ROOT, "docs", "results", "serve.json")


def config(arch: str):
    """The width-512, 6-layer model of the Inference section (`inference.model_config`)."""
    from griffinlm import ModelConfig

    from inference import model_config  # this folder is on sys.path

    cfg = model_config(arch, argparse.Namespace(width=512, depth=6, window=512))
    # the byte tokenizer the server loads has 259 ids (bytes, BOS, EOS, PAD)
    return ModelConfig(**{**cfg.to_dict(), "block_pattern": tuple(cfg.block_pattern), "max_position": 8192,
                          "vocab_size": 259})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def client_load(url: str, clients: int, per_client: int, prompt_tokens: int, new_tokens: int) -> dict:
    import httpx

    ttft, itl, tokens = [], [], 0

    async def one(http, c: int, i: int) -> None:
        nonlocal tokens
        prompt = [(c * 7919 + i * 104729 + t) % 250 + 3 for t in range(prompt_tokens)]
        body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        t0 = time.perf_counter()
        last = None
        async with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if json.loads(line[6:])["choices"][0]["finish_reason"] is not None:
                    continue
                if last is None:
                    ttft.append(now - t0)
                else:
                    itl.append(now - last)
                last = now
                tokens += 1

    async def worker(http, c: int) -> None:
        for i in range(per_client):
            await one(http, c, i)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http, c) for c in range(clients)))
        wall = time.perf_counter() - t0
    # byte tokens: a streamed piece per token except where a multi-byte character is held back
    return dict(clients=clients, requests=clients * per_client, tokens=tokens, wall_s=wall, tok_s=tokens / wall,
                ttft_p50_ms=1e3 * pct(ttft, 0.5), ttft_p99_ms=1e3 * pct(ttft, 0.99),
                itl_p50_ms=1e3 * pct(itl, 0.5), itl_p99_ms=1e3 * pct(itl, 0.99))


def serve(model_dir: str, max_batch: int, threads: int, *extra: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "griffinlm", "serve", "--checkpoint", model_dir, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "1024", "--threads", str(threads), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError("griffinlm serve exited")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("griffinlm serve did not start")
        time.sleep(0.3)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def save_model(arch: str, directory: str):
    import torch
    from safetensors.torch import save_file

    from griffinlm import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(config(arch)).eval()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(directory, "model.safetensors"))
    return model


async def ttft_of(url: str, prompt: list[int]) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()
        async with http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0,
                                                                 "stream": True, "ignore_eos": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return time.perf_counter() - t0
    return float("nan")


def long_run(args) -> dict:
    """The paper's shape (long prompts at 16 clients) and the prefix cache's time to first token."""
    res = {"archs": {}}
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as d:
            save_model(arch, d)
            res["archs"][arch] = {}
            for T in (256, 4096):
                proc, url = serve(d, 16, args.threads)
                try:
                    asyncio.run(client_load(url, 1, 1, 64, 2))  # warm-up
                    lv = asyncio.run(client_load(url, 16, 1, T, 32))
                    lv["server_peak_rss_mb"] = peak_rss_mb(proc.pid)
                finally:
                    proc.terminate()
                    proc.wait(60)
                res["archs"][arch][str(T)] = lv
                print(f"{arch:11s} 16 clients, {T}-token prompts, 32 new: {lv['tok_s']:.0f} tok/s, TTFT p50 "
                      f"{lv['ttft_p50_ms']:.0f} ms, server peak RSS {lv['server_peak_rss_mb']:.0f} MB", flush=True)
    with tempfile.TemporaryDirectory() as d:
        save_model("griffin", d)
        proc, url = serve(d, 16, args.threads, "--prefix-cache-mb", "256", "--chunk-tokens", "512")
        try:
            asyncio.run(ttft_of(url, [9] * 2064))  # warm-up (kernels, GEMM choices) on an unrelated prompt
            prefix = [(t * 7919) % 250 + 3 for t in range(2048)]
            miss = asyncio.run(ttft_of(url, prefix + [5] * 16))
            hits = [asyncio.run(ttft_of(url, prefix + [6 + i] * 16)) for i in range(4)]
        finally:
            proc.terminate()
            proc.wait(60)
    res["prefix"] = dict(prefix_tokens=2048, miss_ttft_ms=1e3 * miss, hit_ttft_ms=[1e3 * h for h in hits],
                         speedup=miss / statistics.median(hits))
    print(f"prefix cache, 2,048-token shared prefix: TTFT miss {1e3 * miss:.0f} ms, hits "
          f"{', '.join(f'{1e3 * h:.0f}' for h in hits)} ms: {res['prefix']['speedup']:.1f}x", flush=True)
    return res


def offline_rate(model, batch: int, length: int, steps: int = 8) -> float:
    """Tokens/s of `model.step` at `batch` slots that hold `length` tokens each (no HTTP)."""
    import torch

    with torch.no_grad():
        cache = model.init_cache(batch, max_length=length + steps + 2)
        model(torch.randint(3, 250, (batch, length)), cache=cache)
        tok, slots = torch.randint(3, 250, (batch,)), torch.arange(batch)
        model.step(tok, cache, slots)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.step(tok, cache, slots)
        return batch * steps / (time.perf_counter() - t0)


def prefill_rate(model, batch: int, length: int, rounds: int = 2) -> float:
    """Tokens/s of the engine's batched prefill (`prefill_many`) of `batch` fresh slots with
    `length`-token prompts (no HTTP; the best of `rounds`)."""
    import torch

    with torch.no_grad():
        cache = model.init_cache(batch)
        prompts = [torch.randint(3, 250, (length,)) for _ in range(batch)]
        best = 0.0
        for _ in range(rounds + 1):  # the first round warms up
            cache.reset(list(range(batch)))
            t0 = time.perf_counter()
            model.prefill_many(prompts, cache, list(range(batch)))
            best = max(best, batch * length / (time.perf_counter() - t0))
        return best


def ceiling(decode_tok_s: float, prefill_tok_s: float, prompt_tokens: int, new_tokens: int) -> float:
    """Generated tokens/s if every prompt token cost what the batched prefill costs and every
    generated token what the offline step costs, with nothing else (no HTTP, no scheduling, no
    sampling): the most any server could serve of this workload with this model on this machine."""
    return 1.0 / (1.0 / decode_tok_s + prompt_tokens / new_tokens / prefill_tok_s)


def hf_rate(clients: int, prompt_tokens: int, new_tokens: int) -> tuple[float, float]:
    """(transformers, ours) generate() tokens/s on one static batch of `clients` prompts."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peer_hf import build

    hf, ours = build(seed=0)
    prompt = torch.randint(3, 250, (clients, prompt_tokens), generator=torch.Generator().manual_seed(1))
    out = []
    with torch.no_grad():
        for fn in (lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False),
                   lambda: ours.generate(prompt, new_tokens)):
            t0 = time.perf_counter()
            fn()
            out.append(clients * new_tokens / (time.perf_counter() - t0))
    return out[0], out[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["griffin", "hawk", "transformer"],
                   choices=["griffin", "hawk", "transformer"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 and 4 clients, 32-token prompts, 16 new tokens")
    p.add_argument("--long", action="store_true", help="the paper's shape and the prefix cache (see above)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.long:
        import torch

        torch.set_num_threads(args.threads)
        res = dict(date=time.strftime("%Y-%m-%d"), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   threads=args.threads, **long_run(args))
        if not args.no_write:
            with open(JSON_PATH.replace("serve.json", "serve_long.json"), "w") as f:
                json.dump(res, f, indent=1)
        return 0
    if args.quick:
        args.clients, args.prompt_tokens, args.new_tokens, args.requests_per_client = [1, 4], 32, 16, 1
    import torch

    torch.set_num_threads(args.threads)
    top = max(args.clients)
    res = dict(date=time.strftime("%Y-%m-%d"), cpu_capability=torch.backends.cpu.get_cpu_capability(),
               cores=os.cpu_count(), threads=args.threads, torch=torch.__version__, prompt_tokens=args.prompt_tokens,
               new_tokens=args.new_tokens, requests_per_client=args.requests_per_client, archs={})
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as d:
            model = save_model(arch, d)
            proc, url = serve(d, top, args.threads)
            try:
                asyncio.run(client_load(url, 1, 1, args.prompt_tokens, 4))  # warm-up: JIT, oneDNN choices
                levels = [asyncio.run(client_load(url, c, args.requests_per_client, args.prompt_tokens,
                                                  args.new_tokens)) for c in args.clients]
            finally:
                proc.terminate()
                proc.wait(60)
        offline = offline_rate(model, top, args.prompt_tokens + args.new_tokens // 2)
        prefill = prefill_rate(model, min(top, 16), args.prompt_tokens)
        ceilings = {c: ceiling(offline if c == top else offline_rate(model, c, args.prompt_tokens + args.new_tokens // 2),
                               prefill, args.prompt_tokens, args.new_tokens) for c in args.clients if c >= 16 or c == top}
        res["archs"][arch] = dict(levels=levels, offline_step_tok_s=offline, http_over_offline=levels[-1]["tok_s"] / offline,
                                  prefill_tok_s=prefill, ceiling_tok_s={str(c): v for c, v in ceilings.items()},
                                  ceiling_over_offline=ceilings[top] / offline,
                                  http_over_ceiling=levels[-1]["tok_s"] / ceilings[top])
        for lv in levels:
            print(f"{arch:11s} c={lv['clients']:3d}: {lv['tok_s']:8.0f} tok/s  TTFT p50 {lv['ttft_p50_ms']:7.1f} ms "
                  f"p99 {lv['ttft_p99_ms']:7.1f}  ITL p50 {lv['itl_p50_ms']:6.1f} ms p99 {lv['itl_p99_ms']:6.1f}",
                  flush=True)
        print(f"{arch:11s} offline model.step at batch {top}: {offline:.0f} tok/s; HTTP at c={top} = "
              f"{res['archs'][arch]['http_over_offline']:.0%} of it", flush=True)
        print(f"{arch:11s} batched prefill {prefill:.0f} tok/s; ceiling of this workload at c={top} (prefill + decode "
              f"at those rates, nothing else): {ceilings[top]:.0f} tok/s = {ceilings[top] / offline:.0%} of the "
              f"decode-only rate; served = {levels[-1]['tok_s'] / ceilings[top]:.0%} of the ceiling", flush=True)
    if not args.no_hf and "griffin" in res["archs"]:
        res["hf"] = {}
        for c in [c for c in args.clients if c >= 16] or [top]:
            theirs, ours = hf_rate(c, args.prompt_tokens, args.new_tokens)
            served = next(lv["tok_s"] for lv in res["archs"]["griffin"]["levels"] if lv["clients"] == c)
            top_ceiling = res["archs"]["griffin"]["ceiling_tok_s"].get(str(c))
            res["hf"][str(c)] = dict(transformers_tok_s=theirs, ours_generate_tok_s=ours, served_tok_s=served,
                                     served_over_transformers=served / theirs,
                                     ceiling_over_transformers=top_ceiling and top_ceiling / theirs)
            print(f"transformers generate() static batch {c}: {theirs:.0f} tok/s; ours served at c={c}: {served:.0f} "
                  f"tok/s = {served / theirs:.2f}x (our generate(): {ours:.0f} tok/s; the ceiling above: "
                  f"{top_ceiling and top_ceiling / theirs:.2f}x)", flush=True)
    if not args.no_write:
        with open(JSON_PATH, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {os.path.relpath(JSON_PATH, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
