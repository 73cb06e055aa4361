"""Decode step time of weight-only quantized models (`griffinlm.quantize`) against fp32, same run.

The width-512, 6-layer Griffin of BENCHMARKS.md (random weights) as fp32, int8 and bf16 copies;
for each batch, a pool of that many slots at --length tokens, `model.step` timed in --repeats rounds;
each round runs --block consecutive steps of each model in turn and keeps all but the first two
(median over the kept steps). Consecutive steps, because that is how a model decodes: stepping the
three models one step each in turn would start every step with the other two models' weights in
the caches, which hides exactly what smaller weights buy (the int8 model's 19 MB stay in the L3
cache between its own steps). Quality is measured separately with `griffinlm eval --quantize`.

    python benchmarks/quantize.py [--batches 1 4 16 64] [--repeats 10] [--block 10] [--width 512 --depth 6]
    python benchmarks/quantize.py --preset griffin-100m     # weights no longer fit in the caches
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--repeats", type=int, default=10, help="rounds (each: --block steps per model)")
    p.add_argument("--block", type=int, default=10, help="consecutive steps per model per round (>= 3)")
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default=None, help="a model preset (e.g. griffin-100m) instead of --width/--depth")
    args = p.parse_args(argv)
    import torch

    from griffinlm import LanguageModel, ModelConfig
    from griffinlm.quantize import quantize_

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset, vocab_size=256) if args.preset else ModelConfig(
        vocab_size=256, width=args.width, depth=args.depth, num_heads=args.width // 128, lru_width=args.width,
        local_window=512)
    base = LanguageModel(cfg).eval()
    models = {"fp32": base, "int8": quantize_(copy.deepcopy(base), "int8"),
              "bf16": quantize_(copy.deepcopy(base), "bf16")}
    print(f"{args.preset or 'griffin'} width {cfg.width}, depth {cfg.depth}, "
          f"{base.param_count(include_embedding=True) / 1e6:.1f}M "
          f"params; CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
          f"{args.threads} threads; median over {args.repeats} rounds of {args.block} consecutive steps per model "
          f"(the first 2 of each block dropped), pool at {args.length} tokens\n")
    print("| batch | fp32 ms | int8 ms | bf16 ms | int8 speed-up | bf16 speed-up |\n|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for B in args.batches:
            caches = {k: m.init_cache(B, max_length=args.length + 8) for k, m in models.items()}
            prompt = torch.randint(0, 256, (B, args.length))
            for k, m in models.items():
                m(prompt, cache=caches[k])
            tok, slots = torch.randint(0, 256, (B,)), torch.arange(B)
            times = {k: [] for k in models}
            for r in range(args.repeats + 1):
                for k, m in models.items():
                    for i in range(max(3, args.block)):
                        caches[k].positions.fill_(args.length)
                        t0 = time.perf_counter()
                        m.step(tok, caches[k], slots)
                        # round 0 warms up (JIT, oneDNN choices, weight copies); the first two steps of
                        # a block bring the model's weights back into the caches
                        if r > 0 and i >= 2:
                            times[k].append(time.perf_counter() - t0)
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            print(f"| {B} | {ms['fp32']:.2f} | {ms['int8']:.2f} | {ms['bf16']:.2f} | {ms['fp32'] / ms['int8']:.2f}x | "
                  f"{ms['fp32'] / ms['bf16']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
