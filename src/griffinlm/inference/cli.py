"""`griffinlm generate`: stream a model's continuation of a prompt to stdout."""
from __future__ import annotations

import argparse
import sys
import time


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint, streamed to stdout")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (config.json + model.safetensors) or a training run directory")
    p.add_argument("--prompt", default="", help="text to continue (starts with BOS unless --no-bos)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    p.add_argument("--tokenizer", default=None, help="override: 'byte' or a tokenizer file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="GEMM precision (auto: bf16 on GPU, fp32 on CPU; bf16 on CPU needs native bf16)")
    p.add_argument("--quantize", choices=("int8", "bf16"), default=None,
                   help="weight-only quantization of the projections and embedding (RG-LRU, norms, state stay fp32)")
    p.add_argument("--no-bos", action="store_true", help="do not start the prompt with BOS")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop string (repeatable): generation ends as soon as the generated text contains it; "
                        "the stop string and what follows are not printed. Literal text: for a newline in "
                        "bash write --stop $'\\n'")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoding step (slow first step)")
    p.add_argument("--stats", action="store_true", help="print the generation time to stderr at the end")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from ..generate import check_sampling
    from ..precision import autocast
    from ..loading import load
    from .text import check_stop, stream_text

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p)
    check_stop(args.stop)
    precision = autocast(torch.device(args.device), args.dtype)  # refuses bf16 where the CPU lacks it
    model, tok = load(args.checkpoint, args.device, tokenizer=args.tokenizer, quantize=args.quantize)
    if args.compile:
        model.compile_decode_step()
    # the arguments (stop strings included) are checked here, before anything is printed
    stream = stream_text(model, tok, args.prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, bos=not args.no_bos,
                         stop_at_eos=not args.ignore_eos, stop=args.stop)
    out = sys.stdout
    if not args.no_echo:
        out.write(args.prompt)
        out.flush()
    start, pieces = time.perf_counter(), 0
    with torch.no_grad(), precision:
        for piece in stream:
            out.write(piece)
            out.flush()
            pieces += 1
    out.write("\n")
    out.flush()
    if args.stats:
        dt = time.perf_counter() - start
        print(f"[{pieces} text pieces in {dt:.2f} s]", file=sys.stderr)
    return 0
