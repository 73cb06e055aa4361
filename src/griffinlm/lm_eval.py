"""`python -m griffinlm.lm_eval ARGS`: EleutherAI's lm-evaluation-harness command line, exactly its
arguments and output, with the "griffinlm" model registered (the harness has no plugin hook):

    python -m griffinlm.lm_eval --model griffinlm --model_args pretrained=runs/demo --tasks arc_easy

Needs the `eval` extra: pip install 'griffinlm[eval]'.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .evaluate.lm_eval_adapter import run_harness

    try:
        return run_harness(sys.argv[1:] if argv is None else argv)
    except ImportError as e:
        print(f"griffinlm.lm_eval: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
