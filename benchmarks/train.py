"""Training throughput and MFU on this machine (CPU, fp32 and bf16), with the real training step.

1. griffin-tiny vs transformer-tiny (parameter counts within 5%) at T = 2048: tokens/s of a full
   optimizer step (forward, backward, clipping, AdamW) on the built-in corpus with document
   boundaries. The two models' steps are interleaved, round after round, so both see the same
   machine load; the ratio is taken from the per-round medians.
2. Model FLOPs utilisation of the width-512, 6-layer Griffin of paper-notes.md section 4 (R R A,
   4 heads, lru 512, window 512) at T = 2048:
       MFU = (6 * non-embedding params * tokens/s + attention FLOP/s) / fp32 matmul FLOP/s,
   attention FLOPs = 3 (fwd + bwd) * 4 * width * (mean keys attended per query) per attention layer
   per token (QK^T and AV, 2 FLOPs per multiply-add, causal: only the keys actually attended), and
   the matmul rate the best fp32 GEMM rate over the model's shapes and every fp32 backend (F.linear,
   oneDNN, oneDNN prepacked: `gemm.peak_rates`) measured in the same run, interleaved with the steps
   (F.linear's own rate is reported beside it). Where the CPU has native bf16, the same model also
   trains with `dtype="bf16"` (CPU autocast: bf16 GEMMs, fp32 weights, norms, RG-LRU and loss), its
   MFU taken against the bf16 GEMM rate of the same run (and against the best fp32 rate).

Usage: python benchmarks/train.py [--rounds 5] [--batch-size 2] [--seq-len 2048] [--threads N]
                                 [--clock wall|cpu] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm import peak_rates  # noqa: E402

MFU_CONFIG = dict(vocab_size=259, width=512, depth=6, num_heads=4, lru_width=512, local_window=512,
                  block_pattern=("recurrent", "recurrent", "attention"))


def clock_fn(kind: str, threads: int):
    """Seconds elapsed: wall clock, or this process's CPU time divided by the thread count (robust
    to other processes sharing the cores; exact with one thread)."""
    if kind == "wall":
        return time.perf_counter
    return lambda: time.process_time() / threads


def attention_flops_per_token(cfg, T: int) -> float:
    """Training FLOPs per token of the attention score and value products, causal and windowed."""
    keys = cfg.attention_keys
    layers = cfg.block_types
    total = 0.0
    for kind in layers:
        if kind == "recurrent":
            continue
        window = T if kind == "global_attention" else keys
        mean_keys = sum(min(t + 1, window) for t in range(T)) / T
        total += 3 * 4 * cfg.num_heads * cfg.resolved_head_dim * mean_keys
    return total


def make_trainer(cfg, T: int, B: int, out: str, dtype: str = "fp32"):
    from griffinlm.train import TrainConfig, Trainer

    tc = TrainConfig(data="stdlib", steps=10_000, batch_size=B, seq_len=T, progress=False, tensorboard=False,
                     sample_tokens=0, eval_every=10_000, plot=False, dtype=dtype)
    return Trainer(cfg, tc, out)


def timed_step(tr, tokens: int, clock) -> float:
    t = clock()
    tr.train_step()
    return tokens / max(clock() - t, 1e-9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: all cores)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or process CPU time / threads (for a machine shared with other jobs)")
    args = p.parse_args(argv)
    if args.threads:  # numba reads its thread count when first imported
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    import torch

    from griffinlm import ModelConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = clock_fn(args.clock, torch.get_num_threads())
    T, B = args.seq_len, args.batch_size
    tokens = T * B
    tmp = tempfile.mkdtemp(prefix="griffinlm-bench-")
    cfgs = {"griffin-tiny": ModelConfig.preset("griffin-tiny"),
            "transformer-tiny": ModelConfig.preset("transformer-tiny"),
            "griffin-512x6": ModelConfig(**MFU_CONFIG)}
    trainers = {name: make_trainer(c, T, B, os.path.join(tmp, name)) for name, c in cfgs.items()}
    from griffinlm.ops.gemm_backend import native_bf16

    if native_bf16():
        trainers["griffin-512x6 bf16"] = make_trainer(cfgs["griffin-512x6"], T, B, os.path.join(tmp, "bf16"), "bf16")
    for tr in trainers.values():  # warm-up: JIT compiles, allocator, caches
        tr.train_step()
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    peaks: list[dict[str, float]] = []
    for r in range(args.rounds):
        for name, tr in trainers.items():
            rates[name].append(timed_step(tr, tokens, clock))
        peaks.append(peak_rates(clock=clock))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.0f} tok/s" for n, v in rates.items())
              + ", GEMM " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks[-1].items()) + " GFLOP/s",
              file=sys.stderr)
    gemm = [p["fp32"] for p in peaks]
    ratios = [g / t for g, t in zip(rates["griffin-tiny"], rates["transformer-tiny"])]
    mfu_model = trainers["griffin-512x6"].model
    n_params = mfu_model.param_count()
    flops_per_token = 6 * n_params + attention_flops_per_token(cfgs["griffin-512x6"], T)
    peak = max(gemm)
    mfu_rounds = [flops_per_token * v / g for v, g in zip(rates["griffin-512x6"], gemm)]
    res = {
        "seq_len": T, "batch_size": B, "threads": torch.get_num_threads(), "clock": args.clock,
        "torch": torch.__version__,
        "params": {n: tr.model.param_count() for n, tr in trainers.items()},
        "tokens_per_s_median": {n: statistics.median(v) for n, v in rates.items()},
        "tokens_per_s_best": {n: max(v) for n, v in rates.items()},
        "griffin_over_transformer_median": statistics.median(ratios),
        "griffin_over_transformer_best": max(rates["griffin-tiny"]) / max(rates["transformer-tiny"]),
        "matmul_gflops_best": peak / 1e9, "matmul_gflops_median": statistics.median(gemm) / 1e9,
        "mfu_flops_per_token": flops_per_token,
        "mfu_best": flops_per_token * max(rates["griffin-512x6"]) / peak,
        "mfu_median_same_round": statistics.median(mfu_rounds),
        "matmul_gflops_best_by_backend": {k: max(p[k] for p in peaks) / 1e9 for k in peaks[0]},
        "mfu_best_vs_f_linear_rate": flops_per_token * max(rates["griffin-512x6"])
        / max(p["fp32 F.linear"] for p in peaks),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if "griffin-512x6 bf16" in rates:
        bf16_peak = max(p["bf16"] for p in peaks)
        res["mfu_bf16_best_vs_bf16_rate"] = flops_per_token * max(rates["griffin-512x6 bf16"]) / bf16_peak
        res["mfu_bf16_best_vs_fp32_rate"] = flops_per_token * max(rates["griffin-512x6 bf16"]) / peak
        res["bf16_over_fp32_median"] = statistics.median(
            [a / b for a, b in zip(rates["griffin-512x6 bf16"], rates["griffin-512x6"])])
    print("\n| model | non-embedding params | tokens/s (median) | tokens/s (best) |\n|---|---|---|---|")
    for n in trainers:
        print(f"| {n} | {res['params'][n]:,} | {res['tokens_per_s_median'][n]:.0f} | {res['tokens_per_s_best'][n]:.0f} |")
    print(f"\ngriffin-tiny / transformer-tiny at T={T}: {res['griffin_over_transformer_median']:.2f}x (median of "
          f"per-round ratios), {res['griffin_over_transformer_best']:.2f}x (best vs best)")
    print(f"GEMM best GFLOP/s (CPU capability {res['cpu_capability']}): " + ", ".join(
        f"{k} {v:.0f}" for k, v in res["matmul_gflops_best_by_backend"].items())
        + f"; best fp32 median over rounds {res['matmul_gflops_median']:.0f}")
    print(f"MFU griffin-512x6 at T={T}: {res['mfu_best']:.1%} (best step / best fp32 GEMM), "
          f"{res['mfu_median_same_round']:.1%} (median of same-round ratios), "
          f"{res['mfu_best_vs_f_linear_rate']:.1%} against F.linear's rate alone; "
          f"{flops_per_token / 1e6:.1f} MFLOP/token")
    if "mfu_bf16_best_vs_bf16_rate" in res:
        print(f"bf16 griffin-512x6: {res['bf16_over_fp32_median']:.2f}x the fp32 tokens/s (median of same-round "
              f"ratios); MFU {res['mfu_bf16_best_vs_bf16_rate']:.1%} of the bf16 GEMM rate, "
              f"{res['mfu_bf16_best_vs_fp32_rate']:.1%} of the best fp32 rate")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
