"""The Griffin decode step (`model.step`) against this machine's bound, for batch sizes 1 to 128.

How close the Griffin decode step (width --width, depth --depth: 512 and
6 by default) comes to this machine's limits. For each batch B of --batches (1 4 16 64 128),
from a pool of B slots filled to --length (256) tokens, it times `model.step`, --steps-per-repeat (4)
steps back to back as a decoding loop runs them (the step: the mean of the 2nd..; the first, cold
after the probes, is reported apart), on three paths (the default
step: streaming numba kernels at B <= ops.decode_step.MAX_BATCH, above it GEMMs on `ops.linear`'s
measured backend with hybrid kernels between; the same with every GEMM forced to F.linear,
GRIFFINLM_GEMM=mkl; and the torch-ops step, `decode_step.references_only()`) and, in the same interleaved repeats (--repeats of them, median of each), two probes:
  - GEMM: the fastest fp32 backend (F.linear, oneDNN, oneDNN prepacked: `gemm.backends`) at
    M = B rows on every distinct (out, in) weight shape of the model (the
    blocks' nn.Linear weights, the RG-LRU's block-diagonal gates as their (bw, bw) blocks and the
    tied V x D output layer), summed with each shape's multiplicity = FLOPs / GEMM rate, where
    FLOPs = 2 * B * (those weights' parameters);
  - copy: `dst.copy_(src)` of a float32 buffer 4x the weights' size; bandwidth = 2 x size / time
    (read + write counted), and the bytes term = the weights' bytes / bandwidth.
bound = max(flops term, bytes term); it ignores attention over the cache and elementwise work.
The tables (wall clock, --threads threads (2 by default), numba's included) give step ms,
bound ms, % of bound (each repeat's bound / step, median), tokens/s and the binding term; rows go to
docs/results/decode_bound.json.

    python benchmarks/decode_bound.py                 # writes docs/results/decode_bound.json
    python benchmarks/decode_bound.py --repeats 5 --no-write        # a smoke test
    python benchmarks/decode_bound.py --preset griffin-100m --repeats 11   # weights far beyond the caches
    python benchmarks/inference.py --report-only      # re-render BENCHMARKS.md with the new tables
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import statistics
import sys
import time

from gemm import backends as gemm_backends  # this folder is on sys.path
from inference import BOUND_PATH, ROOT, fill_cache, model_config, torch_ops_only  # this folder is on sys.path


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bound_config(args):
    """The Griffin of --width/--depth/--window (heads of 128, lru = width, vocab 256), or --preset's
    shape with vocab 256 (random weights: the timing depends on the shapes only)."""
    from griffinlm import ModelConfig

    return ModelConfig.preset(args.preset, vocab_size=256) if args.preset else model_config("griffin", args)


def describe(c, preset: str | None) -> str:
    """The model line of the results: `c` is the ModelConfig, `preset` its name if any."""
    hd = c.head_dim or c.width // c.num_heads
    return (f"{preset or 'griffin'}, width {c.width}, depth {c.depth}, {c.num_heads} heads of {hd} (MQA), "
            f"lru {c.lru_width or c.width}, window {c.local_window}, vocab {c.vocab_size}, float32")


def step_weights(model) -> dict:
    """The weight matrices one decode step reads per token: the blocks' nn.Linear weights, the
    RG-LRU's block-diagonal gates (H blocks of (bw, bw) each) and the tied output layer (V, D).
    Returns their (out, in) shapes with multiplicities, and parameter counts by kind."""
    import torch

    shapes: collections.Counter = collections.Counter()
    params = {"linear": 0, "block_diagonal": 0, "output_layer": 0}
    for mod in model.blocks.modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[tuple(mod.weight.shape)] += 1
            params["linear"] += mod.weight.numel()
    for name, p in model.blocks.named_parameters():
        if p.dim() == 3:  # (H, bw_in, bw_out): H independent (bw, bw) matmuls
            shapes[(p.shape[2], p.shape[1])] += p.shape[0]
            params["block_diagonal"] += p.numel()
    shapes[tuple(model.embed.weight.shape)] += 1  # logits = x @ embed.T: (V, D)
    params["output_layer"] = model.embed.weight.numel()
    return dict(shapes=shapes, params=params, total=sum(params.values()),
                element_size=model.embed.weight.element_size())


def bench_bound(args) -> dict:
    """Griffin's `model.step` at each batch against max(FLOPs / GEMM rate, weight bytes / copy
    bandwidth), every quantity measured in the same interleaved repeats (median of each)."""
    import torch

    from griffinlm import LanguageModel
    from griffinlm.ops import decode_step as ops_step
    from griffinlm.ops.gemm_backend import force as force_gemm

    now = time.perf_counter  # wall clock: the bound is a rate of the whole machine (all threads)
    torch.manual_seed(0)
    model = LanguageModel(bound_config(args)).eval()
    w = step_weights(model)
    weight_bytes = w["total"] * w["element_size"]
    flops_per_token = 2 * w["total"]
    gen = torch.Generator().manual_seed(0)
    L, batches, paths = args.length, args.batches, ("default", "default_mkl", "torch_ops")
    K = args.steps_per_repeat

    def path_context(path: str):
        """The step of `path`: as is; with every GEMM on F.linear (no oneDNN, no prepacking); or
        as torch ops only (no fused numba kernels)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch_ops_only(path == "torch_ops"))
        if path == "default_mkl":
            stack.enter_context(force_gemm("mkl"))
        return stack

    # copy buffer: float32, 4x the weights' bytes, so that no cache level holds it
    numel = 4 * weight_bytes // 4
    src, dst = torch.ones(numel), torch.zeros(numel)
    copy_bytes = 2 * src.numel() * src.element_size()  # read + write

    caches, toks, slots = {}, {}, {}
    probes = {}  # B -> [(x, weight, count, inner)]
    with torch.no_grad():
        for B in batches:
            caches[B] = model.init_cache(B, max_length=L + K)
            fill_cache(caches[B], L, gen)
            toks[B] = torch.randint(0, model.config.vocab_size, (B,), generator=gen)
            slots[B] = torch.arange(B)
            # warm-up: numba JIT, allocator, oneDNN primitives for these shapes
            for path in paths:
                with path_context(path):
                    for _ in range(2):
                        caches[B].positions.fill_(L)
                        model.step(toks[B], caches[B], slots[B])
            row = []
            for (out_f, in_f), count in sorted(w["shapes"].items()):
                x, wt = torch.randn(B, in_f, generator=gen), torch.randn(out_f, in_f, generator=gen)
                fastest, once = None, float("inf")  # the fastest fp32 backend for this shape and B
                for name, fn in gemm_backends(x, wt).items():
                    if not name.startswith("fp32"):
                        continue
                    fn()
                    for _ in range(3):
                        t0 = now()
                        fn()
                        dt = now() - t0
                        if dt < once:
                            fastest, once = (name, fn), dt
                once = max(once, 1e-7)
                row.append((fastest, count, max(1, min(1000, int(1e-3 / once)))))  # >= ~1 ms per sample
            probes[B] = row
        dst.copy_(src)

        def probe(B: int) -> float:
            """Seconds of the model's GEMMs at M = B rows, each shape timed alone on its fastest backend."""
            total = 0.0
            for (_, fn), count, inner in probes[B]:
                t0 = now()
                for _ in range(inner):
                    fn()
                total += count * (now() - t0) / inner
            return total

        step_t = {(B, path): [] for B in batches for path in paths}  # steps 2..K of each repeat (mean)
        first_t = {(B, path): [] for B in batches for path in paths}  # each repeat's first step
        fused = {(B, path): 0 for B in batches for path in paths}
        gemm_t = {B: [] for B in batches}
        copy_t = []
        for rep in range(args.repeats):  # interleaved: every quantity sees the same machine
            for B in batches:
                # the paths in turn first: the first step after the probes finds colder caches and
                # idle thread pools (worth ~0.5 ms at batch 1), which must not always fall on one path
                for path in paths[rep % len(paths):] + paths[:rep % len(paths)]:
                    with path_context(path):
                        caches[B].positions.fill_(L)  # every repeat steps from length L
                        calls = sum(ops_step.step_kernel_calls().values())
                        times = []
                        for _ in range(K):  # back to back, as a decoding loop steps
                            t0 = now()
                            model.step(toks[B], caches[B], slots[B])
                            times.append(now() - t0)
                        first_t[B, path].append(times[0])
                        step_t[B, path].append(statistics.fmean(times[1:]) if K > 1 else times[0])
                        fused[B, path] += (sum(ops_step.step_kernel_calls().values()) - calls) / K
                gemm_t[B].append(probe(B))
            t0 = now()
            dst.copy_(src)
            copy_t.append(now() - t0)
    del src, dst

    med = statistics.median
    bandwidth = copy_bytes / med(copy_t)
    bytes_s = weight_bytes / bandwidth
    rows = []
    for path in paths:
        for B in batches:
            step_s, flops_s = med(step_t[B, path]), med(gemm_t[B])
            bound_s = max(flops_s, bytes_s)
            # % of bound from each repeat's own step and probes (they ran back to back), then the
            # median: one slow probe or step then moves one repeat, not the whole row
            def pct(times: list[float]) -> float:
                return 100 * med([max(g, weight_bytes * c / copy_bytes) / t
                                  for t, g, c in zip(times, gemm_t[B], copy_t)])
            rows.append(dict(path=path, batch=B, step_ms=1e3 * step_s, bound_ms=1e3 * bound_s,
                             pct_of_bound=pct(step_t[B, path]), tok_s=B / step_s,
                             first_step_ms=1e3 * med(first_t[B, path]), pct_first_step=pct(first_t[B, path]),
                             bound_by="flops" if flops_s >= bytes_s else "bytes",
                             flops_ms=1e3 * flops_s, bytes_ms=1e3 * bytes_s,
                             gemm_gflop_s=flops_per_token * B / flops_s / 1e9,
                             fused_calls_per_step=fused[B, path] / args.repeats,
                             gemm_backends=sorted({name for (name, _), _, _ in probes[B]})))
    try:
        import numba

        numba_threads = numba.get_num_threads()
    except ImportError:  # no numba: no fused kernels, every step runs as torch ops
        numba_threads = None
    return dict(
        date=time.strftime("%Y-%m-%d"), cpu=cpu_name(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cores=os.cpu_count(), threads=torch.get_num_threads(), numba_threads=numba_threads,
        torch=torch.__version__, clock="wall", repeats=args.repeats, steps_per_repeat=K, length=L,
        model=describe(model.config, args.preset),
        weights=dict(params=w["params"], total_params=w["total"], bytes=weight_bytes,
                     shapes={f"{o}x{i}": n for (o, i), n in sorted(w["shapes"].items())}),
        flops_per_token=flops_per_token, copy_buffer_bytes=copy_bytes // 2,
        copy_bandwidth_gb_s=bandwidth / 1e9, max_batch_fused=ops_step.MAX_BATCH,
        conventions=("step: wall time of one model.step(tokens, cache, slots) over all B slots, the pool at "
                     "`length` tokens, in a run of steps_per_repeat steps back to back: the mean of steps 2.. of "
                     "each repeat (the steady decoding loop; first step: each repeat's first, after the other paths "
                     "and the probes left caches and thread pools cold), median over repeats. FLOPs = 2 x B x weight parameters (the blocks' nn.Linear weights, the RG-LRU "
                     "block-diagonal gates, the tied V x D output layer); attention over the cache and elementwise "
                     "work are ignored. flops term = the model's GEMM shapes at M = B rows timed one by one, each on "
                     "its fastest fp32 backend (F.linear, oneDNN, oneDNN prepacked: benchmarks/gemm.py), summed "
                     "with their multiplicities (= FLOPs / GEMM rate). copy bandwidth = 2 x buffer "
                     "bytes (read + write) / time of dst.copy_(src), buffer 4x the weights; bytes term = weight "
                     "bytes / copy bandwidth. bound = max of the two; % of bound = median over repeats of that repeat's "
                     "bound / step (step_ms and bound_ms are the medians of each)."),
        rows=rows)


def bound_markdown(res: dict) -> list[str]:
    """The results as markdown lines (printed by this script, and part of BENCHMARKS.md's Inference section)."""
    w = res["weights"]
    lines = [f"`python benchmarks/decode_bound.py --repeats {res['repeats']}` ({res['date']}): {res['model']}; pool at {res['length']} "
             f"tokens per slot. CPU: {res['cpu']} (torch capability {res['cpu_capability']}, {res['cores']} cores); "
             f"{res['threads']} torch thread(s), {res['numba_threads']} numba thread(s); torch {res['torch']}; wall "
             f"clock, median of {res['repeats']} interleaved repeats (% of bound: the median of each repeat's own "
             f"bound / step). Step: the mean of steps 2..{res.get('steps_per_repeat', 1)} of each repeat's "
             f"{res.get('steps_per_repeat', 1)} back to back (a decoding loop's steady state); first step: each "
             "repeat's first, after the probes and the other paths (caches and thread pools cold). "
             f"Weights per token: {w['total_params']:,} "
             f"parameters = {w['bytes'] / 1e6:.1f} MB (nn.Linear {w['params']['linear']:,}, RG-LRU block-diagonal "
             f"gates {w['params']['block_diagonal']:,}, tied output layer {w['params']['output_layer']:,}); FLOPs per "
             f"token {res['flops_per_token'] / 1e6:.1f} M. Bound = max(flops term, bytes term): the flops term times "
             "the model's GEMM shapes at M = batch rows, each alone on its fastest fp32 backend (last column), in "
             "the same run (attention over the cache and elementwise work ignored); the bytes term is weight bytes / copy bandwidth "
             f"({res['copy_bandwidth_gb_s']:.1f} GB/s, counting read + write of a "
             f"{res['copy_buffer_bytes'] / 1e6:.0f} MB buffer)."]
    titles = {"default": f"Default step (streaming numba kernels at batch <= {res['max_batch_fused']}, above it GEMMs on "
                         "`ops.linear`'s measured backend with one hybrid kernel per block half between them):",
              "default_mkl": "The same with every GEMM on F.linear (`GRIFFINLM_GEMM=mkl`: no oneDNN, no prepacked "
                             "weights), in the same run:",
              "torch_ops": "Torch-ops step (`ops.decode_step.references_only()`):"}
    for path, title in titles.items():
        lines += ["", title, "",
                  "| batch | step ms | bound ms | % of bound | first step ms | % of bound, first step | tokens/s "
                  "| bound by | flops ms | bytes ms | GEMM GFLOP/s | fused calls/step | GEMM backends of the bound |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
        for r in res["rows"]:
            if r["path"] == path and path in titles:
                first = (f"{r['first_step_ms']:.3f} | {r['pct_first_step']:.0f}%" if "first_step_ms" in r
                         else "- | -")  # results written before steps ran back to back
                lines.append(f"| {r['batch']} | {r['step_ms']:.3f} | {r['bound_ms']:.3f} | {r['pct_of_bound']:.0f}% | "
                             f"{first} | "
                             f"{r['tok_s']:,.0f} | {r['bound_by']} | {r['flops_ms']:.3f} | {r['bytes_ms']:.3f} | "
                             f"{r['gemm_gflop_s']:.1f} | {r['fused_calls_per_step']:.0f} | "
                             f"{', '.join(r.get('gemm_backends', ['fp32 F.linear']))} |")
    return lines


def print_bound(res: dict) -> None:
    print("\n".join(bound_markdown(res)), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    p.add_argument("--length", type=int, default=256, help="tokens in each slot of the pool")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--preset", default=None,
                   help="a model preset (e.g. griffin-100m, vocab 256) instead of --width/--depth/--window; "
                        "writes docs/results/decode_bound_<preset>.json")
    p.add_argument("--repeats", type=int, default=24, help="interleaved repeats (median of each quantity)")
    p.add_argument("--steps-per-repeat", type=int, default=4,
                   help="steps back to back per path and repeat: the step time is the mean of the 2nd.. "
                        "(the decoding loop's steady state), the first is reported apart (cold after the probes)")
    p.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, min(args.threads, os.cpu_count() or 1))))
    import torch

    torch.set_num_threads(args.threads)
    res = bench_bound(args)
    print_bound(res)
    if not args.no_write:
        path = BOUND_PATH if not args.preset else BOUND_PATH.replace(".json", f"_{args.preset}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
