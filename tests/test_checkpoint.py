"""Checkpoints: safe formats, atomic writes, clear errors on damage, config checks, pruning."""
import json
import os

import pytest
import torch

from griffinlm import LanguageModel, ModelConfig
from griffinlm.checkpoint import (CheckpointError, list_checkpoints, load_model, load_optimizer, load_weights,
                                  read_checkpoint, resolve_checkpoint, restore_rng, save_checkpoint)
from griffinlm.train import make_optimizer

CFG = ModelConfig.preset("transformer-tiny", width=32, depth=2, num_heads=2)


def trained_pair(steps=2):
    torch.manual_seed(0)
    model = LanguageModel(CFG)
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    for _ in range(steps):
        model(torch.randint(0, 256, (2, 8))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(run, step, model, opt, keep_last=3):
    return save_checkpoint(str(run), step, model, opt, {"train_config": {}, "data": {"epoch": 0}}, keep_last)


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = trained_pair()
    torch.manual_seed(123)
    path = save(tmp_path, 2, model, opt)
    expected_draw = torch.rand(3)
    ckpt = read_checkpoint(path)
    assert ckpt.step == 2 and ckpt.config == CFG
    model2 = LanguageModel(CFG)
    opt2 = make_optimizer(model2, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    load_weights(ckpt, model2)
    load_optimizer(ckpt, opt2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    assert s1["param_groups"] == s2["param_groups"]
    restore_rng(ckpt)
    assert torch.equal(torch.rand(3), expected_draw)
    # nothing pickled: JSON and safetensors only
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "state.safetensors", "trainer.json"]
    json.load(open(os.path.join(path, "trainer.json")))
    loaded, _ = load_model(str(tmp_path))
    assert not loaded.training


def test_truncated_checkpoint_gives_clear_error_and_previous_still_loads(tmp_path):
    model, opt = trained_pair()
    first = save(tmp_path, 1, model, opt)
    latest = save(tmp_path, 2, model, opt)
    weights = os.path.join(latest, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        read_checkpoint(latest)
    with pytest.raises(CheckpointError, match=latest):
        load_model(latest)
    assert read_checkpoint(first).step == 1
    model2, ckpt = load_model(first)
    assert ckpt.step == 1


def test_corrupt_bytes_and_corrupt_metadata_are_named(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 3, model, opt)
    state = os.path.join(path, "state.safetensors")
    data = bytearray(open(state, "rb").read())
    data[-5] ^= 0xFF  # same size, different content
    open(state, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="state.safetensors: sha256"):
        read_checkpoint(path)
    open(os.path.join(path, "trainer.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="trainer.json"):
        read_checkpoint(path)


def test_atomic_write_leaves_no_partial_checkpoint(tmp_path):
    model, opt = trained_pair()
    save(tmp_path, 1, model, opt)
    # what a run killed mid-save leaves behind: a temporary directory, never a step_ directory
    stale = tmp_path / "checkpoints" / ".tmp-step_00000002-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_00000001"]
    assert resolve_checkpoint(str(tmp_path)).endswith("step_00000001")
    save(tmp_path, 2, model, opt)
    assert not stale.exists()  # cleaned up by the next save


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model, opt = trained_pair(steps=1)
    for step in range(1, 6):
        save(tmp_path, step, model, opt, keep_last=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_00000004", "step_00000005"]


def test_config_mismatch_names_the_fields(tmp_path):
    model, opt = trained_pair(steps=1)
    path = save(tmp_path, 1, model, opt)
    other = LanguageModel(ModelConfig.preset("transformer-tiny", width=32, depth=3, num_heads=4))
    with pytest.raises(CheckpointError) as e:
        load_weights(read_checkpoint(path), other)
    assert "depth: checkpoint has 2, requested 3" in str(e.value)
    assert "num_heads: checkpoint has 2, requested 4" in str(e.value)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        resolve_checkpoint(str(tmp_path / "elsewhere"))
