"""`griffinlm plan`: memory per GPU of each (dp x tp) layout of a model (registered by griffinlm.cli)."""
from __future__ import annotations

import argparse


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `plan` on an argparse sub-parser collection; sets func=run_plan."""
    p = subparsers.add_parser(
        "plan", help="memory and communication per GPU of data x tensor parallel layouts",
        description="For a model preset and a number of GPUs, print the memory each GPU needs (weights, "
                    "gradients and AdamW states, FSDP buffers, activations of one micro-batch) and the bytes "
                    "it sends per step, for every data-parallel x tensor-parallel split the model allows.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="preset name, e.g. griffin-14b")
    p.add_argument("--config", nargs="+", action="extend", metavar="KEY=VALUE", help="model config overrides")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--tp", type=int, default=None, help="only this tensor-parallel degree (default: all allowed)")
    p.add_argument("--max-tp", type=int, default=8, help="largest TP degree listed (GPUs per node)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward pass")
    p.add_argument("--no-fsdp", action="store_true", help="plain data parallel (replicated states)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU, for the 'fits' column (0: no column)")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args: argparse.Namespace) -> int:
    from ..config import ModelConfig
    from ..cli_settings import parse_overrides
    from .plan import count_params, format_table, layouts, plan_layout

    if args.gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {args.gpus}")
    config = ModelConfig.preset(args.model, **parse_overrides(args.config))
    counts = count_params(config)
    pairs = [(args.gpus // args.tp, args.tp)] if args.tp else layouts(config, args.gpus, args.max_tp)
    if args.tp and args.gpus % args.tp:
        raise ValueError(f"--tp {args.tp} does not divide --gpus {args.gpus}")
    plans = [plan_layout(config, dp, tp, not args.no_fsdp, args.micro_batch, args.seq_len,
                         checkpointing=args.checkpointing, counts=counts) for dp, tp in pairs]
    print(f"{args.model}: {counts.total / 1e9:.2f}B parameters ({counts.tp_split / 1e9:.2f}B split by tensor "
          f"parallelism, {counts.replicated / 1e9:.2f}B replicated: embedding, norms, MQA key/value); "
          f"{args.gpus} GPUs")
    print(format_table(args.model, plans, args.micro_batch, args.seq_len, args.gpu_memory or None))
    return 0
