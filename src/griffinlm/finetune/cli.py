"""`griffinlm finetune`: LoRA (or full) fine-tuning of any checkpoint on instruction data."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli_settings import add_settings_flags, settings_from_args
from ..train.config import TrainConfig
from .lora import ATTENTION_TARGETS, GATE_TARGETS, MLP_TARGETS, RECURRENT_TARGETS

# Fine-tuning defaults that differ from pre-training's.
DEFAULTS = {"steps": 200, "lr": 1e-3, "weight_decay": 0.0, "seq_len": 512, "min_lr_ratio": 0.1,
            "sample_tokens": 0, "eval_every": 0}


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `finetune`; sets func=run_finetune."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a checkpoint (LoRA through peft, or every weight) on instruction data",
        description="Fine-tune a griffinlm checkpoint or a converted / transformers RecurrentGemma directory "
                    "on a JSONL file of {\"prompt\", \"completion\"} or {\"messages\": [...]} examples (chat "
                    "messages rendered with the tokenizer's chat template, else the plain 'User: / Assistant:' "
                    "template). The loss covers completion / assistant tokens only. Writes checkpoints with "
                    "exact resume, metrics.jsonl and loss_curve.png to --out (as `griffinlm train`), the adapters "
                    "in peft's format to OUT/adapter, and with --merge a plain checkpoint to OUT/merged. "
                    "LoRA targets (default: every one the model has): recurrent block "
                    f"{'/'.join(RECURRENT_TARGETS)}, attention {'/'.join(ATTENTION_TARGETS)}, MLP "
                    f"{'/'.join(MLP_TARGETS)}; gates=true adds the RG-LRU gates ({'/'.join(GATE_TARGETS)}).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the base: a run, checkpoint, weights or RecurrentGemma dir")
    p.add_argument("--lora", default="", metavar="SPEC",
                   help="LoRA settings, e.g. r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj,gates=true "
                        "(defaults r=16, alpha=32, dropout=0.05, targets=all, gates=false)")
    p.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA adapters")
    p.add_argument("--merge", action="store_true", help="also write OUT/merged: a plain checkpoint with the "
                                                        "adapters folded in")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the examples held out")
    p.add_argument("--answer-tokens", type=int, default=64,
                   help="greedy answers of at most this many tokens scored on the held-out examples (0: skip)")
    p.add_argument("--data", required=True, help="JSONL file of examples")
    add_settings_flags(p, TrainConfig, skip=("data", "tokenizer", "text_field", "sample_prompt", "grad_checkpointing"),
                       flag_names={"sample_temperature": "temperature"})
    p.set_defaults(func=run_finetune, **DEFAULTS)
    p.add_argument("--out", default=None, help="run directory; unset: runs/finetune")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch; unset: torch's choice")
    p.add_argument("--debug-kill-at-step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_finetune(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import CheckpointError
    from ..train.loop import Trainer
    from .job import FinetuneConfig, answer_accuracy, prepare, write_outputs
    from .lora import LoraSettings, set_dropout_stream

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("runs", "finetune")
    try:
        if args.full and args.lora:
            raise ValueError("--full and --lora exclude each other")
        lora = None if args.full else LoraSettings.parse(args.lora)
        train_cfg = settings_from_args(TrainConfig, args, sample_prompt="")
        if not os.path.isfile(train_cfg.data):
            raise FileNotFoundError(f"--data {train_cfg.data}: no such file")
        job, held_out, peft_model = prepare(FinetuneConfig(args.checkpoint, lora, args.val_fraction), train_cfg,
                                            verbose=True)
        # under torchrun: data parallel (LoRA: adapters replicated, the base frozen on every rank)
        trainer = Trainer(None, train_cfg, out, resume=args.resume, kill_at_step=args.debug_kill_at_step, job=job)
        set_dropout_stream(job.model, trainer.par.dp_rank)
        summary = trainer.run()
        model = trainer.model
        if trainer.par.distributed:
            from ..parallel import teardown
            if not trainer.plain_params:  # full fine-tuning: one plain copy, on rank 0
                from ..parallel.checkpoint import gather_model
                model = gather_model(trainer.model)
            teardown()
            if not trainer.is_main:  # rank 0 answers, writes and reports
                return 0
        if args.answer_tokens:
            summary["held_out_answer_accuracy"] = answer_accuracy(model, trainer.data.tokenizer, held_out,
                                                                  args.answer_tokens)
        summary["outputs"] = write_outputs(trainer, peft_model, args.merge, model)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; continue from the last checkpoint with the same command plus --resume",
              file=sys.stderr)
        return 130
    r = summary["held_out"]
    line = f"held-out completion loss: {r['loss']:.4f} nats/token ({r['target_tokens']:,} answer tokens)"
    if "held_out_answer_accuracy" in summary:
        line += f"; greedy answers exact: {summary['held_out_answer_accuracy']:.1%} of {len(held_out)}"
    print(line)
    for kind, path in summary["outputs"].items():
        print(f"{kind}: {path}")
    print(f"run directory: {out}")
    return 0
