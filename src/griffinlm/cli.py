"""The `griffinlm` command line (also `python -m griffinlm`, so `torchrun -m griffinlm` works).

Each job registers its own sub-command from its own package; this file only wires them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# (module, function) pairs; each function takes the argparse sub-parsers object.
SUBCOMMANDS = (
    ("griffinlm.cli", "add_info_parser"),
    ("griffinlm.train.cli", "add_train_parser"),
    ("griffinlm.train.cli", "add_eval_parser"),
    ("griffinlm.finetune.cli", "add_finetune_parser"),
    ("griffinlm.evaluate.cli", "add_study_parser"),
    ("griffinlm.inference.cli", "add_generate_parser"),
    ("griffinlm.serve.cli", "add_serve_parser"),
    ("griffinlm.interop.cli", "add_convert_parser"),
    ("griffinlm.parallel.cli", "add_plan_parser"),
)


def add_info_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="list model presets with their parameter counts")
    p.add_argument("--model", help="show one preset's full config as JSON")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import torch

    from .config import PAPER_TRAINING_TOKENS, ModelConfig
    from .model import LanguageModel

    names = [args.model] if args.model else ModelConfig.preset_names()
    if not args.model:
        print("Sized presets are the paper's Table 2 shapes (De et al. 2024), the same for all three architectures\n"
              "(head dim 128, MLP expansion 3, local window 1024; the MQA Transformer is then the smallest, as in\n"
              "the paper); 'tokens' is the paper's training budget for that size.\n")
    for name in names:
        cfg = ModelConfig.preset(name)
        with torch.device("meta"):
            model = LanguageModel(cfg)
        if args.model:
            print(json.dumps(cfg.to_dict(), indent=2))
        size = name.split("-", 1)[1]
        tokens = f"   tokens {PAPER_TRAINING_TOKENS[size] / 1e9:6.1f}B" if size in PAPER_TRAINING_TOKENS else ""
        lru = f" lru {cfg.resolved_lru_width:5d}" if "recurrent" in cfg.block_pattern else " " * 10
        print(f"{name:18s} params (non-embedding) {model.param_count() / 1e6:9.1f}M   width {cfg.width:5d}{lru} "
              f"depth {cfg.depth:3d} heads {cfg.num_heads:3d} pattern {'/'.join(cfg.block_pattern)}{tokens}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="griffinlm", description="Griffin, Hawk and MQA Transformer language models")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, fn_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a job whose package is not part of this build
            if e.name and module_name.startswith(e.name):
                continue
            raise
        getattr(module, fn_name)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError, CheckpointError) as e:
        print(f"griffinlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
