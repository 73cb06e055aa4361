"""`griffinlm serve`: load a checkpoint and serve it over HTTP (see `serve.api`)."""
from __future__ import annotations

import argparse
import os
import signal
import sys


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (continuous batching over state slots)",
        description="Serve a checkpoint at /v1/completions and /v1/chat/completions (OpenAI API, streaming), "
                    "/v1/models, /health and /metrics (Prometheus). Needs the `serve` extra.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint or training run directory (griffinlm format; "
                                                       "convert RecurrentGemma with `griffinlm convert` first)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=64, help="state slots: requests decoded at once")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: the context for global attention, else 1M)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="prompt tokens prefilled per engine iteration")
    p.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="memory for kept prompt-prefix states (0: no prefix cache)")
    p.add_argument("--model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="GEMM precision (auto: bf16 on GPU, fp32 on CPU; bf16 on CPU needs native bf16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quantize", choices=("int8", "bf16"), default=None,
                   help="weight-only quantization of the projections and embedding (RG-LRU, norms, state stay fp32)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .api import create_app
    except ImportError as e:
        print(f"griffinlm serve needs the `serve` extra (pip install 'griffinlm[serve]'): {e}", file=sys.stderr)
        return 2
    import torch

    from ..inference.text import load_for_inference
    from ..precision import autocast
    from .engine import Engine
    from .metrics import ServeMetrics

    if args.threads:
        torch.set_num_threads(args.threads)
    precision = autocast(torch.device(args.device), args.dtype)  # refuses bf16 where the CPU lacks it
    model, tok = load_for_inference(args.checkpoint, args.device)
    if args.quantize:
        from ..quantize import quantize_

        quantize_(model, args.quantize)
    metrics = ServeMetrics()
    engine = Engine(model, tok, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_prompt_tokens=args.max_prompt_tokens, chunk_tokens=args.chunk_tokens, metrics=metrics,
                    precision=precision, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    app = create_app(engine, name, metrics)
    # uvicorn drains on SIGTERM (stops accepting, lets open streams finish within the grace
    # period), then raises the signal again for the previous handler: this one makes that a
    # clean exit 0 rather than death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=30)
    finally:
        engine.stop()
    return 0
