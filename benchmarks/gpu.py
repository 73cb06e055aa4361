"""GPU benchmark of the training and decoding paths (issue 20 item 8), in one command:

    python benchmarks/gpu.py                 # on a CUDA machine; about 5-10 minutes on one H100/H200
    python benchmarks/gpu.py --smoke         # tiny shapes on CPU: checks that the script runs

UNMEASURED: no number from this script has been measured yet. It was written and smoke-tested
on a machine without a GPU (`--smoke`); until it is run on a GPU and its table is copied into
BENCHMARKS.md, nothing here or there states GPU performance.

Sections (each one independent: a failure prints its reason and the rest still run):
  copy      HBM bandwidth of a torch tensor copy (the bound the kernels are measured against).
  scan      linear_scan (Triton) forward+backward: 8 fp32 tensors of (B, T, D) at minimum.
  rglru     fused RG-LRU (Triton) forward+backward in bf16: x, gate_r, gate_i in and y out, then
            x, gate_r, gate_i, dy in and dx, dgate_r, dgate_i out (11 bf16 tensors), beside the
            torch composition; flash-linear-attention's fused_recurrent_hgrn and chunk_hgrn on
            the same (B, T, D) when `fla` is installed (8 bf16 tensors at minimum).
            Goal (issue 20): fused RG-LRU fwd+bwd at >= 70% of copy bandwidth.
  attention local attention fwd+bwd at the griffin-1.3b head shape: griffinlm's default CUDA
            path (flex_attention), the blocked path and dense masked SDPA.
  train     one optimizer step of griffin-1.3b and transformer-1.3b shapes at T = 2048 in bf16
            autocast: tokens/s and MFU (6 N per token over --peak-tflops). Goal: griffin >= 0.9x.
  decode    griffin-1.3b decode tokens/s at batch 1, eager vs compile_decode_step(mode=
            "reduce-overhead") (CUDA graphs), and Inductor's cudagraph skip count. Goal: >= 5x.

Output: a Markdown table (section, case, ms, figure) on stdout, ready for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import time
import traceback
from typing import Callable

import torch
import torch.nn.functional as F

from griffinlm import LanguageModel, ModelConfig
from griffinlm.ops import linear_scan, rglru
from griffinlm.ops.attention import causal_attention

ROWS: list[tuple[str, str, float, str]] = []


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best-of-`repeats` seconds of fn() after one warm-up call (compilation, autotuning)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def row(section: str, case: str, seconds: float, figure: str) -> None:
    ROWS.append((section, case, seconds * 1e3, figure))
    print(f"  {section:9s} {case:42s} {seconds * 1e3:10.3f} ms  {figure}", flush=True)


def fwd_bwd(fn: Callable[..., object], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A closure running fn(*inputs) and a backward of the sum of its (first) output."""
    def run() -> None:
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out.float().sum(), [t for t in inputs if t.requires_grad])
    return run


def bench_copy(args, dev) -> float:
    n = args.B * args.T * args.D
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    s = timed(lambda: dst.copy_(src), dev, args.repeats)
    bw = 2 * n * 4 / s
    row("copy", f"fp32 copy of {n * 4 / 2**30:.2f} GiB", s, f"{bw / 1e9:.0f} GB/s")
    return bw


def bench_kernels(args, dev, bw: float) -> None:
    B, T, D = args.B, args.T, args.D
    el = B * T * D

    def pct(seconds: float, bytes_per_el: float) -> str:
        return f"{bytes_per_el * el / seconds / 1e9:.0f} GB/s = {100 * bytes_per_el * el / seconds / bw:.0f}% of copy"

    a = torch.rand(B, T, D, device=dev, requires_grad=True)
    x = torch.randn(B, T, D, device=dev, requires_grad=True)
    for impl in ["triton"] if dev.type == "cuda" else ["numba"]:
        s = timed(fwd_bwd(lambda a, x: linear_scan(a, x, impl=impl), [a, x]), dev, args.repeats)
        row("scan", f"linear_scan {impl} fp32 fwd+bwd {B}x{T}x{D}", s, pct(s, 8 * 4))

    bf = dict(device=dev, dtype=torch.bfloat16, requires_grad=True)
    x, gr, gi = (torch.randn(B, T, D, **bf) for _ in range(3))
    log_a = (-torch.rand(D, device=dev) * 0.1).requires_grad_()
    impls = ["triton", "composed"] if dev.type == "cuda" else ["fused", "composed"]
    for impl in impls:
        s = timed(fwd_bwd(lambda x, gr, gi, la: rglru(x, gr, gi, la, impl=impl), [x, gr, gi, log_a]), dev,
                  args.repeats)
        row("rglru", f"rglru {impl} bf16 fwd+bwd", s, pct(s, 11 * 2))
    try:
        from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
    except Exception as e:  # not installed: say so in the table
        row("rglru", "fla HGRN", float("nan"), f"skipped ({type(e).__name__})")
        return
    g = F.logsigmoid(torch.randn(B, T, D, device=dev)).to(torch.bfloat16).requires_grad_()
    for name, fn in (("fla fused_recurrent_hgrn", fused_recurrent_hgrn), ("fla chunk_hgrn", chunk_hgrn)):
        try:
            s = timed(fwd_bwd(lambda x, g, fn=fn: fn(x, g), [x, g]), dev, args.repeats)
            row("rglru", f"{name} bf16 fwd+bwd (scan only, no gates)", s, pct(s, 8 * 2))
        except Exception as e:
            row("rglru", name, float("nan"), f"failed: {type(e).__name__}: {e}")


def bench_attention(args, dev, preset: str) -> None:
    cfg = ModelConfig.preset(preset)
    H, hd, W = cfg.num_heads, cfg.width // cfg.num_heads, cfg.local_window
    B, T = args.attn_B, args.attn_T
    bf = dict(device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, requires_grad=True)
    q = torch.randn(B, H, T, hd, **bf)
    k, v = torch.randn(B, 1, T, hd, **bf), torch.randn(B, 1, T, hd, **bf)
    for impl in [None, "blocked", "dense"]:
        name = f"local window {W} {impl or 'default'} B{B} H{H} T{T} hd{hd}"
        try:
            s = timed(fwd_bwd(lambda q, k, v, impl=impl: causal_attention(q, k, v, W, impl=impl), [q, k, v]),
                      dev, args.repeats)
            row("attention", name, s, f"{B * T / s:,.0f} tokens/s")
        except Exception as e:
            row("attention", name, float("nan"), f"failed: {type(e).__name__}: {str(e)[:80]}")


def bench_train(args, dev, preset: str) -> float:
    cfg = ModelConfig.preset(preset)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LanguageModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (args.train_B, args.train_T + 1), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step() -> None:
        with amp:
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = timed(step, dev, args.repeats)
    tps = args.train_B * args.train_T / s
    mfu = 6 * n_params * tps / (args.peak_tflops * 1e12)
    row("train", f"{preset} B{args.train_B} T{args.train_T} ({n_params / 1e9:.2f}B params)", s,
        f"{tps:,.0f} tokens/s, MFU {100 * mfu:.1f}%")
    return tps


def bench_decode(args, dev, preset: str) -> None:
    from torch._dynamo.utils import counters

    cfg = ModelConfig.preset(preset)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LanguageModel(cfg).eval()
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    cache = model.init_cache(1, max_length=args.decode_steps * 4 + 16)
    tok = torch.randint(0, cfg.vocab_size, (1,), device=dev)
    modes = [("eager", None)] + ([("cuda graphs", "reduce-overhead")] if dev.type == "cuda" else [])
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 16), device=dev), cache=cache)
        for name, mode in modes:
            counters.clear()
            model.compile_decode_step(mode is not None, **({"mode": mode} if mode else {}))

            def run() -> None:
                for _ in range(args.decode_steps):
                    model.step(tok, cache)
            s = timed(run, dev, 1)
            extra = f", cudagraph skips {counters['inductor']['cudagraph_skips']}" if mode else ""
            row("decode", f"{preset} batch 1, {name}", s / args.decode_steps,
                f"{args.decode_steps / s:,.0f} tokens/s{extra}")
        model.compile_decode_step(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script, measures nothing)")
    p.add_argument("--sections", default="copy,kernels,attention,train,decode")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--D", type=int, default=2560, help="griffin-1.3b's RG-LRU width")
    p.add_argument("--attn-B", type=int, default=4)
    p.add_argument("--attn-T", type=int, default=8192)
    p.add_argument("--train-B", type=int, default=2, help="rows of --train-T tokens per step (4: ~80 GB)")
    p.add_argument("--train-T", type=int, default=2048)
    p.add_argument("--decode-steps", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    args = p.parse_args()
    if args.smoke:
        dev = torch.device("cpu")
        args.B, args.T, args.D, args.repeats = 2, 64, 64, 1
        args.attn_B, args.attn_T, args.train_B, args.train_T, args.decode_steps = 1, 64, 1, 32, 4
        presets = dict(train=["griffin-tiny", "transformer-tiny"], big="griffin-tiny")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/gpu.py needs a CUDA device (or --smoke to check the script on CPU)")
        dev = torch.device("cuda")
        presets = dict(train=["griffin-1.3b", "transformer-1.3b"], big="griffin-1.3b")
        print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    sections = set(args.sections.split(","))
    bw, tps = 1.0, {}
    for name in ("copy", "kernels", "attention", "train", "decode"):  # kernels use copy's bandwidth
        if name not in sections:
            continue
        t0 = time.perf_counter()
        try:
            if name == "copy":
                bw = bench_copy(args, dev)
            elif name == "kernels":
                bench_kernels(args, dev, bw)
            elif name == "attention":
                bench_attention(args, dev, presets["big"])
            elif name == "train":
                for preset in presets["train"]:
                    tps[preset] = bench_train(args, dev, preset)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()  # the model and its optimizer state went with the call
            elif name == "decode":
                bench_decode(args, dev, presets["big"])
        except Exception:
            print(f"  {name}: FAILED\n{traceback.format_exc()}", flush=True)
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if len(tps) == 2:
        g, t = (tps[k] for k in presets["train"])
        print(f"\ngriffin / transformer training tokens/s: {g / t:.2f} (goal >= 0.9)")
    print("\n| section | case | ms | figure |\n|---|---|---:|---|")
    for section, case, ms, figure in ROWS:
        print(f"| {section} | {case} | {ms:.3f} | {figure} |")


if __name__ == "__main__":
    main()
