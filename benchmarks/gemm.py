"""GEMM rate of each CPU backend on the model's own shapes: what "at the GEMM rate" should mean.

For the width-512 configuration of the benchmarks (weights 512x1536, 1536x512 and 512x512, the
tied 256x512 output layer) and M rows (decode-sized to prefill-sized), it times, in the same
process and interleaved:
  - fp32 `F.linear` (PyTorch's default CPU GEMM, MKL on x86),
  - fp32 oneDNN on the weight as it is (`torch.ops.mkldnn._linear_pointwise`),
  - fp32 oneDNN with the weight prepacked once (`torch.ops.mkldnn._reorder_linear_weight`, then
    `torch.ops.mkldnn._linear_pointwise`), the result checked against `F.linear`,
  - bf16 `F.linear` (where the CPU has native bf16, `torch.ops.mkldnn._is_mkldnn_bf16_supported()`),
and, for the training products at the largest M, fp32 `g @ W` (grad input) and `g.T @ x` (grad
weight), each with torch's default and with oneDNN (operands transposed into place, as `ops.linear`
does), and `griffinlm.ops.linear` itself (the backend it chose for the shape, its call overhead
included). `peak_rates` is the best of these per dtype, imported by the other benchmarks as their
bound. Each figure is the median over --repeats interleaved rounds; GFLOP/s = 2 M N K / time.

    python benchmarks/gemm.py                  # writes docs/results/gemm.json
    python benchmarks/gemm.py --repeats 5 --no-write
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_PATH = os.path.join(ROOT, "docs", "results", "gemm.json")
SHAPES = [(1536, 512), (512, 1536), (512, 512), (256, 512)]  # (out, in) of the model's weights


def timed(fn, min_seconds: float = 0.02) -> float:
    """Seconds per call of fn, looping at least min_seconds."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return dt / n


def backends(x, w):
    """name -> zero-argument call computing x @ w.T with that backend (None where unavailable)."""
    import torch
    import torch.nn.functional as F

    lp = torch.ops.mkldnn._linear_pointwise
    out = {"fp32 F.linear": lambda: F.linear(x, w),
           "fp32 oneDNN": lambda: lp(x, w, None, "none", [], "")}
    packed = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
    out["fp32 oneDNN prepacked"] = lambda: lp(x, packed, None, "none", [], "")
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        xb, wb = x.bfloat16(), w.bfloat16()
        out["bf16 F.linear"] = lambda: F.linear(xb, wb)
    return out


def peak_rates(rows: int = 4096, shapes=SHAPES, clock=time.perf_counter, repeats: int = 2) -> dict[str, float]:
    """Best rate in FLOP/s over the model's weight shapes at `rows` rows: "fp32" (the best fp32
    backend: F.linear or oneDNN, prepacked or not), "fp32 F.linear" alone, and "bf16" where the CPU
    has it. The denominator of every MFU and "% of bound" in the benchmarks, measured in their run."""
    import torch

    best: dict[str, float] = {}
    for N, K in shapes:
        x, w = torch.randn(rows, K), torch.randn(N, K) / K ** 0.5
        for name, fn in backends(x, w).items():
            fn()
            for _ in range(repeats):
                t = clock()
                fn()
                rate = 2 * rows * N * K / max(clock() - t, 1e-9)
                key = "bf16" if name.startswith("bf16") else name if name == "fp32 F.linear" else "fp32 oneDNN"
                best[key] = max(best.get(key, 0.0), rate)
    best["fp32"] = max(best["fp32 F.linear"], best["fp32 oneDNN"])
    return best


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")


def gemm_flops(name: str, shapes: list) -> float:
    """FLOPs of one profiled matrix-product op from its recorded input shapes."""
    if name == "mkldnn::_linear_pointwise":  # x (..., K), weight (N, K)
        x, w = shapes[0], shapes[1]
        rows = 1
        for d in x[:-1]:
            rows *= d
        return 2.0 * rows * w[0] * x[-1]
    a, b = (shapes[1], shapes[2]) if name in ("aten::addmm", "aten::baddbmm") else (shapes[0], shapes[1])
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def profile_gemms(fn) -> tuple[float, float]:
    """(seconds, FLOPs) of the matrix products that one call of fn() runs: the profiler's self
    CPU time of every GEMM op, and their FLOPs from the recorded shapes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    seconds = flops = 0.0
    for e in prof.events():
        if e.name in GEMM_OPS and e.input_shapes:
            seconds += e.self_cpu_time_total / 1e6
            flops += gemm_flops(e.name, e.input_shapes)
    return seconds, flops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 4096])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from griffinlm.ops.gemm_backend import CHOICES
    from griffinlm.ops.linear import linear

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, checks = [], []
    for M in args.rows:
        for N, K in SHAPES:
            x, w = torch.randn(M, K), torch.randn(N, K) / K ** 0.5
            fns = backends(x, w)
            fns["ops.linear (chosen)"] = lambda x=x, w=w: linear(x, w)
            ref = F.linear(x, w)
            got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, M), None,
                                                     "none", [], "")
            checks.append(float((got - ref).abs().max() / ref.abs().max()))
            if M == max(args.rows):  # the two backward products of a training step
                g, lp = torch.randn(M, N), torch.ops.mkldnn._linear_pointwise
                fns["fp32 grad input g @ W"] = lambda g=g, w=w: g @ w
                fns["fp32 oneDNN grad input"] = lambda g=g, w=w: lp(g, w.t().contiguous(), None, "none", [], "")
                fns["fp32 grad weight g.T @ x"] = lambda g=g, x=x: g.t() @ x
                fns["fp32 oneDNN grad weight"] = lambda g=g, x=x: lp(g.t().contiguous(), x.t().contiguous(), None,
                                                                     "none", [], "")
            times = {k: [] for k in fns}
            for i in range(args.repeats):
                for k in (list(fns) if i % 2 else list(fns)[::-1]):
                    times[k].append(timed(fns[k]))
            for k, ts in times.items():
                t = statistics.median(ts)
                rows.append(dict(backend=k, M=M, N=N, K=K, us=1e6 * t, gflop_s=2 * M * N * K / t / 1e9))
    res = dict(date=time.strftime("%Y-%m-%d"), cpu_capability=torch.backends.cpu.get_cpu_capability(),
               cores=os.cpu_count(), threads=args.threads, torch=torch.__version__,
               bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), repeats=args.repeats,
               onednn_max_rel_error=max(checks), rows=rows, ops_linear_choices=CHOICES.current())
    print(f"GEMM rates ({res['date']}; CPU capability {res['cpu_capability']}, {res['cores']} cores, "
          f"{args.threads} threads; torch {res['torch']}; native bf16: {res['bf16']}; oneDNN vs F.linear max "
          f"relative error {res['onednn_max_rel_error']:.1e}); GFLOP/s, median of {args.repeats} interleaved rounds:\n")
    names = list(dict.fromkeys(r["backend"] for r in rows))
    print("| M | out x in | " + " | ".join(names) + " |")
    print("|---:|---|" + "---:|" * len(names))
    for M in args.rows:
        for N, K in SHAPES:
            got = {r["backend"]: r["gflop_s"] for r in rows if (r["M"], r["N"], r["K"]) == (M, N, K)}
            print(f"| {M} | {N}x{K} | " + " | ".join(f"{got[n]:.0f}" if n in got else "—" for n in names) + " |")
    if not args.no_write:
        with open(JSON_PATH, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\nwrote {os.path.relpath(JSON_PATH, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
