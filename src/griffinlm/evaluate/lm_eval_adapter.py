"""griffinlm models in EleutherAI's lm-evaluation-harness (the `eval` extra: pip install 'griffinlm[eval]').

The harness (0.4.x) has no plugin hook: a model name exists once something registers it. So

    python -m griffinlm.lm_eval --model griffinlm --model_args pretrained=DIR --tasks ...

is the harness's own command line (exactly its arguments and output) with "griffinlm"
registered first; `griffinlm eval --checkpoint DIR --tasks ...` runs the same thing from our
CLI's flags. From Python, `register()` once, then `lm_eval.simple_evaluate(model="griffinlm",
model_args={"pretrained": DIR}, ...)` or any harness API. The model's arguments are listed in
`griffinlm.evaluate.lm_eval_model`; its request handling is `griffinlm.evaluate.harness`.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

INSTALL_HINT = ("lm-evaluation-harness is not installed: pip install lm-eval "
                "(or pip install 'griffinlm[eval]'), then retry")
MODEL_NAME = "griffinlm"
MODEL_TARGET = "griffinlm.evaluate.lm_eval_model:GriffinLMEval"


def register() -> None:
    """Registers the "griffinlm" model with the installed harness (idempotent).

    The harness's own models are registered first: its registry imports them only when it is
    empty, which our entry would otherwise prevent. Raises ImportError with the install command
    when lm_eval is missing."""
    import importlib

    try:
        importlib.import_module("lm_eval.models")  # registers the harness's own models
        from lm_eval.api.registry import model_registry
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def lm_eval_model_class() -> type:
    """The `lm_eval.api.model.LM` subclass for griffinlm checkpoints, registered as "griffinlm".

    Raises ImportError with the install command when lm_eval is missing."""
    register()
    from .lm_eval_model import GriffinLMEval

    return GriffinLMEval


@contextlib.contextmanager
def _argv(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def run_harness(argv: Sequence[str]) -> int:
    """The harness's command line (`lm_eval ARGS`) with "griffinlm" registered; returns its
    exit status."""
    register()
    from lm_eval.__main__ import cli_evaluate

    with _argv(["lm_eval", *argv]):
        try:
            cli_evaluate()
        except SystemExit as e:  # argparse errors and --help
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def harness_args(checkpoint: str, tasks: Sequence[str], *, include_path: str | None = None,
                 num_fewshot: int | None = None, limit: float | None = None, batch_size: str = "16",
                 device: str = "auto", dtype: str = "auto", quantize: str | None = None, threads: int | None = None,
                 seed: int | None = None, log_samples: bool = False, output_path: str | None = None,
                 gen_kwargs: str | None = None) -> list[str]:
    """The harness command line for `griffinlm eval --tasks ...`."""
    if "," in checkpoint:
        raise ValueError(f"the checkpoint path must not contain a comma (the harness splits model_args "
                         f"on commas): {checkpoint!r}")
    model_args = [f"pretrained={checkpoint}", f"dtype={dtype}"]
    if quantize:
        model_args.append(f"quantize={quantize}")
    if threads:
        model_args.append(f"threads={threads}")
    if seed is not None:
        model_args.append(f"seed={seed}")
    argv = ["run", "--model", MODEL_NAME, "--model_args", ",".join(model_args), "--tasks", *tasks,
            "--device", device, "--batch_size", str(batch_size)]
    if include_path:
        argv += ["--include_path", include_path]
    if num_fewshot is not None:
        argv += ["--num_fewshot", str(num_fewshot)]
    if limit is not None:
        argv += ["--limit", str(limit)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if output_path:
        argv += ["--output_path", output_path]
    if log_samples:
        if not output_path:
            raise ValueError("--log-samples needs --out DIR (the per-sample outputs are written there)")
        argv.append("--log_samples")
    if gen_kwargs:
        argv += ["--gen_kwargs", gen_kwargs]
    return argv
