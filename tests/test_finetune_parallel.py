"""`torchrun -m griffinlm finetune`: data-parallel fine-tuning gives the one-process run.

LoRA replicates the adapters only (plain tensors, one gradient all-reduce per step; its
checkpoints are the single-process ones, so runs move between world sizes); full fine-tuning
goes through the same FSDP2 replicate as `griffinlm train`.
"""
from __future__ import annotations

import os

import pytest
from cli_run_helpers import assert_same_losses, losses, run_griffinlm

from griffinlm.checkpoint import list_checkpoints

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base run, instruction data): a tiny Griffin trained a few steps, the shipped example data."""
    root = tmp_path_factory.mktemp("ftpar")
    base = root / "base"
    run_griffinlm(["train", "--model", "griffin-tiny", "--config", "width=64", "depth=3", "num_heads=2", "local_window=16",
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
    run_griffinlm(_args(setup, one, *lora))
    r = run_griffinlm(_args(setup, two, *lora, "--merge"), nproc=2)
    assert r.stdout.count("held-out completion loss") == 1  # rank 0 reports
    assert_same_losses(losses(two), losses(one))
    # single-process checkpoints holding the adapters only, and rank 0's outputs
    from safetensors import safe_open
    with safe_open(os.path.join(list_checkpoints(str(two))[-1], "model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())
    assert (two / "adapter" / "adapter_model.safetensors").is_file() and (two / "merged").is_dir()
    # 2 ranks killed after step 2, resumed by 1 process: the same run
    cut = tmp_path / "cut"
    assert run_griffinlm(_args(setup, cut, *lora, "--debug-kill-at-step", 2), nproc=2, check=False).returncode != 0
    run_griffinlm(_args(setup, cut, *lora, "--resume"))
    assert_same_losses(losses(cut), losses(one))


def test_full_finetune_on_2_ranks_is_the_one_processrun_griffinlm(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_griffinlm(_args(setup, one, "--full"))
    run_griffinlm(_args(setup, two, "--full", "--merge"), nproc=2)
    assert_same_losses(losses(two), losses(one))
    assert (two / "merged").is_dir() and not (two / "adapter").exists()
