"""Training loop: decay groups, schedule, bits/byte accounting, learning, exact resume, CLI."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from griffinlm import LanguageModel, ModelConfig
from griffinlm.checkpoint import CheckpointError
from griffinlm.ops.gemm_backend import GEMM_CALLS, native_bf16
from griffinlm.data import ByteTokenizer, PackedSequences, eval_batches, open_corpus
from griffinlm.train import TrainConfig, Trainer, decay_groups, evaluate, lr_at, make_optimizer
from griffinlm.cli import main as cli_main
from griffinlm.train.records import read_metrics

TINY = dict(width=32, depth=3, num_heads=2, local_window=8, mlp_expansion=2.0)


def tiny(preset="griffin-tiny", **kw):
    return ModelConfig.preset(preset, **{**TINY, **kw})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch):
    """A small corpus of regular text, and a private corpus cache."""
    monkeypatch.setenv("GRIFFINLM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "corpus"
    root.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    for i in range(40):
        lines = [f"def f{j}(x):\n    return x + {words[(i + j) % 5]}\n" for j in range(12)]
        (root / f"mod{i:02d}.py").write_text("".join(lines))
    return str(root)


def run_cfg(data, **kw):
    base = dict(data=data, steps=6, batch_size=4, seq_len=32, lr=3e-3, eval_every=3, eval_sequences=4,
                save_every=2, progress=False, tensorboard=False, sample_tokens=0)
    return TrainConfig(**{**base, **kw})


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if r["kind"] == "train"]


def test_weight_decay_groups_are_as_specified():
    model = LanguageModel(tiny())
    decay, no_decay = decay_groups(model)
    assert "embed.weight" in no_decay
    for name, p in model.named_parameters():
        if name.endswith("lambda_") or name.endswith("bias") or "norm" in name:
            assert name in no_decay, name
        if p.ndim >= 2 and name != "embed.weight" and not name.endswith("bias"):
            assert name in decay, name
    assert any(n.endswith("rg_lru.lambda_") for n in no_decay)
    assert any(n.endswith("gate_r_weight") for n in decay)  # block-diagonal (3-D) gate weights decay
    assert any(n.endswith("gate_r_bias") for n in no_decay)  # (heads, block) gate biases do not
    assert set(decay) | set(no_decay) == {n for n, _ in model.named_parameters()}
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(p.ndim == 1 or p is model.embed.weight or n.endswith("bias")
               for n, p in zip(opt.param_groups[1]["names"], opt.param_groups[1]["params"]))


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1)


class Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, tokens, segment_pos=None):
        return torch.zeros(*tokens.shape, self.vocab) + self.w


def test_bits_per_byte_accounting(corpus_dir):
    tok = ByteTokenizer()
    corpus = open_corpus(corpus_dir, tok)
    val = PackedSequences(corpus.val, 16, tok.pad_id, (tok.bos_id, tok.eos_id, tok.pad_id), pad_last=True)
    r = evaluate(Uniform(tok.vocab_size), eval_batches(val, 4), torch.device("cpu"))
    assert r["loss"] == pytest.approx(math.log(tok.vocab_size))
    assert r["bytes"] == corpus.val.num_bytes  # bytes only: no BOS, EOS or PAD
    # every non-BOS token of the split is a target once: its bytes plus one EOS per document
    assert r["target_tokens"] == corpus.val.num_bytes + len(corpus.val.doc_starts)
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * r["target_tokens"] / r["bytes"])


def test_loss_decreases_on_a_tiny_run(corpus_dir, tmp_path):
    out = str(tmp_path / "run")
    cfg = run_cfg(corpus_dir, steps=40, batch_size=8, eval_every=20, save_every=40)
    summary = Trainer(tiny("transformer-tiny"), cfg, out).run()
    ls = [l for _, l in losses(out)]
    assert sum(ls[-5:]) / 5 < 0.6 * sum(ls[:5]) / 5
    assert summary["held_out"]["bits_per_byte"] < 4.0  # uniform over 259 tokens would be 8.0
    assert os.path.isfile(os.path.join(out, "loss_curve.png"))
    assert json.load(open(os.path.join(out, "summary.json")))["step"] == 40


def test_resume_after_interruption_gives_identical_losses(corpus_dir, tmp_path):
    # Griffin is resumed in test_sigkilled_run_resumes_exactly (in child processes, where the numba
    # kernels are disabled); the Transformer here keeps this process free of a JIT compile.
    cfg = run_cfg(corpus_dir, grad_accum=2)
    full = str(tmp_path / "full")
    model = tiny("transformer-tiny")
    ref = Trainer(model, cfg, full).run()
    part = str(tmp_path / "part")
    assert Trainer(model, cfg, part).run(until=5) is None  # stops after step 5; newest checkpoint is 4
    resumed = Trainer(None, cfg, part, resume=True)  # model config read from the checkpoint
    assert resumed.step == 4
    out = resumed.run()
    assert losses(part) == losses(full)  # bit-for-bit, and step 5 is logged once
    assert out["held_out"] == ref["held_out"]


def test_mismatched_config_on_resume_is_refused(corpus_dir, tmp_path):
    out = str(tmp_path / "run")
    Trainer(tiny("transformer-tiny"), run_cfg(corpus_dir, steps=2), out).run()
    with pytest.raises(CheckpointError) as e:
        Trainer(tiny("transformer-tiny", width=48, depth=2), run_cfg(corpus_dir, steps=4), out, resume=True)
    assert "width: checkpoint has 32, requested 48" in str(e.value) and "depth" in str(e.value)
    with pytest.raises(CheckpointError, match="seq_len: checkpoint has 32, requested 16"):
        Trainer(tiny("transformer-tiny"), run_cfg(corpus_dir, steps=4, seq_len=16), out, resume=True)
    with pytest.raises(CheckpointError, match="--resume"):
        Trainer(tiny("transformer-tiny"), run_cfg(corpus_dir, steps=4), out)  # would overwrite the run
    t = Trainer(None, run_cfg(corpus_dir, steps=4), out, resume=True)  # more steps is fine
    assert t.step == 2


def test_sigkilled_run_resumes_exactly(corpus_dir, tmp_path):
    env = {**os.environ, "GRIFFINLM_DISABLE_NUMBA": "1"}  # skip JIT compilation in the child processes
    args = ["--model", "griffin-tiny", "--config", *[f"{k}={v}" for k, v in TINY.items()],
            "--data", corpus_dir, "--steps", "5", "--batch-size", "4", "--seq-len", "32",
            "--save-every", "2", "--eval-every", "10", "--sample-tokens", "0", "--no-progress", "--no-tensorboard",
            "--threads", "1", "--no-plot"]

    def train(out, *extra):
        cmd = [sys.executable, "-m", "griffinlm", "train", *args, "--out", out, *extra]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    runs = [train(full), train(part, "--debug-kill-at-step", "3")]  # side by side: mostly imports
    (_, err), _ = runs[0].communicate(timeout=120), runs[1].communicate(timeout=120)
    assert runs[0].returncode == 0, err
    assert runs[1].returncode == -signal.SIGKILL
    assert len(losses(part)) == 3  # step 3 was logged but not checkpointed
    done = train(part, "--resume")
    stdout, stderr = done.communicate(timeout=120)
    assert done.returncode == 0, stderr
    assert "held-out bits/byte" in stdout and "resumed from" in stderr
    assert losses(part) == losses(full)


def test_synthetic_task_trains(tmp_path):
    cfg = TrainConfig(data="synthetic:induction_heads", steps=3, batch_size=4, eval_every=2,
                      eval_sequences=8, progress=False, tensorboard=False, sample_tokens=0)
    summary = Trainer(tiny("transformer-tiny"), cfg, str(tmp_path / "run")).run()
    assert math.isfinite(summary["held_out"]["loss"])


def test_cli_errors_and_eval(corpus_dir, tmp_path, capsys):
    base = ["train", "--data", corpus_dir, "--steps", "2", "--batch-size", "2", "--seq-len", "16",
            "--no-progress", "--no-tensorboard", "--sample-tokens", "8"]
    assert cli_main([*base, "--model", "griffin-huge", "--out", str(tmp_path / "a")]) == 2
    assert "unknown preset 'griffin-huge'" in capsys.readouterr().err
    assert cli_main([*base, "--model", "hawk-tiny", "--seq-len", "1", "--out", str(tmp_path / "a")]) == 2
    assert "seq_len must be at least 2" in capsys.readouterr().err
    bad = ["--data", str(tmp_path / "missing"), "--model", "hawk-tiny", "--out", str(tmp_path / "a")]
    assert cli_main([*base, *bad]) == 2
    assert "data path not found" in capsys.readouterr().err
    out = str(tmp_path / "run")
    cfg = ["--model", "transformer-tiny", "--config", "width=32", "depth=2", "num_heads=2", "--out", out]
    assert cli_main([*base, *cfg]) == 0
    printed = capsys.readouterr().out
    assert "held-out bits/byte:" in printed and "sample" in printed
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert cli_main(["eval", "--checkpoint", out]) == 0  # data: as trained
    result = json.loads(capsys.readouterr().out)
    assert result["bits_per_byte"] == pytest.approx(summary["held_out"]["bits_per_byte"], rel=1e-5)
    assert result["loss"] == pytest.approx(summary["held_out"]["loss"], rel=1e-5)
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--data", corpus_dir]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    for cmd in ("train", "eval"):
        with pytest.raises(SystemExit) as e:
            cli_main([cmd, "--help"])
        assert e.value.code == 0


def test_resume_skips_a_damaged_latest_checkpoint(corpus_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = run_cfg(corpus_dir, steps=4, eval_every=10)
    Trainer(tiny("transformer-tiny"), cfg, out).run()
    before = losses(out)
    weights = os.path.join(out, "checkpoints", "step_00000004", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    t = Trainer(None, cfg, out, resume=True)
    assert t.step == 2
    assert "skipping damaged checkpoint" in capsys.readouterr().err and "model.safetensors" in weights
    t.run()
    assert losses(out) == before


@pytest.mark.skipif(not native_bf16(), reason="CPU without native bf16")
def test_bf16_training_matches_fp32_losses(corpus_dir, tmp_path):
    """20 steps of a tiny Griffin in fp32 and in CPU bf16 autocast from one init and one data
    order: bf16 GEMMs (8 mantissa bits, fp32 accumulation, fp32 weights and loss) keep every
    step's loss within 0.5% of fp32's and learn as much."""
    cfg = dict(steps=20, batch_size=4, eval_every=20, save_every=20, lr=3e-3)
    runs = {}
    for dtype in ("fp32", "bf16"):
        GEMM_CALLS.clear()
        out = str(tmp_path / dtype)
        runs[dtype] = (Trainer(tiny(), run_cfg(corpus_dir, dtype=dtype, **cfg), out).run(), losses(out))
        assert (GEMM_CALLS["forward:bf16"] > 0) == (dtype == "bf16")
    (s32, l32), (s16, l16) = runs["fp32"], runs["bf16"]
    assert [s for s, _ in l32] == [s for s, _ in l16] == list(range(1, 21))
    for (_, a), (_, b) in zip(l32, l16):
        assert b == pytest.approx(a, rel=0.005)
    assert l16[-1][1] < 0.8 * l16[0][1]
    assert s16["held_out"]["bits_per_byte"] == pytest.approx(s32["held_out"]["bits_per_byte"], rel=0.02)


def test_bf16_is_refused_on_a_cpu_without_it(corpus_dir, tmp_path, monkeypatch, capsys):
    import griffinlm.precision as precision
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    with pytest.raises(ValueError, match="dtype bf16 needs native bf16"):
        Trainer(tiny(), run_cfg(corpus_dir, dtype="bf16", device="cpu"), str(tmp_path / "run"))
    with pytest.raises(ValueError, match="dtype must be auto, fp32 or bf16, got 'fp8'"):
        run_cfg(corpus_dir, dtype="fp8")
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "x"), "--dtype", "bf16", "--device", "cpu"]) == 2
    assert "dtype bf16 needs native bf16" in capsys.readouterr().err


def test_train_flags_come_from_train_config():
    """Every TrainConfig field is a `griffinlm train` flag with help text, and the parsed flags
    build the config back (one source of truth)."""
    import argparse
    import dataclasses

    from griffinlm.cli_settings import settings_from_args
    from griffinlm.train.cli import add_train_parser
    from griffinlm.train.config import TrainConfig

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    train = next(a for a in parser._subparsers._group_actions[0].choices.values())
    dests = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in dests and dests[f.name].help, f.name
    args = parser.parse_args(["train", "--eps", "1e-6", "--no-plot", "--temperature", "0.3", "--warmup-steps", "5",
                              "--grad-checkpointing", "--dtype", "fp32"])
    cfg = settings_from_args(TrainConfig, args)
    assert (cfg.eps, cfg.plot, cfg.sample_temperature, cfg.warmup_steps) == (1e-6, False, 0.3, 5)
    assert cfg.grad_checkpointing and cfg.dtype == "fp32" and cfg.progress
    assert settings_from_args(TrainConfig, parser.parse_args(["train"])) == TrainConfig()


def test_activation_checkpointing_is_applied_from_outside_and_changes_no_number(tmp_path):
    """--grad-checkpointing: the trainer's parallelize step checkpoints every block (the model
    has no switch of its own); the losses are those of the run without it."""
    base = dict(data="synthetic:induction_heads", steps=3, batch_size=4, eval_every=3, eval_sequences=8,
                progress=False, tensorboard=False, plot=False, sample_tokens=0)
    losses = []
    for flag in (False, True):
        trainer = Trainer(tiny("griffin-tiny"), TrainConfig(**base, grad_checkpointing=flag), str(tmp_path / str(flag)))
        assert all(getattr(b, "_griffinlm_checkpointed", False) == flag for b in trainer.model.blocks)
        trainer.run()
        with open(tmp_path / str(flag) / "metrics.jsonl") as f:
            losses.append([r["loss"] for r in map(json.loads, f) if r["kind"] == "train"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_training_loss_is_the_chunked_tied_cross_entropy(soft_cap):
    """The step's loss (`batch_nats`: hidden states into the chunked tied cross-entropy) equals
    `masked_nats` of the model's logits, value and every parameter gradient, soft-cap included."""
    from griffinlm.data import Batch
    from griffinlm.train.step import batch_nats, masked_nats

    cfg = tiny("griffin-tiny", logits_soft_cap=soft_cap)
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    segment_pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    batch = Batch(tokens, targets, segment_pos, torch.rand(2, 12, generator=g) < 0.8, 0.0)
    got = batch_nats(model, batch)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    want = masked_nats(model(tokens, segment_pos=segment_pos), batch)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
