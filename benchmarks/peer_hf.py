"""griffinlm vs `transformers` RecurrentGemma: the same random weights, the same CPU, the same run.

Measures forward tokens/s (T = 256, 1024, 4096), training-step tokens/s (T = 2048: forward,
cross-entropy, backward, AdamW step) and greedy-decode tokens/s, batch 1, fp32, and checks on
the way that both give the same logits and the same greedy tokens. Where the CPU has native bf16,
also the training step under CPU bf16 autocast (ours against `transformers` in fp32 and in bf16).

Bounds from the same run (`gemm.peak_rates`: the best fp32 GEMM backend, and bf16): the forward's
GEMM efficiency at the longest T (FLOPs / profiled GEMM time, against the best fp32 rate) and the
training steps' MFU (6 x params x tokens/s + attention, against the best fp32 and the bf16 rate).

    python benchmarks/peer_hf.py [--quick] [--json out.json]

Default model: the 19.3M-parameter configuration (width 512, 6 layers R,R,A, 4 heads, MQA,
lru 512, window 512, GeGLU 3x, vocab 256).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time

import sys

import torch
import torch.nn.functional as F

from griffinlm.interop import load_recurrentgemma

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm import peak_rates, profile_gemms  # noqa: E402

HF_CONFIG = dict(num_hidden_layers=6, vocab_size=256, hidden_size=512, intermediate_size=2 * 1536,
                 num_attention_heads=4, num_key_value_heads=1, lru_width=512, attention_window_size=512,
                 block_types=["recurrent", "recurrent", "attention"])


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_pair(fn_a, fn_b, repeats: int, warmup: int = 1, clock: str = "wall") -> tuple[float, float]:
    """Best seconds of `fn_a()` and of `fn_b()` over `repeats` interleaved runs (a, b, a, b, ...)
    after `warmup` runs of each: interleaving and taking the minimum keep the ratio fair when
    other processes load the machine. clock "cpu" counts this process's CPU time (all threads),
    which waiting for a busy CPU does not inflate."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn_a()
        fn_b()
    best_a = best_b = float("inf")
    for _ in range(repeats):
        t0 = now()
        fn_a()
        t1 = now()
        fn_b()
        t2 = now()
        best_a, best_b = min(best_a, t1 - t0), min(best_b, t2 - t1)
    return best_a, best_b


def build(seed: int = 0):
    """(transformers model, griffinlm model) holding the same random weights."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(seed)
    hf = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**HF_CONFIG)).eval()
    with torch.no_grad():  # transformers zero-initialises biases and norms: make them count
        for name, p in hf.named_parameters():
            if p.dim() < 2 or "recurrent_param" in name:
                p.add_(0.1 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_recurrentgemma(d)
    return hf, ours


def forward_fn(model, tokens: torch.Tensor, hf: bool):
    @torch.no_grad()
    def run():
        return model(tokens, use_cache=False).logits if hf else model(tokens)

    return run


def train_fn(model, tokens: torch.Tensor, hf: bool, bf16: bool = False):
    """One training step on (1, T + 1) tokens: forward, cross-entropy, backward, AdamW; with
    `bf16` the forward under CPU bf16 autocast."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        model.train()
        inputs = tokens[:, :-1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs, use_cache=False).logits if hf else model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.eval()

    return step


def decode_fn(model, prompt: torch.Tensor, new: int, hf: bool, out: dict):
    @torch.no_grad()
    def run():
        if hf:
            out["hf"] = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       attention_mask=torch.ones_like(prompt))
        else:
            out["ours"] = model.generate(prompt, new)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter sequences, one repeat (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, help="torch (and numba) threads (default: torch's default)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or process CPU time (robust on a shared machine; use with --threads 1)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import numba

            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass

    repeats = 1 if args.quick else args.repeats
    lengths = [64, 128] if args.quick else [256, 1024, 4096]
    train_T = 128 if args.quick else 2048
    new = 16 if args.quick else args.decode_tokens
    hf, ours = build()
    n_params = ours.param_count(include_embedding=True)

    check = torch.randint(0, HF_CONFIG["vocab_size"], (1, 256))
    with torch.no_grad():
        diff = (hf(check, use_cache=False).logits - ours(check)).abs().max().item()
    results: dict = {"params": n_params, "torch": torch.__version__, "transformers": transformers.__version__,
                     "threads": torch.get_num_threads(), "clock": args.clock,
                     "cpu": platform.processor() or platform.machine(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), "max_logit_diff_T256": diff,
                     "rows": []}

    def row(name: str, ours_rate: float, hf_rate: float) -> None:
        results["rows"].append({"what": name, "griffinlm": ours_rate, "transformers": hf_rate,
                                "speedup": ours_rate / hf_rate})
        print(f"{name:28s} griffinlm {ours_rate:10.0f} tok/s   transformers {hf_rate:10.0f} tok/s   "
              f"x{ours_rate / hf_rate:.2f}", flush=True)

    print(f"model: {n_params / 1e6:.1f}M params, threads {torch.get_num_threads()}, max |logit diff| {diff:.2g}")
    vocab = HF_CONFIG["vocab_size"]
    peaks = peak_rates(clock=CLOCKS[args.clock])
    results["peak_gflop_s"] = {k: v / 1e9 for k, v in peaks.items()}
    print("GEMM peaks (GFLOP/s, same run): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()), flush=True)

    def attention_train_flops(T: int) -> float:  # QK^T and AV, fwd + bwd, keys within the window
        window = HF_CONFIG["attention_window_size"]
        keys = sum(min(t + 1, window) for t in range(T))
        layers = HF_CONFIG["block_types"].count("attention") * HF_CONFIG["num_hidden_layers"] // 3
        return 3 * 4 * HF_CONFIG["hidden_size"] * keys * layers

    for T in lengths:
        tokens = torch.randint(0, vocab, (1, T))
        a, b = timed_pair(forward_fn(ours, tokens, False), forward_fn(hf, tokens, True), repeats, clock=args.clock)
        row(f"forward T={T}", T / a, T / b)
    gemm_s, gemm_flops = profile_gemms(forward_fn(ours, tokens, False))
    results["forward_gemm"] = {"T": T, "seconds": gemm_s, "gflop": gemm_flops / 1e9, "share_of_forward": gemm_s / a,
                               "rate_over_best_fp32": gemm_flops / gemm_s / peaks["fp32"]}
    print(f"  our forward at T={T}: GEMMs {gemm_s * 1e3:.0f} ms of {a * 1e3:.0f} ms, at "
          f"{gemm_flops / gemm_s / 1e9:.0f} GFLOP/s = {results['forward_gemm']['rate_over_best_fp32']:.0%} of the "
          f"best fp32 rate", flush=True)
    tokens = torch.randint(0, vocab, (1, train_T + 1))
    # separate copies: both start from the same weights, and training one leaves the other as is
    a, b = timed_pair(train_fn(copy.deepcopy(ours), tokens, False), train_fn(copy.deepcopy(hf), tokens, True), repeats,
                      clock=args.clock)
    row(f"train step T={train_T}", train_T / a, train_T / b)
    train_flops = 6 * ours.param_count() * train_T + attention_train_flops(train_T)
    results["train_mfu_fp32"] = train_flops / a / peaks["fp32"]
    print(f"  MFU of our fp32 step: {results['train_mfu_fp32']:.1%} of the best fp32 GEMM rate", flush=True)
    if "bf16" in peaks:
        a16, b32 = timed_pair(train_fn(copy.deepcopy(ours), tokens, False, bf16=True),
                              train_fn(copy.deepcopy(hf), tokens, True), repeats, clock=args.clock)
        row(f"train step T={train_T} bf16 vs fp32", train_T / a16, train_T / b32)
        a16, b16 = timed_pair(train_fn(copy.deepcopy(ours), tokens, False, bf16=True),
                              train_fn(copy.deepcopy(hf), tokens, True, bf16=True), repeats, clock=args.clock)
        row(f"train step T={train_T} bf16 vs bf16", train_T / a16, train_T / b16)
        results["train_mfu_bf16"] = train_flops / a16 / peaks["bf16"]
        print(f"  MFU of our bf16 step: {results['train_mfu_bf16']:.1%} of the bf16 GEMM rate "
              f"({train_flops / a16 / peaks['fp32']:.1%} of the best fp32 rate)", flush=True)
    prompt = torch.randint(0, vocab, (1, 16))
    out: dict = {}
    a, b = timed_pair(decode_fn(ours, prompt, new, False, out), decode_fn(hf, prompt, new, True, out), repeats,
                      clock=args.clock)
    same = bool(torch.equal(out["ours"], out["hf"]))
    results["greedy_tokens_identical"] = same
    row(f"greedy decode {new} tokens", new / a, new / b)
    print(f"greedy tokens identical: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
