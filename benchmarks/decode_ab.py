"""Paired A/B of the decoding step and of generate() against another checkout of griffinlm.

Both packages are imported into one process (the baseline under the module name `griffinlm_base`)
and built with the same seed; their steps alternate call by call, so both see the same machine
(a shared host drifts by tens of percent between minutes). A baseline from before the slot pool
(`model.decode_step(tokens, cache)`) is driven through that API, a newer one through
`model.step(tokens, cache, slots)`.

    git worktree add /tmp/base <commit>            # e.g. the commit before a change
    python benchmarks/decode_ab.py --baseline /tmp/base

(numba's on-disk cache records module names and the baseline's kernels compile under the renamed
package, so the script uses its own NUMBA_CACHE_DIR unless one is set.) Prints, per architecture and batch, the median
step time of each and new / baseline, then the median time per generated token of
`model.generate_stream(prompt, 49)` (prompt 256, batch 1) after its first token (the prefill untimed).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "griffinlm-decode-ab-numba"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERNS = {"transformer": ("global_attention",), "hawk": ("recurrent",),
            "griffin": ("recurrent", "recurrent", "attention")}


def load(name: str, root: str):
    """The griffinlm package under `root`/src, imported as module `name`."""
    pkg = os.path.join(root, "src", "griffinlm")
    spec = importlib.util.spec_from_file_location(name, os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def build(g, arch: str, args):
    import torch

    torch.manual_seed(0)
    cfg = g.ModelConfig(vocab_size=256, width=args.width, depth=args.depth, num_heads=args.width // 128,
                        lru_width=args.width, local_window=args.window, block_pattern=PATTERNS[arch])
    return g.LanguageModel(cfg).eval()


def stepper(model, B: int, length: int):
    """A zero-argument call that advances a B-slot cache at `length` tokens by one token."""
    import torch

    cache = model.init_cache(B, max_length=length + 4096)
    model(torch.randint(0, 256, (B, length)), cache=cache)
    tok, slots = torch.randint(0, 256, (B,)), torch.arange(B)
    if hasattr(model, "step"):
        return lambda: model.step(tok, cache, slots)
    return lambda: model.decode_step(tok, cache)


def paired(fns: dict, n: int) -> dict:
    """Median seconds of each call over n rounds, the order alternating every round."""
    times = {k: [] for k in fns}
    order = list(fns)
    for i in range(n):
        for k in (order if i % 2 else order[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="root of another griffinlm checkout")
    p.add_argument("--archs", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    p.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16, 64], help="none: generate() only")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--generate-rounds", type=int, default=16, help="alternating rounds of the generate() timing")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    new, base = load("griffinlm", ROOT), load("griffinlm_base", args.baseline)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
          f"{args.threads} threads; torch {torch.__version__}; width {args.width}, depth {args.depth}, "
          f"window {args.window}, cache at {args.length} tokens; median of {args.steps} alternating calls")
    print("| arch | batch | baseline ms | this tree ms | this / baseline |\n|---|---:|---:|---:|---:|")
    for arch in args.archs:
        models = {"base": build(base, arch, args), "new": build(new, arch, args)}
        for B in args.batches:
            fns = {k: stepper(m, B, args.length) for k, m in models.items()}
            for f in fns.values():
                for _ in range(10):
                    f()
            t = paired(fns, args.steps)
            print(f"| {arch} | {B} | {1e3 * t['base']:.3f} | {1e3 * t['new']:.3f} | {t['new'] / t['base']:.3f} |",
                  flush=True)
    prompt = torch.randint(0, 256, (1, args.length))
    models = {"base": build(base, "griffin", args), "new": build(new, "griffin", args)}
    per_token = {k: [] for k in models}
    for m in models.values():
        m.generate(prompt, 4)
    for i in range(args.generate_rounds):
        for k in (list(models) if i % 2 else list(models)[::-1]):
            stream = models[k].generate_stream(prompt, 49)
            next(stream)  # the prefill and the first sampled token, not timed
            t0 = time.perf_counter()
            n = sum(1 for _ in stream)
            per_token[k].append((time.perf_counter() - t0) / n)
    b, n = (statistics.median(per_token[k]) for k in ("base", "new"))
    print(f"\ngriffin generate_stream(), batch 1, greedy, 48 timed tokens after the prefill: baseline "
          f"{1e3 * b:.3f} ms / token, this tree {1e3 * n:.3f} ms / token, this / baseline {n / b:.3f}")


if __name__ == "__main__":
    main()
