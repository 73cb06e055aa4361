"""Where griffinlm keeps what it builds or measures once per machine (corpora, GEMM choices)."""
from __future__ import annotations

import os


def cache_dir() -> str:
    """$GRIFFINLM_CACHE, else $XDG_CACHE_HOME/griffinlm, else ~/.cache/griffinlm."""
    if os.environ.get("GRIFFINLM_CACHE"):
        return os.environ["GRIFFINLM_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "griffinlm")
