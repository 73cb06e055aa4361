"""Step time of 1 vs 2 processes (gloo, CPU) and bytes communicated per step by each
parallelism, measured and as calculated by griffinlm.parallel.plan (docs/distributed.md).

    python benchmarks/distributed.py                       # griffin-tiny, batch 8 x 256
    python benchmarks/distributed.py --out results.json

Every layout trains the same global batch with AdamW; 2 processes get 1 thread each, and the
single process is timed with 1 and with 2 threads (the same 2 cores). Bytes are counted by a
dispatch mode that sees every collective (FSDP's, DDP's and DTensor's) on rank 0 during one
step; "sent" assumes ring algorithms.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from griffinlm import LanguageModel, ModelConfig
from griffinlm.data import Batch
from griffinlm.parallel import build_context, clip_grad_norm_, dp_sum, local_rows, parallelize
from griffinlm.parallel.comm_count import CommCounter
from griffinlm.parallel.launch import spawn
from griffinlm.parallel.plan import _root_params, count_params, dp_comm_bytes, tp_comm_bytes

LAYOUTS = {"dp (DDP)": (1, False), "fsdp": (1, True), "tp": (2, False)}  # name: (tp, fsdp) on 2 ranks


def make_batch(cfg: ModelConfig, batch: int, seq: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    return Batch(tok[:, :-1], tok[:, 1:], torch.arange(seq).expand(batch, seq).clone(), mask, float(batch * seq))


def timed_steps(model, cfg, args, ctx=None, counter_step: int | None = None) -> tuple[list, list, dict]:
    """Wall seconds and process CPU seconds per step (after warm-up), and the collectives of
    step `counter_step`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times, cpu, comm = [], [], {}
    for step in range(args.warmup + args.steps):
        b = make_batch(cfg, args.batch, args.seq, step)
        counter = CommCounter() if step == counter_step else None
        t0, c0 = time.perf_counter(), time.process_time()
        if counter:
            counter.__enter__()
        lb = local_rows(b, ctx) if ctx else b
        logits = model(lb.tokens, segment_pos=lb.segment_pos)
        nats = F.cross_entropy(logits.float().flatten(0, 1), lb.targets.flatten(), reduction="sum")
        (nats / b.num_targets).backward()
        if ctx:
            clip_grad_norm_(model.parameters(), 1.0)
            dp_sum([float(nats.detach())], ctx)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if counter:
            counter.__exit__(None, None, None)
            comm = counter.summary()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return times, cpu, comm


def _worker(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    cfg = ModelConfig.preset(args.model)
    results = {}
    for name, (tp, fsdp) in LAYOUTS.items():
        ctx = build_context(tp, torch.device("cpu"))
        torch.manual_seed(0)
        model = parallelize(LanguageModel(cfg), ctx, fsdp=fsdp)
        times, cpu, comm = timed_steps(model, cfg, args, ctx, counter_step=args.warmup)
        results[name] = {"step_s": statistics.median(times), "cpu_s": statistics.median(cpu), "comm": comm}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def calculated_bytes(cfg: ModelConfig, name: str, args: argparse.Namespace) -> float:
    """Bytes rank 0 sends per step according to griffinlm.parallel.plan (fp32 on CPU)."""
    tp, fsdp = LAYOUTS[name]
    c = count_params(cfg)
    if tp > 1:
        return tp_comm_bytes(cfg, args.batch * args.seq, tp, act_bytes=4)
    return dp_comm_bytes(c.total, 2, fsdp, param_bytes=4, root_params=_root_params(cfg) if fsdp else 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="griffin-tiny")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    cfg = ModelConfig.preset(args.model)

    single = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        times, cpu, _ = timed_steps(LanguageModel(cfg), cfg, args)
        single[f"1 process, {threads} thread{'s' if threads > 1 else ''}"] = {
            "step_s": statistics.median(times), "cpu_s": statistics.median(cpu)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.json")
        spawn(_worker, 2, args, path)
        with open(path) as f:
            multi = json.load(f)

    tokens = args.batch * args.seq
    print(f"{args.model}: global batch {args.batch} x {args.seq} = {tokens} tokens per step, fp32, gloo on "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}\n")
    print("| layout | step, wall (s) | step, CPU per rank (s) | collectives per step (rank 0) "
          "| sent, measured (MB) | sent, calculated (MB) |")
    print("|---|---|---|---|---|---|")
    for name, t in single.items():
        print(f"| {name} | {t['step_s']:.3f} | {t['cpu_s']:.3f} | - | - | - |")
    report = {"config": vars(args), "single": single, "two_processes": {}}
    for name, r in multi.items():
        comm = r["comm"]
        calls = ", ".join(f"{v['calls']} {k}" for k, v in sorted(comm.items()))
        sent = sum(v["sent"] for v in comm.values())
        calc = calculated_bytes(cfg, name, args)
        print(f"| 2 processes, {name} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | {calls} | "
              f"{sent / 1e6:.2f} | {calc / 1e6:.2f} |")
        report["two_processes"][name] = {**r, "sent_bytes": sent, "calculated_bytes": calc}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
