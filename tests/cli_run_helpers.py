"""Running `griffinlm` as users do, in one process or under torchrun, and comparing runs' losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from griffinlm.parallel.launch import free_port


def run_griffinlm(args: list, nproc: int = 1, check: bool = True, env: dict | None = None
                  ) -> subprocess.CompletedProcess:
    """`python -m griffinlm ARGS`, or under `torch.distributed.run` with `nproc` processes (one
    thread each, five minutes at most, `env` added to the environment); asserts success unless
    check=False."""
    args = [str(a) for a in args]
    if nproc == 1:
        cmd = [sys.executable, "-m", "griffinlm", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "griffinlm", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out) -> list[tuple[str, int, float]]:
    """(kind, step, loss) of every record in a run's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(d["kind"], d["step"], d["loss"]) for d in map(json.loads, f)]


def assert_same_losses(a: list, b: list, tol: float = 1e-5) -> None:
    """The same records, step by step, with losses within `tol`."""
    assert [(k, s) for k, s, _ in a] == [(k, s) for k, s, _ in b]
    for (kind, step, x), (_, _, y) in zip(a, b):
        assert abs(x - y) < tol, f"{kind} loss at step {step}: {x} vs {y}"
