"""`griffinlm train` and `griffinlm eval` sub-commands (registered by griffinlm.cli)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli_settings import add_settings_flags, parse_overrides, settings_from_args
from .config import TrainConfig


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `train` on an argparse sub-parser collection; sets func=run_train."""
    p = subparsers.add_parser(
        "train", help="train a Griffin, Hawk or Transformer language model",
        description="Train a language model from a preset on the built-in corpus (the running Python's "
                    "standard library), a text file, a directory of text files, a JSONL file or a "
                    "synthetic task. Writes checkpoints, metrics.jsonl and loss_curve.png to --out; "
                    "prints held-out bits per byte and a generated sample at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="preset name, e.g. griffin-tiny, hawk-tiny, transformer-tiny, griffin-100m "
                                   "(optional with --resume: taken from the checkpoint)")
    p.add_argument("--config", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="model config overrides, e.g. --config width=128 depth=4 "
                        "'block_pattern=[\"recurrent\",\"attention\"]', or a JSON file")
    add_settings_flags(p, TrainConfig, flag_names={"sample_temperature": "temperature"})
    p.add_argument("--out", default=None, help="run directory; unset: runs/MODEL")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch; unset: torch's choice")
    p.add_argument("--debug-kill-at-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree under torchrun (data-parallel degree = ranks / tp); "
                        "--batch-size stays the global batch")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW "
                                                       "states over the data-parallel ranks (FSDP2)")
    p.set_defaults(func=run_train)
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run_train(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import CheckpointError
    from ..config import ModelConfig
    from .loop import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        overrides = parse_overrides(args.config)
        if args.model is None and not args.resume:
            return _fail("--model PRESET is required (known presets: " + ", ".join(ModelConfig.preset_names()) + ")")
        if args.model is None and overrides:
            return _fail("--config needs --model")
        model_cfg = ModelConfig.preset(args.model, **overrides) if args.model else None
        cfg = settings_from_args(TrainConfig, args)
        out = args.out or os.path.join("runs", args.model or "run")
        trainer = Trainer(model_cfg, cfg, out, resume=args.resume, kill_at_step=args.debug_kill_at_step,
                          tp=args.tp, fsdp=args.fsdp)
        summary = trainer.run()
        if trainer.par.distributed:
            from ..parallel import teardown
            teardown()
            if not trainer.is_main:  # rank 0 reports
                return 0
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:  # a step cut midway is not saved; the last checkpoint is intact
        print("\ninterrupted; continue from the last checkpoint with the same command plus --resume",
              file=sys.stderr)
        return 130
    r = summary["held_out"]
    print(f"held-out bits/byte: {r['bits_per_byte']:.4f}  (loss {r['loss']:.4f} nats/token over "
          f"{int(r['bytes']):,} bytes; step {summary['step']}, {summary['tokens_seen']:,} tokens, "
          f"{summary['tokens_per_s']:.0f} tokens/s)")
    if summary["sample"] is not None:
        print(f"sample (temperature {cfg.sample_temperature}):\n{summary['sample']}")
    print(f"run directory: {out}")
    return 0


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {value!r}")
    return n


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `eval` on an argparse sub-parser collection; sets func=run_eval."""
    p = subparsers.add_parser(
        "eval", help="held-out bits per byte of a checkpoint (JSON), or lm-eval tasks with --tasks",
        description="Evaluate a checkpoint on a corpus and print JSON with bits_per_byte and loss "
                    "(nats per token). With --tasks: run lm-evaluation-harness tasks (needs the eval "
                    "extra), print its results table and write its JSON under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--data", default=None, help="'stdlib', a path, or synthetic:TASK (as for train); "
                                                "unset: the data the checkpoint was trained on")
    p.add_argument("--split", choices=("val", "train"), default="val", help="held-out (val) or training split")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence; unset: the training seq-len")
    p.add_argument("--batch-size", type=_batch_size, default=8,
                   help="sequences per forward (with --tasks also auto: measured)")
    p.add_argument("--max-sequences", type=int, default=None, help="evaluate at most this many sequences")
    p.add_argument("--text-field", default=None, help="JSONL field holding the text; unset: as trained")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and numba")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="GEMM precision (auto: bf16 on GPU, fp32 on CPU; bf16 on CPU needs native bf16)")
    p.add_argument("--quantize", choices=("int8", "bf16"), default=None,
                   help="weight-only quantization of the projections and embedding (RG-LRU, norms, state stay fp32)")
    h = p.add_argument_group("lm-evaluation-harness (pip install 'griffinlm[eval]')")
    h.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="harness task names, task YAML files or a directory of YAML files")
    h.add_argument("--include-path", default=None, help="a directory of extra task YAMLs")
    h.add_argument("--num-fewshot", type=int, default=None)
    h.add_argument("--limit", type=float, default=None, help="examples per task (a count, or a fraction < 1)")
    h.add_argument("--log-samples", action="store_true", help="also write every sample's inputs and outputs")
    h.add_argument("--seed", type=int, default=None, help="harness seeds and the sampling seed (default: lm-eval's)")
    h.add_argument("--gen-kwargs", default=None, help="generation overrides, e.g. temperature=0.8,top_p=0.95")
    h.add_argument("--out", default=None, help="directory for the harness's results JSON (and samples)")
    p.set_defaults(func=run_eval)
    return p


def _run_tasks(args: argparse.Namespace) -> int:
    from ..evaluate.lm_eval_adapter import harness_args, run_harness

    try:
        argv = harness_args(args.checkpoint, args.tasks, include_path=args.include_path,
                            num_fewshot=args.num_fewshot, limit=args.limit, batch_size=str(args.batch_size),
                            device=args.device, dtype=args.dtype, quantize=args.quantize, threads=args.threads,
                            seed=args.seed, log_samples=args.log_samples, output_path=args.out,
                            gen_kwargs=args.gen_kwargs)
        return run_harness(argv)
    except (ImportError, ValueError, FileNotFoundError, RuntimeError) as e:
        return _fail(str(e))


def run_eval(args: argparse.Namespace) -> int:
    if args.tasks:
        return _run_tasks(args)
    if args.batch_size == "auto":
        return _fail("--batch-size auto is for --tasks; give a number for bits per byte")
    if args.threads:
        from ..evaluate.cli import set_threads

        set_threads(args.threads)
    from ..checkpoint import CheckpointError, read_trainer
    from ..data import PackedSequences, eval_batches, open_corpus
    from ..loading import load
    from ..precision import compute_dtype
    from .data import SYNTHETIC_PREFIX, open_run_data
    from .loop import evaluate, resolve_device

    try:
        device = resolve_device(args.device)
        compute_dtype(device, args.dtype)
        model, tok = load(args.checkpoint, device, quantize=args.quantize)
        where, trainer = read_trainer(args.checkpoint)  # {} for a directory not written by training
        trained = trainer.get("train_config", {})
        seq_len = args.seq_len or trained.get("seq_len", 256)
        text_field = args.text_field or trained.get("text_field", "text")
        args.data = args.data or trained.get("data", "stdlib")
        if args.split == "val" or args.data.startswith(SYNTHETIC_PREFIX):
            data = open_run_data(args.data, tok.to_dict().get("path", "byte"), text_field, seq_len,
                                 args.batch_size, trained.get("seed", 0), verbose=False)
            batches = data.held_out(args.max_sequences)
        else:
            corpus = open_corpus(args.data, tok, text_field=text_field)
            seqs = PackedSequences(corpus.train, seq_len, tok.pad_id, (tok.bos_id, tok.eos_id, tok.pad_id),
                                   pad_last=True)
            batches = eval_batches(seqs, args.batch_size, args.max_sequences)
        result = evaluate(model, batches, device, args.dtype)
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError) as e:
        return _fail(str(e))
    print(json.dumps({"bits_per_byte": result["bits_per_byte"], "loss": result["loss"],
                      "target_tokens": result["target_tokens"], "bytes": result["bytes"], "split": args.split,
                      "data": args.data, "seq_len": seq_len, "checkpoint": where, "step": trainer.get("step"),
                      "quantize": args.quantize}, indent=1))
    return 0

