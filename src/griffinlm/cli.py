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
    ("griffinlm.evaluate.cli", "add_study_parser"),
    ("griffinlm.inference.cli", "add_generate_parser"),
    ("griffinlm.interop.cli", "add_convert_parser"),
    ("griffinlm.parallel.cli", "add_plan_parser"),
)


def add_info_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="list model presets with their parameter counts")
    p.add_argument("--model", help="show one preset's full config as JSON")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import torch

    from .config import ModelConfig
    from .model import LanguageModel

    names = [args.model] if args.model else ModelConfig.preset_names()
    for name in names:
        cfg = ModelConfig.preset(name)
        with torch.device("meta"):
            model = LanguageModel(cfg)
        if args.model:
            print(json.dumps(cfg.to_dict(), indent=2))
        print(f"{name:18s} params (non-embedding) {model.param_count() / 1e6:10.1f}M   "
              f"width {cfg.width:5d} depth {cfg.depth:3d} pattern {'/'.join(cfg.block_pattern)}")
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
