"""`griffinlm convert`: RecurrentGemma (transformers format) <-> griffinlm checkpoints."""
from __future__ import annotations

import argparse
import json


def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert RecurrentGemma (transformers format) checkpoints to griffinlm or back",
        description="--from-hf DIR: a transformers RecurrentGemma directory (config.json + safetensors, "
                    "sharded or not) -> a griffinlm checkpoint in --out. --to-hf DIR: a griffinlm run or "
                    "checkpoint directory -> a transformers RecurrentGemma directory in --out. "
                    "Tokenizer files (tokenizer.json / tokenizer.model) are carried along.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="transformers RecurrentGemma directory to import")
    src.add_argument("--to-hf", metavar="DIR", help="griffinlm checkpoint to export as RecurrentGemma")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="parameter dtype (default: as stored)")
    p.add_argument("--quantize", choices=("int8", "bf16"), default=None,
                   help="--from-hf: store the projections and embedding as int8 (per-row scales) or bf16, "
                        "quantized while reading (no full-precision copy in memory)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="--to-hf: largest safetensors shard (GB)")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_from_hf, convert_to_hf

    if args.from_hf:
        path = convert_from_hf(args.from_hf, args.out, args.dtype, args.quantize)
        print(json.dumps({"checkpoint": path, "from": args.from_hf}))
    else:
        if args.max_shard_gb <= 0:
            raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
        files = convert_to_hf(args.to_hf, args.out, args.dtype, int(args.max_shard_gb * 1024**3))
        print(json.dumps({"out": args.out, "files": files}))
    return 0
