"""Layer-kernel benchmark: fused RG-LRU vs its torch composition; blocked vs dense local attention.

    python benchmarks/layers.py [--repeats N] [--skip-dense-16k] [--block-sweep [--backward]]

RG-LRU bound (same-run torch copy bandwidth): forward reads x, gate_r, gate_i and writes h
(4 tensors); backward reads x, gate_r, gate_i, h, g and writes dx, dgate_r, dgate_i (8).
Attention: MQA, B=1, H=8, head dim 128, window 1024, forward, blocked path forced (at
T <= window `causal_attention` itself picks SDPA is_causal); each configuration runs in a
fresh subprocess. Memory is not measured here: the blocked path allocates O(T (window +
block)) for its key blocks and a mask of the first window's blocks only (a (T, window + block)
one with documents), the dense one a (T, T) mask. `--block-sweep` times the blocked path's
query block length over windows and head counts, all blocks interleaved in one process, forward
only or (`--backward`) forward + backward on training shapes (the block lengths in
`griffinlm/ops/attention/__init__.py` were chosen from it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from griffinlm.ops import causal_attention, rglru
from scan import best_time, copy_seconds  # sibling script: the same timer and copy-bandwidth probe


def bench_rglru(B: int, T: int, D: int, repeats: int) -> None:
    leaves = [torch.randn(B, T, D, requires_grad=True) for _ in range(3)]
    log_a = (-0.05 * torch.rand(D)).requires_grad_()
    g = torch.randn(B, T, D)
    nbytes = B * T * D * 4
    print(f"\n### RG-LRU B={B} T={T} D={D} fp32\n")
    print("| implementation | copy GB/s | fwd ms | fwd % of bound | fwd+bwd ms | fwd+bwd % of bound |")
    print("|---|---|---|---|---|---|")
    for impl in ("fused", "composed"):
        def fwd():
            with torch.no_grad():
                rglru(*leaves, log_a, impl=impl)

        def fwd_bwd():
            torch.autograd.grad(rglru(*leaves, log_a, impl=impl)[0], (*leaves, log_a), g)  # no .grad accumulation

        reps = repeats if impl == "fused" else max(2, repeats // 3)
        bw = 2 * nbytes / copy_seconds(B, T, D, repeats)
        tf, tfb = best_time(fwd, reps), best_time(fwd_bwd, reps)
        print(f"| {impl} | {bw / 1e9:.1f} | {tf * 1e3:.1f} | {100 * 4 * nbytes / bw / tf:.0f}% | "
              f"{tfb * 1e3:.1f} | {100 * 12 * nbytes / bw / tfb:.0f}% |")


def attention_child(impl: str, T: int, repeats: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 8, T, 128)
    k, v = torch.randn(1, 1, T, 128), torch.randn(1, 1, T, 128)
    t = best_time(lambda: causal_attention(q, k, v, 1024, impl=impl), repeats)
    print(json.dumps(dict(seconds=t)))


def bench_attention(repeats: int, skip_dense_16k: bool) -> None:
    print("\n### Local attention (window 1024, MQA, B=1, H=8, hd=128), forward\n")
    print("| T | blocked ms | dense masked ms | speedup |")
    print("|---|---|---|---|")
    for T in (1024, 4096, 16384):
        res = {}
        for impl in ("blocked", "dense"):
            if impl == "dense" and T == 16384 and skip_dense_16k:
                continue
            reps = repeats if T < 16384 else 2
            out = subprocess.run([sys.executable, __file__, "--child", impl, str(T), str(reps)],
                                 capture_output=True, text=True, check=True).stdout
            res[impl] = json.loads(out.strip().splitlines()[-1])
        b, d = res["blocked"], res.get("dense")
        dense_ms = f"{d['seconds'] * 1e3:.0f}" if d else "skipped"
        speed = f"{d['seconds'] / b['seconds']:.1f}x" if d else "-"
        print(f"| {T} | {b['seconds'] * 1e3:.0f} | {dense_ms} | {speed} |")


FORWARD_SWEEP = [(1, 2048, 4, 1, 128, 128), (1, 4096, 4, 1, 512, 128), (1, 4096, 8, 1, 1024, 128),
                 (1, 16384, 8, 1, 1024, 128), (1, 8192, 8, 1, 2048, 128), (1, 4096, 4, 4, 512, 128),
                 (1, 4096, 8, 8, 1024, 128), (1, 4096, 8, 2, 1024, 128)]
# Training shapes: benchmarks/train.py's and finetune.py's width-512 Griffin (B=2, T=1024, window 512),
# griffin-tiny (head dim 64, window 256), a short window, long windows and more kv heads.
BACKWARD_SWEEP = [(2, 1024, 4, 1, 512, 128), (1, 2048, 4, 1, 1024, 128), (4, 512, 4, 1, 256, 64),
                  (2, 2048, 4, 1, 128, 128), (1, 4096, 8, 1, 2048, 128), (2, 1024, 8, 8, 512, 64),
                  (1, 2048, 8, 2, 1024, 128)]


def bench_block_sweep(repeats: int, backward: bool) -> None:
    blocks = (32, 64, 128, 256)
    what = "forward + backward (torch.autograd.grad)" if backward else "forward"
    print(f"\n### Blocked local attention: query block length, {what} ms\n")
    print("| B | T | heads | kv heads | window | head dim | " + " | ".join(f"block {b}" for b in blocks) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(blocks))
    for B, T, H, Hkv, W, hd in BACKWARD_SWEEP if backward else FORWARD_SWEEP:
        q = torch.randn(B, H, T, hd, requires_grad=backward)
        k, v = (torch.randn(B, Hkv, T, hd, requires_grad=backward) for _ in range(2))
        g = torch.randn(B, H, T, hd)

        def run(b: int) -> None:
            out = causal_attention(q, k, v, W, block=b, impl="blocked")
            if backward:
                torch.autograd.grad(out, (q, k, v), g)

        best = {b: float("inf") for b in blocks}
        for _ in range(repeats):  # interleaved: the host's speed drifts between consecutive timings
            for b in blocks:
                best[b] = min(best[b], best_time(lambda: run(b), 1))
        top = min(best.values())
        cells = " | ".join(f"**{best[b] * 1e3:.1f}**" if best[b] == top else f"{best[b] * 1e3:.1f}" for b in blocks)
        print(f"| {B} | {T} | {H} | {Hkv} | {W} | {hd} | {cells} |", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        attention_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-dense-16k", action="store_true")
    p.add_argument("--block-sweep", action="store_true", help="only the attention block-length sweep")
    p.add_argument("--backward", action="store_true", help="with --block-sweep: time forward + backward")
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.block_sweep:
        bench_block_sweep(args.repeats, args.backward)
        return
    for B, T, D in [(4, 4096, 1024), (4, 512, 2560)]:
        bench_rglru(B, T, D, args.repeats)
    bench_attention(args.repeats, args.skip_dense_16k)


if __name__ == "__main__":
    main()
