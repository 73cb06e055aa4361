"""griffinlm's lm-evaluation-harness model against the harness's own `hf` model running the
`transformers` RecurrentGemma with the same weights: the same requests, CPU, threads and run.

Request types (text from the Python standard library's source, byte-level tokens):
  loglikelihood          N contexts of 256 bytes, continuations of 16 bytes, batch 1 and 32; and
                         multiple-choice shaped: N/4 contexts of 256 bytes with 4 continuations
                         of 16 bytes each (as hellaswag, arc, mmlu, piqa send them), batch 32
  loglikelihood_rolling  documents of 2,048 bytes, batch 8
  generate_until         contexts of 128 bytes, 64 greedy tokens each (a stop string that does not
                         occur), batch 32

Both models come from one random `transformers` RecurrentGemma of griffin-tiny's shape, saved
with a byte-level `tokenizer.json` that prepends BOS like ours and converted with
`convert_from_hf`; each harness model loads its directory, as a user's would. Before timing, the two must agree: log-likelihoods within 1e-3 nats, the same greedy
continuations; a mismatch stops the benchmark (a ratio between different computations means
nothing). Prints requests/s (or tokens/s) of each and the ratio ours / hf.

    python benchmarks/lm_eval.py [--quick] [--threads 2] [--json out.json]

Needs lm-eval and accelerate (the `hf` model imports it): pip install lm-eval accelerate.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time

import torch

# This file's name is the harness's package name: keep its directory off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


# griffin-tiny's shape (width 256, 6 layers R,R,A, 4 heads, MQA, window 256, MLP 3x, 259 byte
# ids) with RecurrentGemma's conventions
HF_CONFIG = dict(num_hidden_layers=6, vocab_size=259, hidden_size=256, intermediate_size=2 * 768,
                 num_attention_heads=4, num_key_value_heads=1, lru_width=256, attention_window_size=256,
                 bos_token_id=256, eos_token_id=257, pad_token_id=258)


def byte_tokenizer_json(path: str) -> None:
    """A `transformers` tokenizer with griffinlm's byte ids (byte b -> b, BOS 256, EOS 257, PAD 258)
    that prepends BOS, saved in directory `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-ins for the 256 byte values (the ByteLevel pre-tokenizer's alphabet)
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)} | {"<bos>": 256, "<eos>": 257, "<pad>": 258}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(path)


def stdlib_text(nbytes: int) -> str:
    """ASCII text from the standard library's source files, in a fixed order."""
    root = os.path.dirname(os.__file__)
    out, size = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, encoding="utf-8", errors="ignore") as f:
            text = "".join(c for c in f.read() if c.isascii())
        out.append(text)
        size += len(text)
        if size >= nbytes:
            break
    return "".join(out)[:nbytes]


def requests(n_ll: int, n_roll: int, n_gen: int):
    from lm_eval.api.instance import Instance

    text = stdlib_text(max(n_ll * 300, n_roll * 2100, n_gen * 200) + 4096)
    ll = [Instance("loglikelihood", {}, (text[i * 300:i * 300 + 256], text[i * 300 + 256:i * 300 + 272]), 0,
                   ("bench", i, 1)) for i in range(n_ll)]
    roll = [Instance("loglikelihood_rolling", {}, (text[i * 2100:i * 2100 + 2048],), 0, ("bench", i, 1))
            for i in range(n_roll)]
    kwargs = {"until": ["\x01\x02"], "max_gen_toks": 64, "do_sample": False}
    gen = [Instance("generate_until", {}, (text[i * 200:i * 200 + 128], dict(kwargs)), 0, ("bench", i, 1))
           for i in range(n_gen)]
    mc = [Instance("loglikelihood", {}, (text[i * 300:i * 300 + 256], text[i * 300 + 256 + 40 * k:i * 300 + 272 + 40 * k]),
                   k, ("bench", i, 1)) for i in range(n_ll // 4) for k in range(4)]
    return ll, mc, roll, gen


def timed(fn, repeats: int):
    """(best seconds, result of the last run) over `repeats` runs after one warm-up."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import lm_eval.models.huggingface as hf_models  # the harness's hf model (needs accelerate)

    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    from griffinlm.evaluate.cli import set_threads
    from griffinlm.evaluate.lm_eval_adapter import lm_eval_model_class
    from griffinlm.interop.convert import convert_from_hf

    set_threads(args.threads)
    torch.manual_seed(0)
    hf_model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**HF_CONFIG)).eval()
    tmp = tempfile.mkdtemp(prefix="griffinlm-lm-eval-bench-")
    hf_dir, ours_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "ours")
    hf_model.save_pretrained(hf_dir)
    byte_tokenizer_json(hf_dir)
    convert_from_hf(hf_dir, ours_dir)
    n_ll, n_roll, n_gen = (32, 4, 8) if args.quick else (256, 16, 32)
    ll, mc, roll, gen = requests(n_ll, n_roll, n_gen)

    Ours = lm_eval_model_class()

    def ours(batch):
        return Ours(pretrained=ours_dir, device="cpu", batch_size=batch, dtype="fp32")

    def hf(batch):
        return hf_models.HFLM(pretrained=hf_dir, device="cpu", batch_size=batch, dtype="float32")

    # same computation first
    a, b = ours(32), hf(32)
    got, want = (lm.loglikelihood(ll[:16] + mc[:16], disable_tqdm=True) for lm in (a, b))
    diff = max(abs(x[0] - y[0]) for x, y in zip(got, want))
    if diff > 1e-3 or [x[1] for x in got] != [y[1] for y in want]:
        sys.exit(f"loglikelihoods differ (max {diff:.2e} nats): the models do not compute the same thing")
    g_ours = a.generate_until(gen[:4], disable_tqdm=True)
    g_hf = b.generate_until(gen[:4], disable_tqdm=True)
    if g_ours != g_hf:
        sys.exit(f"greedy continuations differ: {g_ours!r} vs {g_hf!r}")

    rows = []

    def compare(name, unit, work, make, call, batch):
        lm_a, lm_b = make[0](batch), make[1](batch)
        t_a, _ = timed(lambda: call(lm_a), args.repeats)
        t_b, _ = timed(lambda: call(lm_b), args.repeats)
        rows.append({"request": name, "batch": batch, "unit": unit, "griffinlm": work / t_a, "hf": work / t_b,
                     "ratio": t_b / t_a})
        print(f"{name:<24} batch {batch:>2}: griffinlm {work / t_a:10.1f} {unit}   hf {work / t_b:10.1f} {unit}   "
              f"ratio {t_b / t_a:5.2f}x", flush=True)

    makers = (ours, hf)
    compare("loglikelihood", "req/s", len(ll), makers, lambda lm: lm.loglikelihood(ll, disable_tqdm=True), 1)
    compare("loglikelihood", "req/s", len(ll), makers, lambda lm: lm.loglikelihood(ll, disable_tqdm=True), 32)
    compare("loglikelihood 4-choice", "req/s", len(mc), makers, lambda lm: lm.loglikelihood(mc, disable_tqdm=True), 32)
    roll_tokens = sum(len(r.args[0]) for r in roll)
    compare("loglikelihood_rolling", "tok/s", roll_tokens, makers,
            lambda lm: lm.loglikelihood_rolling(roll, disable_tqdm=True), 8)
    gen_tokens = 64 * len(gen)
    compare("generate_until", "tok/s", gen_tokens, makers, lambda lm: lm.generate_until(gen, disable_tqdm=True), 32)
    cpu = f"{platform.processor() or platform.machine()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    print(f"model griffin-tiny (RecurrentGemma conventions), {args.threads} threads, fp32; {cpu}; torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "griffin-tiny", "threads": args.threads, "cpu": cpu, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
