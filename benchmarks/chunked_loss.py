"""Peak memory of the training loss, forward + backward: the old whole-logits path against the
chunked tied cross-entropy (issue 20, item 5; goal: at most 1/8 of the old peak at T = 4096
with a 256k vocabulary).

    python benchmarks/chunked_loss.py                       # T 4096, vocab 256000, width 64, fp32
    python benchmarks/chunked_loss.py --tokens 1024 --soft-cap 30

Each variant runs in a fresh subprocess. Inputs (the residual stream x and the embedding) are
built first; then the process's resident-set high-water mark is reset (/proc/self/clear_refs)
and the loss runs forward and backward; the peak is VmHWM minus the RSS before the loss.
tracemalloc does not see torch's allocations, hence RSS. The old path is what the training
step ran: the final norm and the tied output layer into (B, T, V) logits
(`ops.logits_reference`), then `masked_nats` (fp32 copy, cross-entropy saving the
log-softmax). The new one: the final norm, then `ops.loss.tied_cross_entropy`. Its (B, T, V)
fp32 tensors need about 4 x T x V x 4 bytes (16 GiB at the defaults): the script refuses to
start the old variant when MemAvailable is below 1.25 x that.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def child(variant: str, tokens: int, vocab: int, width: int, soft_cap: float | None) -> dict:
    """One variant's peak RSS above its inputs (bytes) and wall time, in this process."""
    import torch

    from griffinlm.data import Batch
    from griffinlm.ops import logits_reference, rms_norm
    from griffinlm.ops.loss import tied_cross_entropy
    from griffinlm.train.step import masked_nats

    torch.manual_seed(0)
    x = torch.randn(1, tokens, width, requires_grad=True)  # (B, T, D) residual stream
    embedding = (torch.randn(vocab, width) / width**0.5).requires_grad_()  # (V, D)
    norm = (torch.ones(width, requires_grad=True), 1e-6, False)
    targets = torch.randint(0, vocab, (1, tokens))
    batch = Batch(targets, targets, torch.arange(tokens)[None], torch.ones(1, tokens, dtype=torch.bool), 0.0)
    # Fault the gradients' pages in before the baseline: both variants write these two anyway.
    x.grad, embedding.grad = torch.zeros_like(x), torch.zeros_like(embedding)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    if variant == "old":
        loss = masked_nats(logits_reference(x, norm, embedding, soft_cap), batch)
    else:
        loss = tied_cross_entropy(rms_norm(x, *norm), embedding, batch.targets, batch.loss_mask, soft_cap)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"variant": variant, "peak_bytes": (_rss_kib("VmHWM") - base) * 1024, "seconds": seconds,
            "loss": float(loss)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="B x T tokens (B = 1)")
    p.add_argument("--vocab", type=int, default=256000, help="vocabulary (RecurrentGemma: 256000)")
    p.add_argument("--width", type=int, default=64, help="model width D")
    p.add_argument("--soft-cap", type=float, default=None, help="logits soft-cap (RecurrentGemma: 30)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=("old", "chunked"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.tokens, args.vocab, args.width, args.soft_cap)))
        return 0

    import torch

    need = 4 * args.tokens * args.vocab * 4
    results = {}
    for variant in ("chunked", "old"):
        if variant == "old" and _mem_available_bytes() < 1.25 * need:
            print(f"old path needs about {need / 2**30:.1f} GiB; only {_mem_available_bytes() / 2**30:.1f} GiB "
                  "available: lower --tokens", file=sys.stderr)
            return 1
        cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--vocab",
               str(args.vocab), "--width", str(args.width), "--threads", str(args.threads)]
        if args.soft_cap is not None:
            cmd += ["--soft-cap", str(args.soft_cap)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    old, new = results["old"], results["chunked"]
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads; T={args.tokens} V={args.vocab} D={args.width} soft_cap={args.soft_cap} fp32")
    for r in (old, new):
        print(f"  {r['variant']:8s} peak {r['peak_bytes'] / 2**20:9.1f} MiB  {r['seconds']:6.2f} s  loss {r['loss']:.6g}")
    print(f"  chunked / old peak: {new['peak_bytes'] / old['peak_bytes']:.4f} "
          f"(goal <= {1 / 8:.3f}); one fp32 (T, V) tensor is {args.tokens * args.vocab * 4 / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
