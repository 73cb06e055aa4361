"""Training throughput and MFU on this machine (CPU, fp32), with the real training step.

1. griffin-tiny vs transformer-tiny (parameter counts within 5%) at T = 2048: tokens/s of a full
   optimizer step (forward, backward, clipping, AdamW) on the built-in corpus with document
   boundaries. The two models' steps are interleaved, round after round, so both see the same
   machine load; the ratio is taken from the per-round medians.
2. Model FLOPs utilisation of the width-512, 6-layer Griffin of paper-notes.md section 4 (R R A,
   4 heads, lru 512, window 512) at T = 2048:
       MFU = (6 * non-embedding params * tokens/s + attention FLOP/s) / fp32 matmul FLOP/s,
   attention FLOPs = 3 (fwd + bwd) * 4 * width * (mean keys attended per query) per attention layer
   per token (QK^T and AV, 2 FLOPs per multiply-add, causal: only the keys actually attended), and
   the matmul rate the best of large fp32 GEMMs measured in the same run, interleaved with the steps.

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

MFU_CONFIG = dict(vocab_size=259, width=512, depth=6, num_heads=4, lru_width=512, local_window=512,
                  block_pattern=("recurrent", "recurrent", "attention"))


def clock_fn(kind: str, threads: int):
    """Seconds elapsed: wall clock, or this process's CPU time divided by the thread count (robust
    to other processes sharing the cores; exact with one thread)."""
    if kind == "wall":
        return time.perf_counter
    return lambda: time.process_time() / threads


def matmul_rate(clock, shapes=((4096, 1024, 1024), (4096, 512, 1536), (4096, 1536, 512)), repeats: int = 5) -> float:
    """Best fp32 GEMM rate over a few shapes like the model's, in FLOP/s."""
    import torch

    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        for _ in range(repeats):
            t = clock()
            a @ b
            best = max(best, 2 * m * k * n / max(clock() - t, 1e-9))
    return best


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


def make_trainer(cfg, T: int, B: int, out: str):
    from griffinlm.train import TrainConfig, Trainer

    tc = TrainConfig(data="stdlib", steps=10_000, batch_size=B, seq_len=T, progress=False, tensorboard=False,
                     sample_tokens=0, eval_every=10_000, plot=False)
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
    for tr in trainers.values():  # warm-up: JIT compiles, allocator, caches
        tr.train_step()
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    gemm: list[float] = []
    for r in range(args.rounds):
        for name, tr in trainers.items():
            rates[name].append(timed_step(tr, tokens, clock))
        gemm.append(matmul_rate(clock))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.0f} tok/s" for n, v in rates.items())
              + f", GEMM {gemm[-1] / 1e9:.0f} GFLOP/s", file=sys.stderr)
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
    }
    print(f"\n| model | non-embedding params | tokens/s (median) | tokens/s (best) |\n|---|---|---|---|")
    for n in trainers:
        print(f"| {n} | {res['params'][n]:,} | {res['tokens_per_s_median'][n]:.0f} | {res['tokens_per_s_best'][n]:.0f} |")
    print(f"\ngriffin-tiny / transformer-tiny at T={T}: {res['griffin_over_transformer_median']:.2f}x (median of "
          f"per-round ratios), {res['griffin_over_transformer_best']:.2f}x (best vs best)")
    print(f"fp32 GEMM: best {res['matmul_gflops_best']:.0f} GFLOP/s, median {res['matmul_gflops_median']:.0f}")
    print(f"MFU griffin-512x6 at T={T}: {res['mfu_best']:.1%} (best step / best GEMM), "
          f"{res['mfu_median_same_round']:.1%} (median of same-round ratios); "
          f"{flops_per_token / 1e6:.1f} MFLOP/token")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
