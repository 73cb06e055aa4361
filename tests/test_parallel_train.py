"""`torchrun -m griffinlm train` with --tp/--fsdp runs one process's training: the same losses,
and checkpoints that resume across layouts (2 ranks -> 1 process, 1 process -> 2 ranks)."""
from __future__ import annotations

import json
import os

import pytest
from cli_run_helpers import assert_same_losses, losses, run_griffinlm

pytestmark = pytest.mark.slow

STEPS = 4


def _args(corpus: str, out: str) -> list[str]:
    return ["train", "--model", "griffin-tiny", "--config", "width=64", "depth=3", "--data", corpus,
            "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
            "--eval-sequences", "4", "--sample-tokens", "4", "--no-progress", "--no-tensorboard", "--no-plot",
            "--threads", "1", "--device", "cpu", "--out", out]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(open(json.decoder.__file__).read() * 3)  # any few tens of kB of text
    return str(path)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> list:
    out = str(tmp_path_factory.mktemp("single"))
    run_griffinlm(_args(corpus, out))
    return losses(out)


def test_tp2_run_matches_one_process_and_writes_a_distributed_checkpoint(corpus, single, tmp_path):
    out = str(tmp_path / "tp2")
    run_griffinlm(_args(corpus, out) + ["--tp", "2"], nproc=2)
    assert_same_losses(losses(out), single)
    ckpt = os.path.join(out, "checkpoints", f"step_{STEPS:08d}")
    assert os.path.isfile(os.path.join(ckpt, "dcp", ".metadata"))
    r = run_griffinlm(["eval", "--checkpoint", out, "--data", corpus, "--seq-len", "32", "--max-sequences", "4"])
    assert "bits_per_byte" in r.stdout  # the exported model.safetensors reads like any checkpoint


def test_data_parallel_with_packed_weights_matches_one_process(corpus, single, tmp_path):
    """Plain data parallelism (FSDP2 replicate) with every forward product on oneDNN's packed
    weights: FSDP2 refills its unsharded parameters through collectives, which bump no version
    counter, so a cached packed copy would be stale from the second step on."""
    out = str(tmp_path / "dp2")
    run_griffinlm(_args(corpus, out), nproc=2, env={"GRIFFINLM_GEMM": "onednn_packed"})
    assert_same_losses(losses(out), single)


def test_fsdp_on_2_ranks_resumes_on_1_and_back(corpus, single, tmp_path):
    a = str(tmp_path / "a")  # 2 ranks (FSDP) killed after step 2, resumed by 1 process
    r = run_griffinlm(_args(corpus, a) + ["--fsdp", "--debug-kill-at-step", "2"], nproc=2, check=False)
    assert r.returncode != 0
    run_griffinlm(_args(corpus, a) + ["--resume"])
    assert_same_losses(losses(a), single)
    b = str(tmp_path / "b")  # 1 process killed after step 2, resumed by 2 ranks (FSDP)
    r = run_griffinlm(_args(corpus, b) + ["--debug-kill-at-step", "2"], check=False)
    assert r.returncode != 0
    run_griffinlm(_args(corpus, b) + ["--resume", "--fsdp"], nproc=2)
    assert_same_losses(losses(b), single)


def _bf16_fsdp_run(rank: int, world: int, out: str) -> None:
    """Three optimizer steps of a tiny Griffin under FSDP's bf16 policy and bf16 autocast, the
    global batch of 4 rows split over `world` ranks; rank 0 writes the losses, gradient norms,
    Lambda's dtype and the parameter dtypes each kind of module computed with."""
    import torch

    from griffinlm import LanguageModel, ModelConfig
    from griffinlm.data import Batch
    from griffinlm.layers import RGLRU, Linear, RMSNorm
    from griffinlm.parallel import build_context, mixed_precision_policy, parallelize
    from griffinlm.train import make_optimizer
    from griffinlm.train.step import optimizer_step

    ctx = build_context(1, torch.device("cpu"))
    torch.manual_seed(0)
    cfg = ModelConfig.preset("griffin-tiny", width=32, depth=3, num_heads=2, local_window=8, mlp_expansion=2.0)
    model = LanguageModel(cfg)
    parallelize(model, ctx, fsdp=True, mp_policy=mixed_precision_policy(ctx.device, torch.bfloat16))
    seen: dict[str, set] = {}
    for m in model.modules():  # hooks after FSDP's: they see the parameters the forward uses
        kind = next((k for c, k in ((RGLRU, "rglru"), (RMSNorm, "norm"), (Linear, "linear")) if isinstance(m, c)), None)
        if kind is not None:
            m.register_forward_pre_hook(
                lambda mod, args, kind=kind: seen.setdefault(kind, set()).update(
                    str(p.dtype) for p in mod.parameters(recurse=False)))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (4, 16), generator=g)
    seg = torch.cat([torch.arange(6), torch.arange(10)]).expand(4, 16)
    batch = Batch(tokens, torch.roll(tokens, -1, 1), seg, torch.ones(4, 16, dtype=torch.bool), 0.0)
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    local = Batch(batch.tokens[rows], batch.targets[rows], batch.segment_pos[rows], batch.loss_mask[rows], 0.0)
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    steps = [optimizer_step(model, optimizer, [local], ctx, lr=1e-3, grad_clip=1.0, dtype="bf16") for _ in range(3)]
    lam = [p.full_tensor() for n, p in model.named_parameters() if n.endswith("lambda_")]
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": [r.nats for r in steps], "grad_norms": [r.grad_norm for r in steps],
                       "lambda_dtype": str(lam[0].dtype), "seen": {k: sorted(v) for k, v in seen.items()}}, f)


def test_bf16_fsdp_keeps_lambda_and_norms_fp32_and_1_and_2_ranks_agree(tmp_path):
    """Under FSDP's bf16 policy the RG-LRU (Lambda) and the norms compute with fp32 parameters,
    the linear layers with bf16 ones; one rank and two ranks (gloo, CPU) give the same losses
    and gradient norms over three steps."""
    from griffinlm.ops.gemm_backend import native_bf16
    from griffinlm.parallel.launch import spawn

    if not native_bf16():
        pytest.skip("CPU without native bf16")
    runs = {}
    for world in (1, 2):
        out = str(tmp_path / f"w{world}.json")
        spawn(_bf16_fsdp_run, world, out)
        with open(out) as f:
            runs[world] = json.load(f)
    for r in runs.values():
        assert r["seen"] == {"rglru": ["torch.float32"], "norm": ["torch.float32"], "linear": ["torch.bfloat16"]}
        assert r["lambda_dtype"] == "torch.float32"
    one, two = runs[1], runs[2]
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-3 * abs(a), (one["losses"], two["losses"])
    # (not Lambda itself: Adam moves entries with near-zero gradients by +-lr on their sign, which
    # rounding noise can flip; the losses after two updates and the gradient norms cover them)
    for a, b in zip(one["grad_norms"], two["grad_norms"]):
        assert abs(a - b) <= 1e-2 * abs(a), (one["grad_norms"], two["grad_norms"])
