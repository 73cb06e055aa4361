"""`torchrun -m griffinlm train` with --tp/--fsdp runs one process's training: the same losses,
and checkpoints that resume across layouts (2 ranks -> 1 process, 1 process -> 2 ranks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from griffinlm.parallel.launch import free_port

pytestmark = pytest.mark.slow

STEPS = 4


def _args(corpus: str, out: str) -> list[str]:
    return ["train", "--model", "griffin-tiny", "--config", "width=64", "depth=3", "--data", corpus,
            "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
            "--eval-sequences", "4", "--sample-tokens", "4", "--no-progress", "--no-tensorboard", "--no-plot",
            "--threads", "1", "--device", "cpu", "--out", out]


def _run(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "griffinlm", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "griffinlm", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out: str) -> list[tuple[str, int, float]]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(d["kind"], d["step"], d["loss"]) for d in map(json.loads, f)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(open(json.decoder.__file__).read() * 3)  # any few tens of kB of text
    return str(path)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> list:
    out = str(tmp_path_factory.mktemp("single"))
    _run(_args(corpus, out))
    return _losses(out)


def _same(a: list, b: list) -> None:
    assert [(k, s) for k, s, _ in a] == [(k, s) for k, s, _ in b]
    for (kind, step, x), (_, _, y) in zip(a, b):
        assert abs(x - y) < 1e-5, f"{kind} loss at step {step}: {x} vs {y}"


def test_tp2_run_matches_one_process_and_writes_a_distributed_checkpoint(corpus, single, tmp_path):
    out = str(tmp_path / "tp2")
    _run(_args(corpus, out) + ["--tp", "2"], nproc=2)
    _same(_losses(out), single)
    ckpt = os.path.join(out, "checkpoints", f"step_{STEPS:08d}")
    assert os.path.isfile(os.path.join(ckpt, "dcp", ".metadata"))
    r = _run(["eval", "--checkpoint", out, "--data", corpus, "--seq-len", "32", "--max-sequences", "4"])
    assert "bits_per_byte" in r.stdout  # the exported model.safetensors reads like any checkpoint


def test_fsdp_on_2_ranks_resumes_on_1_and_back(corpus, single, tmp_path):
    a = str(tmp_path / "a")  # 2 ranks (FSDP) killed after step 2, resumed by 1 process
    r = _run(_args(corpus, a) + ["--fsdp", "--debug-kill-at-step", "2"], nproc=2, check=False)
    assert r.returncode != 0
    _run(_args(corpus, a) + ["--resume"])
    _same(_losses(a), single)
    b = str(tmp_path / "b")  # 1 process killed after step 2, resumed by 2 ranks (FSDP)
    r = _run(_args(corpus, b) + ["--debug-kill-at-step", "2"], check=False)
    assert r.returncode != 0
    _run(_args(corpus, b) + ["--resume", "--fsdp"], nproc=2)
    _same(_losses(b), single)
