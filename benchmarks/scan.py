"""Linear-scan benchmark: every implementation vs the memory bound measured in the same run.

    python benchmarks/scan.py [--repeats N] [--loop-T 256] [--loop-full]

Bound = minimum bytes an implementation must move / bandwidth of a torch tensor copy of
the same size measured here (copy moves 2 tensors). Forward moves a, x in and h out (3
tensors); backward reads a, g, h_prev and writes da, dx (5); forward+backward 8.
Autograd through a Python loop over time (the peers' approach) is measured at loop_T and
2 * loop_T and extrapolated to T with the fitted power of T (its backward is quadratic), or,
with --loop-full, timed once at the full T (minutes: at T=4096 its backward takes 4.5 min here).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from griffinlm.ops import linear_scan, linear_scan_reference
from griffinlm.ops.scan import available_impls


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, page faults)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_seconds(B: int, T: int, D: int, repeats: int) -> float:
    src, dst = torch.randn(B, T, D), torch.empty(B, T, D)
    return best_time(lambda: dst.copy_(src), repeats)  # moves 2 tensors


def bench_shape(B: int, T: int, D: int, repeats: int, loop_T: int, loop_full: bool = False) -> list[dict]:
    a = torch.rand(B, T, D, requires_grad=True)
    x = torch.randn(B, T, D, requires_grad=True)
    g = torch.randn(B, T, D)
    rows = []
    for impl in [i for i in available_impls("cpu") if i != "reference"]:
        def fwd():
            with torch.no_grad():
                linear_scan(a, x, impl=impl)

        def fwd_bwd():
            h, _ = linear_scan(a, x, impl=impl)
            torch.autograd.grad(h, (a, x), g)  # no .grad accumulation pass

        reps = repeats if impl != "torch" else max(2, repeats // 3)
        t_copy = copy_seconds(B, T, D, repeats)  # re-measured next to each implementation
        rows.append(dict(impl=impl, fwd=best_time(fwd, reps), fwd_bwd=best_time(fwd_bwd, reps),
                         copy=t_copy, extrapolated=False))
    if "numba" in available_impls("cpu"):
        # The kernel alone, writing into a buffer allocated once: a fresh (B, T, D) output of
        # tens of MB is mmap'ed by glibc and page-faulted on first touch, which the end-to-end
        # rows above pay on every call (4 KiB at a time unless THP_MEM_ALLOC_ENABLE=1, which
        # importing griffinlm sets by default).
        from griffinlm.ops.numba_common import chunk_size
        from griffinlm.ops.scan.numba import fwd as kfwd

        a32, x32 = a.detach().numpy(), x.detach().numpy()
        h, h_last = np.empty((B, T, D), np.float32), np.empty((B, D), np.float32)
        chunk = chunk_size(B, D)
        t_kernel = best_time(lambda: kfwd(a32, x32, h_last, False, h, h_last, chunk), repeats)
        rows.append(dict(impl="numba kernel only, preallocated output (fwd)", fwd=t_kernel, fwd_bwd=float("nan"),
                         copy=copy_seconds(B, T, D, repeats), extrapolated=False))
    # Autograd through the Python loop (the peers' approach). Its backward is superlinear in T
    # (each a[:, t] select's backward materialises a full (B, T, D) gradient), so it is measured
    # at loop_T and 2 * loop_T and extrapolated to T with the fitted power of T.
    if loop_full:
        def loop_fwd_bwd_full():
            h, _ = linear_scan_reference(a, x)
            torch.autograd.grad(h, (a, x), g)

        with torch.no_grad():
            t0 = time.perf_counter()
            linear_scan_reference(a, x)
            t_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        loop_fwd_bwd_full()  # once: minutes, so no warm-up
        rows.append(dict(impl=f"python loop + autograd (measured once at T={T})", fwd=t_fwd,
                         fwd_bwd=time.perf_counter() - t0, copy=copy_seconds(B, T, D, repeats), extrapolated=False))
        return rows
    times = {}
    for lt in (loop_T, 2 * loop_T):
        al = torch.rand(B, lt, D, requires_grad=True)
        xl = torch.randn(B, lt, D, requires_grad=True)

        def loop_fwd():
            with torch.no_grad():
                linear_scan_reference(al, xl)

        def loop_fwd_bwd():
            h, _ = linear_scan_reference(al, xl)
            torch.autograd.grad(h, (al, xl), g[:, :lt])

        times[lt] = (best_time(loop_fwd, 2), best_time(loop_fwd_bwd, 2))
    (f1, b1), (f2, b2) = times[loop_T], times[2 * loop_T]
    pf, pb = math.log2(f2 / f1), math.log2(b2 / b1)
    s = T / (2 * loop_T)
    rows.append(dict(impl=f"python loop + autograd (measured T={loop_T},{2 * loop_T}; ~T^{pb:.1f})",
                     fwd=f2 * s**pf, fwd_bwd=b2 * s**pb, copy=copy_seconds(B, T, D, repeats), extrapolated=True))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--loop-T", type=int, default=256)
    p.add_argument("--loop-full", action="store_true", help="time the Python loop once at the full T")
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    for B, T, D in [(4, 4096, 1024), (4, 512, 2560)]:
        rows = bench_shape(B, T, D, args.repeats, args.loop_T, args.loop_full)
        nbytes = B * T * D * 4
        loop = rows[-1]
        print(f"\n### B={B} T={T} D={D} fp32\n")
        print("| implementation | copy GB/s | fwd ms | fwd % of bound | fwd+bwd ms | fwd+bwd % of bound |"
              " fwd+bwd speedup vs loop |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            bw = 2 * nbytes / r["copy"]
            f_bound, fb_bound = 3 * nbytes / bw, 8 * nbytes / bw
            if math.isnan(r["fwd_bwd"]):
                bwd_cols = "— | — | —"
            else:
                bwd_cols = (f"{r['fwd_bwd'] * 1e3:.1f} | {100 * fb_bound / r['fwd_bwd']:.0f}% | "
                            f"{loop['fwd_bwd'] / r['fwd_bwd']:.0f}x")
            print(f"| {r['impl']} | {bw / 1e9:.1f} | {r['fwd'] * 1e3:.1f} | {100 * f_bound / r['fwd']:.0f}% | "
                  f"{bwd_cols} |")


if __name__ == "__main__":
    main()
