"""Decoding speed of the MQA Transformer, Hawk and Griffin, and against `transformers`' RecurrentGemma.

For each architecture (same width and depth, parameter counts within 10%), batch size and
sample length L, it measures:
  - prefill tokens/s (a real prefill of B x L random tokens, where B * L <= --prefill-max-tokens),
  - decode tokens/s and per-token latency (median, p90) over --steps one-token steps
    (`model.step(tokens, cache, slots)` over all B slots of the pool) taken from a cache at length L,
  - the bytes of the cache.
Where the prefill is skipped (B * L too large for this CPU), the cache is filled synthetically to
length L: random keys/values/states and every slot's position set to L. A step's work does not
depend on the values in the cache, only on its length, so the decode timings are those of a real cache.

Then `transformers`' RecurrentGemma against griffinlm with identical shapes and the same random
weights (loaded through griffinlm.interop): `generate()` vs `generate()`, greedy, decode tokens/s
= (time of prompt + N tokens - time of prompt + 1 token) / (N - 1), interleaved runs, best of
--repeats; the greedy tokens are checked equal on the way.

`--long N` instead runs one N-token Griffin generation (batch 1, sampling) through the same step,
checking every logit is finite and recording the process memory as it goes.

The decode step against this machine's GEMM and bandwidth bound is `benchmarks/decode_bound.py`;
its latest tables are rendered into the same BENCHMARKS.md section.

Clock: "cpu" (default) counts this process's CPU time with one
thread, which other processes on a shared machine do not inflate; "wall" counts elapsed time.

    python benchmarks/inference.py                       # full run, writes JSON, plots, BENCHMARKS.md
    python benchmarks/inference.py --quick               # small lengths, for a smoke test
    python benchmarks/inference.py --long 100000         # the long-generation check
    python benchmarks/inference.py --report-only         # re-render plots/markdown from the JSON
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
JSON_PATH = os.path.join(RESULTS, "inference.json")
LONG_PATH = os.path.join(RESULTS, "inference_long.json")
BOUND_PATH = os.path.join(RESULTS, "decode_bound.json")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PATTERNS = {"transformer": ("global_attention",), "hawk": ("recurrent",),
            "griffin": ("recurrent", "recurrent", "attention")}
# transformers' intermediate_size counts both MLP branches (2 x 1536 = our mlp_hidden 1536).


def model_config(arch: str, args):
    from griffinlm import ModelConfig

    return ModelConfig(vocab_size=256, width=args.width, depth=args.depth, num_heads=args.width // 128,
                       lru_width=args.width, local_window=args.window, block_pattern=PATTERNS[arch])


def fill_cache(cache, length: int, gen) -> None:
    """Put the cache at `length` tokens with random contents (timing depends on length only)."""
    import torch

    for c in cache.blocks:
        for t in c.tensors().values():  # RecurrentCache (conv, rnn) or AttentionCache (k, v)
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))
    cache.positions.fill_(length)  # every slot holds `length` tokens of one document
    cache.doc_start.zero_()


@contextlib.contextmanager
def torch_ops_only(enable: bool = True):
    """Within: every decode step as torch ops (no fused numba kernels, `griffinlm.ops.decode_step.
    references_only()`)."""
    from griffinlm.ops import decode_step as ops_step

    with ops_step.references_only() if enable else contextlib.nullcontext():
        yield


def bench_arch(arch: str, args, now) -> list[dict]:
    import torch

    from griffinlm import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(model_config(arch, args)).eval()
    if args.compile:
        model.compile_decode_step()
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        warm = model.init_cache(1, max_length=128)  # JIT kernels (numba scan) outside the timings
        model(torch.randint(0, 256, (1, 64)), cache=warm)
        for _ in range(3):
            model.step(torch.tensor([1]), warm, torch.tensor([0]))
        for B in args.batches:
            slots = torch.arange(B)  # the step advances every slot of the pool
            caches, toks, prefills = {}, {}, {}
            for L in args.lengths:
                cache = model.init_cache(B, max_length=L + args.warmup + args.steps)
                prefill = None
                if B * L <= args.prefill_max_tokens:
                    tokens = torch.randint(0, 256, (B, L), generator=gen)
                    t0 = now()
                    logits, cache = model(tokens, cache=cache)
                    prefill = B * L / (now() - t0)
                    tok = logits[:, -1].argmax(-1)
                else:
                    fill_cache(cache, L, gen)
                    tok = torch.randint(0, 256, (B,), generator=gen)
                for _ in range(args.warmup):
                    tok = model.step(tok, cache, slots).argmax(-1)
                caches[L], toks[L], prefills[L] = cache, tok, prefill
            # Steps interleaved across the lengths (one step at each length in turn), so that every
            # length sees the same machine: on a shared host the speed drifts by tens of percent.
            times = {L: [] for L in args.lengths}
            for _ in range(args.steps):
                for L in args.lengths:
                    t0 = now()
                    toks[L] = model.step(toks[L], caches[L], slots).argmax(-1)
                    times[L].append(now() - t0)
            for L in args.lengths:
                ts = sorted(times[L])
                row = dict(arch=arch, batch=B, length=L, prefill_tok_s=prefills[L],
                           decode_tok_s=B / statistics.fmean(ts), latency_ms_median=1e3 * statistics.median(ts),
                           latency_ms_p90=1e3 * ts[min(len(ts) - 1, int(0.9 * len(ts)))],
                           cache_bytes=caches[L].nbytes(), real_prefill=prefills[L] is not None)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del caches
    return rows


def bench_hf(args, now) -> dict | None:
    """griffinlm vs transformers RecurrentGemma generate(), same shapes and random weights."""
    import torch

    try:
        import transformers  # noqa: F401

        from peer_hf import build  # sibling script: the same configuration and random weights
    except ImportError as e:
        print(f"skipping the transformers comparison: {e}", file=sys.stderr)
        return None
    hf, ours = build(seed=0)
    compiled = copy.deepcopy(ours) if args.hf_compile else None
    # "ours_eager": the same model with every step as torch ops (decode_step.references_only() while it runs)
    contenders = {"hf": None, "ours": ours, "ours_eager": ours}
    if compiled is not None:
        compiled.compile_decode_step()
        contenders["ours_compiled"] = compiled
    out = dict(params=ours.param_count(include_embedding=True), prompt=args.hf_prompt, new_tokens=args.hf_tokens,
               batches={})
    for B in args.batches:
        prompt = torch.randint(0, 256, (B, args.hf_prompt), generator=torch.Generator().manual_seed(B))
        mask = torch.ones_like(prompt)

        def run(name, n):
            if name == "hf":
                return hf.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            with torch_ops_only(name == "ours_eager"):
                return contenders[name].generate(prompt, n)

        with torch.no_grad():
            want = run("hf", 16)
            same = all(torch.equal(run(name, 16), want) for name in contenders if name != "hf")  # also warms up
            best = {name: [float("inf"), float("inf")] for name in contenders}
            for _ in range(args.repeats):  # interleaved, best of
                for name in contenders:
                    for i, n in enumerate((1, args.hf_tokens)):
                        t0 = now()
                        run(name, n)
                        best[name][i] = min(best[name][i], now() - t0)
        res = {name: B * (args.hf_tokens - 1) / (b[1] - b[0]) for name, b in best.items()}
        res["same_greedy_tokens"] = same
        res["ratio"] = res["ours"] / res["hf"]
        res["ratio_eager"] = res["ours_eager"] / res["hf"]
        if "ours_compiled" in res:
            res["ratio_compiled"] = res["ours_compiled"] / res["hf"]
        out["batches"][str(B)] = res
        print(json.dumps({"hf_batch": B, **res}), flush=True)
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def long_generation(args, now) -> dict:
    """One long Griffin generation, batch 1, sampling at temperature 1 through `model.step`."""
    import torch

    from griffinlm import LanguageModel
    from griffinlm.generate import sample_next

    torch.manual_seed(0)
    args.width, args.window = args.long_width, min(args.window, args.long_width)
    model = LanguageModel(model_config("griffin", args)).eval()
    if args.long_compile:
        model.compile_decode_step()
    gen = torch.Generator().manual_seed(0)
    cache = model.init_cache(1)
    slots = torch.arange(1)
    cache_bytes = cache.nbytes()
    finite = torch.ones((), dtype=torch.bool)
    marks, t0 = [], now()
    with torch.no_grad():
        logits, cache = model(torch.randint(0, 256, (1, 16), generator=gen), cache=cache)
        last = logits[:, -1]
        every = max(1, args.long // 20)
        for i in range(1, args.long + 1):
            tok = sample_next(last, 1.0, gen)
            last = model.step(tok, cache, slots)
            finite &= torch.isfinite(last).all()
            if i % every == 0:
                marks.append(dict(tokens=i, rss_mb=round(rss_mb(), 1), seconds=round(now() - t0, 2),
                                  cache_bytes=cache.nbytes()))
                print(json.dumps(marks[-1]), flush=True)
    state_finite = all(bool(torch.isfinite(t).all()) for c in cache.blocks for t in c.tensors().values())
    return dict(tokens=args.long, model=f"griffin, width {args.width}, depth {args.depth}, window {args.window}",
                compiled=args.long_compile, all_logits_finite=bool(finite), state_finite=state_finite,
                cache_bytes_start=cache_bytes, cache_bytes_end=cache.nbytes(), marks=marks,
                tok_s=args.long / (now() - t0), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# --- report ------------------------------------------------------------------------------------
def plot(results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    batches = sorted({r["batch"] for r in rows})
    paths = []
    for key, ylabel, name in (("decode_tok_s", "decode tokens/s", "inference_throughput.png"),
                              ("latency_ms_median", "per-token latency, median (ms)", "inference_latency.png")):
        fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
        for ax, B in zip(axes[0], batches):
            for arch in PATTERNS:
                pts = sorted((r["length"], r[key]) for r in rows if r["arch"] == arch and r["batch"] == B)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=arch)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sample length (tokens in the cache)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"batch {B}")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{results['model']} ({results['clock']} clock, {results['threads']} thread(s))", fontsize=9)
        fig.tight_layout()
        path = os.path.join(RESULTS, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(x, digits=0):
    return "—" if x is None else f"{x:,.{digits}f}"


DESIGN = """How decoding works (`griffinlm.cache.ModelCache`, `griffinlm.generate`): `init_cache(N)` allocates a
pool of N independent sequence slots once, every tensor with the slot as dim 0 and updated in place; each slot
keeps its own position (`cache.positions`) and document start. Per slot, a recurrent block keeps its RG-LRU state
(D_rnn, fp32) and its last 3 conv inputs; a local-attention block a ring of exactly the keys one query sees
(`local_window` entries under the paper's convention, window + 1 under RecurrentGemma's), keys stored after RoPE,
written before the query attends; a global-attention block `max_length` preallocated entries (a ValueError past
them). `model.step(tokens, cache, slots)` is the one decoding step: it advances any distinct slots by one token
each, every slot from its own position (generation steps only the rows still running); `model.prefill(tokens,
cache, slot)` appends a prompt to one slot, and `model(tokens, cache=cache)` prefills every slot in one batch
when they share a position. The step reads positions from tensors, so its shapes never change and
`torch.compile` (CUDA graphs with mode="reduce-overhead") captures it once per number of rows
(`model.compile_decode_step()`); eager global attention reads only the filled prefix of its entries, the
compiled step all of them, masked. Prompts of different lengths each prefill their own slot: no padding."""


HF_NOTE = """The default step (`model.step`) runs, on CPU in float32, at <= 6 rows (`griffinlm.ops.decode_step.MAX_BATCH`)
the fused numba ops of `griffinlm/ops/decode_step.py` (kernels in `decode_step_numba.py`, the hybrid
ones in `decode_mix_numba.py`): one op per block half
that splits each weight matrix's rows across the cores and does the block's elementwise work in the same pass,
reading and writing the stepped slots' rows of the pool in place; above 6 rows the hybrid ops: the projections as
GEMMs on `ops.linear` (prepacked oneDNN weights where that measured faster) and one numba kernel per block half for
everything between them. "torch ops only" is the same model under `decode_step.references_only()` (every op through
its torch reference). At batch 1 a step is bound by reading the model's 77 MB of fp32 weights once: eager PyTorch's
one-row `addmm` uses one core and its ~100 small ops per block cost more in dispatch than in arithmetic, which is why
eager steps (ours with torch ops only, and `transformers`') run at about the same speed. At batch 16 the step is bound
by matmul arithmetic. The batch-1 ratio moves with the shared host's speed from run to run; the history of runs is
below the section."""


def markdown(results: dict, long: dict | None) -> str:
    rows = results["rows"]
    lines = ["## Inference", "",
             f"`python benchmarks/inference.py` ({results['date']}; {results['machine']}; torch {results['torch']}; "
             f"fp32; {results['threads']} thread(s), {results['clock']} clock; decode step "
             f"{'compiled' if results['compile'] else '`model.step`, default: fused CPU kernels at batch <= 6, GEMMs + hybrid kernels above'}). "
             f"Models: {results['model']}; non-embedding parameters "
             + ", ".join(f"{a} {n / 1e6:.2f}M" for a, n in results["params"].items())
             + f". Decode: {results['steps']} timed one-token steps (after {results['warmup']} warm-up steps) from a "
             "cache at the given length, the lengths' steps interleaved. Prefill: one call on B x L random tokens where B x L <= "
             f"{results['prefill_max_tokens']:,}; beyond that (—) the cache was filled synthetically to length L "
             "(random contents; a step's work depends only on the length).", "",
             "| arch | batch | length | prefill tok/s | decode tok/s | latency median (ms) | latency p90 (ms) | cache MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["batch"], list(PATTERNS).index(r["arch"]), r["length"])):
        lines.append(f"| {r['arch']} | {r['batch']} | {r['length']:,} | {_fmt(r['prefill_tok_s'])} | "
                     f"{_fmt(r['decode_tok_s'])} | {r['latency_ms_median']:.2f} | {r['latency_ms_p90']:.2f} | "
                     f"{r['cache_bytes'] / 2**20:,.2f} |")
    lines += ["", DESIGN, "", "![decode throughput vs length](docs/results/inference_throughput.png)",
              "![per-token latency vs length](docs/results/inference_latency.png)", ""]
    get = {(r["arch"], r["batch"], r["length"]): r for r in rows}
    lo, hi = min(results["lengths"]), max(results["lengths"])
    goals = []
    for arch in ("hawk", "griffin", "transformer"):
        for B in results["batches"]:
            a, b = get.get((arch, B, lo)), get.get((arch, B, hi))
            if a and b:
                goals.append(f"{arch} batch {B}: latency {hi:,} / {lo:,} = "
                             f"{b['latency_ms_median'] / a['latency_ms_median']:.2f}x, cache {b['cache_bytes'] / a['cache_bytes']:.2f}x")
    g, t = get.get(("griffin", 16, hi)), get.get(("transformer", 16, hi))
    if g and t:
        goals.append(f"Griffin / Transformer decode tokens/s at batch 16, length {hi:,}: "
                     f"{g['decode_tok_s'] / t['decode_tok_s']:.1f}x")
    lines += ["Flatness and ratios (same process):", ""] + [f"- {s}" for s in goals] + [""]
    hf = results.get("hf")
    if hf:
        lines += [f"Against `transformers` {results.get('transformers', '')} RecurrentGemma, identical configuration "
                  f"({hf['params'] / 1e6:.1f}M parameters: width 512, 6 layers R,R,A, 4 heads MQA, lru 512, window 512, "
                  f"vocab 256; the same random weights), `generate()` greedy, prompt {hf['prompt']}, "
                  f"{hf['new_tokens']} new tokens, decode tokens/s:", "",
                  "| batch | transformers | griffinlm (default step) | ratio | griffinlm, torch ops only | ratio "
                  "| griffinlm, compiled step | ratio | same greedy tokens |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for B, r in hf["batches"].items():
            lines.append(f"| {B} | {r['hf']:,.0f} | {r['ours']:,.0f} | **{r['ratio']:.1f}x** | "
                         f"{_fmt(r.get('ours_eager'))} | {_fmt(r.get('ratio_eager'), 1)}x | {_fmt(r.get('ours_compiled'))} | "
                         f"{_fmt(r.get('ratio_compiled'), 1)}x | {r['same_greedy_tokens']} |")
        lines += ["", HF_NOTE, ""]
    if long:
        m = long["marks"]
        lines += [f"Long generation (`--long {long['tokens']}`): {long['model']}"
                  f"{', compiled step' if long['compiled'] else ''}, batch 1, sampling at temperature 1: "
                  f"{long['tok_s']:,.0f} tokens/s; every logit finite: {long['all_logits_finite']}; final state finite: "
                  f"{long['state_finite']}; cache {long['cache_bytes_start']:,} bytes at the start and "
                  f"{long['cache_bytes_end']:,} at the end; process RSS {m[0]['rss_mb']:.0f} MiB after "
                  f"{m[0]['tokens']:,} tokens, {m[-1]['rss_mb']:.0f} MiB after {m[-1]['tokens']:,}.", ""]
    if os.path.exists(BOUND_PATH):
        from decode_bound import bound_markdown  # this folder is on sys.path when run as a script

        with open(BOUND_PATH) as f:
            lines += bound_markdown(json.load(f)) + [""]
    return "\n".join(lines)


def write_section(text: str, path: str = os.path.join(ROOT, "BENCHMARKS.md")) -> None:
    """Replace (or append) the '## Inference' section of BENCHMARKS.md, leaving the rest alone."""
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    lines = old.split("\n")
    try:
        start = lines.index("## Inference")
    except ValueError:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        # The section has no sub-headings of its own: it ends at the next heading of any level.
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
        tail = "\n".join(lines[end:])
        new = "\n".join(lines[:start]) + "\n" + text.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    with open(path, "w") as f:
        f.write(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--archs", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prefill-max-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--hf-prompt", type=int, default=256)
    p.add_argument("--hf-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-hf-compile", dest="hf_compile", action="store_false",
                   help="compare with transformers in eager mode only (compiling takes ~1-2 min per batch size)")
    p.add_argument("--long", type=int, default=0, help="run the N-token Griffin generation check instead")
    p.add_argument("--long-width", type=int, default=256, help="width of the --long model (depth --depth)")
    p.add_argument("--long-compile", action="store_true",
                   help="torch.compile the --long decode step (default: the default step, fused kernels on CPU)")
    p.add_argument("--quick", action="store_true", help="lengths 64 256, 6 steps, small HF run")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print, do not write JSON/plots/BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.steps, args.warmup, args.hf_tokens, args.repeats = [64, 256], 6, 1, 8, 1
    if args.threads == 1:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, min(args.threads, os.cpu_count() or 1))))
    import torch

    torch.set_num_threads(args.threads)
    now = CLOCKS[args.clock]
    os.makedirs(RESULTS, exist_ok=True)
    if args.long:
        res = long_generation(args, now)
        print(json.dumps({k: v for k, v in res.items() if k != "marks"}))
        if not args.no_write:
            with open(LONG_PATH, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    if not args.report_only:
        from griffinlm import LanguageModel

        params = {}
        for arch in args.archs:
            with torch.device("meta"):
                params[arch] = LanguageModel(model_config(arch, args)).param_count()
        if max(params.values()) / min(params.values()) > 1.1:
            print(f"warning: parameter counts differ by more than 10%: {params}", file=sys.stderr)
        try:
            import transformers
            tv = transformers.__version__
        except ImportError:
            tv = None
        results = dict(date=time.strftime("%Y-%m-%d"), machine=f"{platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores", torch=torch.__version__, transformers=tv, threads=args.threads,
                       clock=args.clock, compile=args.compile, steps=args.steps, warmup=args.warmup,
                       prefill_max_tokens=args.prefill_max_tokens, lengths=args.lengths, batches=args.batches,
                       model=f"width {args.width}, depth {args.depth}, {args.width // 128} heads of 128 (MQA), "
                             f"lru {args.width}, window {args.window}, vocab 256", params=params, rows=[])
        for arch in args.archs:
            results["rows"] += bench_arch(arch, args, now)
        results["hf"] = None if args.no_hf else bench_hf(args, now)
        if args.no_write:
            return 0
        with open(JSON_PATH, "w") as f:
            json.dump(results, f, indent=1)
    with open(JSON_PATH) as f:
        results = json.load(f)
    long = None
    if os.path.exists(LONG_PATH):
        with open(LONG_PATH) as f:
            long = json.load(f)
    plot(results)
    write_section(markdown(results, long))
    return 0


if __name__ == "__main__":
    sys.exit(main())
