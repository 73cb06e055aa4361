"""`griffinlm serve`: load a checkpoint and serve it over HTTP (see `serve.api`)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


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

    from ..loading import load
    from ..precision import autocast
    from .engine import Engine
    from .metrics import ServeMetrics

    if args.threads:
        torch.set_num_threads(args.threads)
    precision = autocast(torch.device(args.device), args.dtype)  # refuses bf16 where the CPU lacks it
    model, tok = load(args.checkpoint, args.device, quantize=args.quantize)
    metrics = ServeMetrics()
    # The engine runs in this (main) thread, which loaded the model: every torch op stays on one
    # OpenMP thread team (a second team slows both down on a small machine, BENCHMARKS.md), and
    # HTTP runs in a thread of its own.
    engine = Engine(model, tok, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_prompt_tokens=args.max_prompt_tokens, chunk_tokens=args.chunk_tokens, metrics=metrics,
                    precision=precision, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20), background=False)
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name, metrics), host=args.host, port=args.port,
                                           log_level="info", timeout_graceful_shutdown=30))
    status = {"code": 0}

    def serve_http() -> None:
        try:
            server.run()
        except SystemExit as e:  # uvicorn exits on a startup failure (e.g. the port is taken)
            status["code"] = e.code if isinstance(e.code, int) else 1
        except BaseException:
            status["code"] = 1
            raise
        finally:
            engine.stop()  # ends engine.run() below

    def drain(*_) -> None:
        # as uvicorn does on SIGTERM/SIGINT: stop accepting, let open streams finish (30 s grace)
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    http = threading.Thread(target=serve_http, name="griffinlm-http", daemon=True)
    http.start()
    engine.run()
    http.join(timeout=5)
    if not server.started and status["code"] == 0:
        status["code"] = 1
    return status["code"]
