"""`griffinlm study ...`: the evaluation studies as sub-commands (registered by griffinlm.cli).

    griffinlm study extrapolation   --budget small --out results
    griffinlm study copy-retrieval  --budget small --out results
    griffinlm study glu-variants    --budget small --out results
    griffinlm study scaling         --budget small --out results
    griffinlm study multiple-choice --checkpoint runs/griffin-tiny --tasks questions.jsonl
    griffinlm study lm-eval         --checkpoint runs/griffin-tiny --tasks hellaswag   (= griffinlm eval --tasks)

`griffinlm eval --checkpoint DIR` (held-out bits per byte of one checkpoint) is the training
package's command; the studies live under their own command so that form stays unchanged.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from .study import BUDGETS

STUDIES = {
    "extrapolation": ("griffinlm.evaluate.extrapolation", "run_extrapolation",
                      "length extrapolation: bits/byte by position up to 16x the training length"),
    "copy-retrieval": ("griffinlm.evaluate.copy_retrieval", "run_copy_retrieval",
                       "selective copying, induction heads, phonebook: accuracy vs step and test length"),
    "glu-variants": ("griffinlm.evaluate.glu_variants", "run_glu_variants",
                     "the GLU-variant FFN comparison at equal parameters over seeds, learned Swish betas"),
    "scaling": ("griffinlm.evaluate.scaling", "run_scaling",
                "sweep of sizes and token budgets, loss = a * FLOPs^-b + c per architecture"),
}


def _common(p: argparse.ArgumentParser, default_out: str = "results") -> None:
    p.add_argument("--out", default=default_out, help="report directory (runs are cached in OUT/runs/)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--recompute", action="store_true", help="ignore cached runs and compute everything again")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `study` and its sub-commands on the top-level sub-parser collection."""
    p = subparsers.add_parser("study", help="reproduce the papers' claims in miniature (reports + plots)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="study", metavar="STUDY")
    for name, (_, _, help_text) in STUDIES.items():
        q = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        q.add_argument("--budget", choices=BUDGETS, default="small",
                       help="micro: seconds (tests); small: minutes on a CPU; medium/large: a GPU; "
                            "paper (copy-retrieval only): the paper's setting, trained until solved")
        q.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", default=[],
                       help="override a study setting, e.g. --set steps=500 'archs=[\"hawk\",\"griffin\"]'")
        _common(q)
        q.set_defaults(func=_run_study)
    q = sub.add_parser("multiple-choice", help="log-likelihood scoring of multiple-choice JSONL files",
                       description="Score a model on local JSONL files of "
                                   '{"question": ..., "choices": [...], "answer": index or choice text}.',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--checkpoint", help="a `griffinlm train` run or checkpoint directory")
    q.add_argument("--model", help="a preset with random weights instead of a checkpoint (a chance baseline)")
    q.add_argument("--tasks", nargs="+", required=True, metavar="FILE.jsonl", help="task files")
    q.add_argument("--batch-size", type=int, default=16)
    _common(q)
    q.set_defaults(func=_run_multiple_choice)
    q = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a checkpoint (the same as "
                                       "`griffinlm eval --tasks`; pip install 'griffinlm[eval]')",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--checkpoint", required=True, help="a `griffinlm train` run or checkpoint directory")
    q.add_argument("--tasks", nargs="+", required=True,
                   help="harness task names, task YAML files or a directory of YAML files")
    q.add_argument("--include-path", default=None, help="a directory of extra task YAMLs")
    q.add_argument("--limit", type=float, default=None, help="examples per task (a count, or a fraction < 1)")
    q.add_argument("--num-fewshot", type=int, default=None)
    q.add_argument("--batch-size", default="16", help="an integer, or auto (measured)")
    q.add_argument("--log-samples", action="store_true", help="also write every sample's inputs and outputs")
    q.add_argument("--seed", type=int, default=None, help="harness seeds and the sampling seed")
    q.add_argument("--out", default="results", help="directory for the harness's results JSON (and samples)")
    q.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda[:N]")
    q.add_argument("--threads", type=int, default=None, help="CPU threads for torch and numba")
    q.set_defaults(func=_run_lm_eval)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


def set_threads(threads: int) -> None:
    """CPU threads for torch and for numba's parallel loops (the CPU RG-LRU kernels): left at its
    default (all cores), numba's pool competes with torch's and with other processes, which made
    recurrent models many times slower on a busy machine."""
    import torch

    torch.set_num_threads(threads)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def _context(args: argparse.Namespace, command: str):
    from ..train.loop import resolve_device
    from .study import StudyContext

    if args.threads:
        set_threads(args.threads)
    return StudyContext(args.out, resolve_device(args.device), command, args.recompute, args.quiet)


def _command(args: argparse.Namespace, extra: list[str]) -> str:
    """The canonical command line that reproduces this study (shown in its report)."""
    parts = ["griffinlm", "study", args.study, *extra, "--out", args.out]
    if args.device != "auto":
        parts += ["--device", args.device]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


def _run_study(args: argparse.Namespace) -> int:
    import importlib

    from ..cli_settings import parse_overrides

    overrides = parse_overrides(args.set)
    module, fn, _ = STUDIES[args.study]
    extra = ["--budget", args.budget] + (["--set", *args.set] if args.set else [])
    ctx = _context(args, _command(args, extra))
    data = getattr(importlib.import_module(module), fn)(ctx, args.budget, overrides)
    path = data.get("report") or os.path.join(args.out, f"{args.study}.md")
    ctx.log(f"{args.study}: {ctx.cache.misses} runs computed, {ctx.cache.hits} from the cache")
    print(f"report: {path}\nplot: {path[:-len('.md')]}.png")
    return 0 if data else 1


def _run_multiple_choice(args: argparse.Namespace) -> int:
    from ..data import load_tokenizer
    from .multiple_choice import run_multiple_choice

    if bool(args.checkpoint) == bool(args.model):
        raise ValueError("give exactly one of --checkpoint DIR or --model PRESET")
    extra = (["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model]) + ["--tasks", *args.tasks]
    ctx = _context(args, _command(args, extra))
    if args.checkpoint:
        from ..loading import load

        model, tok = load(args.checkpoint, ctx.device)
        name = args.checkpoint
    else:
        import torch

        from ..config import ModelConfig
        from ..model import LanguageModel
        torch.manual_seed(0)
        model = LanguageModel(ModelConfig.preset(args.model)).to(ctx.device).eval()
        tok, name = load_tokenizer("byte"), f"{args.model} (random weights)"
    data = run_multiple_choice(ctx, model, tok, args.tasks, name, args.batch_size)
    for task, r in data["results"].items():
        print(f"{task}: acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f} (chance {r['chance']:.4f}, "
              f"{r['questions']} questions)")
    print(f"report: {os.path.join(args.out, 'multiple-choice.md')}")
    return 0


def _run_lm_eval(args: argparse.Namespace) -> int:
    from .lm_eval_adapter import harness_args, run_harness

    try:
        return run_harness(harness_args(args.checkpoint, args.tasks, include_path=args.include_path,
                                        num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                                        device=args.device, threads=args.threads, seed=args.seed,
                                        log_samples=args.log_samples, output_path=args.out))
    except (ImportError, ValueError) as e:
        print(f"griffinlm study lm-eval: {e}", file=sys.stderr)
        return 2
