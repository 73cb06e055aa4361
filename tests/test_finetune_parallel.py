"""`torchrun -m griffinlm finetune`: data-parallel fine-tuning gives the one-process run.

LoRA replicates the adapters only (plain tensors, one gradient all-reduce per step; its
checkpoints are the single-process ones, so runs move between world sizes); full fine-tuning
goes through the same FSDP2 replicate as `griffinlm train`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from griffinlm.checkpoint import list_checkpoints
from griffinlm.parallel.launch import free_port

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

STEPS = 4


def _run(args: list, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    args = [str(a) for a in args]
    if nproc == 1:
        cmd = [sys.executable, "-m", "griffinlm", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "griffinlm", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(d["kind"], d["step"], d["loss"]) for d in map(json.loads, f)]


def _same(a: list, b: list) -> None:
    assert [(k, s) for k, s, _ in a] == [(k, s) for k, s, _ in b]
    for (kind, step, x), (_, _, y) in zip(a, b):
        assert abs(x - y) < 1e-5, f"{kind} loss at step {step}: {x} vs {y}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base run, instruction data): a tiny Griffin trained a few steps, the shipped example data."""
    root = tmp_path_factory.mktemp("ftpar")
    base = root / "base"
    _run(["train", "--model", "griffin-tiny", "--config", "width=64", "depth=3", "num_heads=2", "local_window=16",
          "--steps", 4, "--batch-size", 4, "--seq-len", 64, "--sample-tokens", 0, "--no-progress", "--no-plot",
          "--no-tensorboard", "--threads", 1, "--out", base])
    data = os.path.join(os.path.dirname(__file__), "..", "examples", "finetune", "fruit_colors.jsonl")
    return str(base), os.path.abspath(data)


def _args(setup, out, *extra) -> list:
    base, data = setup
    return ["finetune", "--checkpoint", base, "--data", data, "--out", out, "--steps", STEPS, "--batch-size", 8,
            "--seq-len", 96, "--eval-every", 2, "--save-every", 2, "--answer-tokens", 4, "--no-progress",
            "--no-plot", "--no-tensorboard", "--threads", 1, *extra]


def test_lora_on_2_ranks_is_the_one_process_run_and_resumes_across_world_sizes(setup, tmp_path):
    lora = ["--lora", "r=4,alpha=8,dropout=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_args(setup, one, *lora))
    r = _run(_args(setup, two, *lora, "--merge"), nproc=2)
    assert r.stdout.count("held-out completion loss") == 1  # rank 0 reports
    _same(_losses(two), _losses(one))
    # single-process checkpoints holding the adapters only, and rank 0's outputs
    from safetensors import safe_open
    with safe_open(os.path.join(list_checkpoints(str(two))[-1], "model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())
    assert (two / "adapter" / "adapter_model.safetensors").is_file() and (two / "merged").is_dir()
    # 2 ranks killed after step 2, resumed by 1 process: the same run
    cut = tmp_path / "cut"
    assert _run(_args(setup, cut, *lora, "--debug-kill-at-step", 2), nproc=2, check=False).returncode != 0
    _run(_args(setup, cut, *lora, "--resume"))
    _same(_losses(cut), _losses(one))


def test_full_finetune_on_2_ranks_is_the_one_process_run(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_args(setup, one, "--full"))
    _run(_args(setup, two, "--full", "--merge"), nproc=2)
    _same(_losses(two), _losses(one))
    assert (two / "merged").is_dir() and not (two / "adapter").exists()
