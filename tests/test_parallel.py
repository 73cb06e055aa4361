"""Scale-out: DP, FSDP, TP and FSDP+TP on gloo give one process's losses, gradients and
parameters; distributed checkpoints reshard between 2 ranks and 1; bad TP degrees are refused.

One job of 2 spawned processes runs every 2-rank layout in turn (process start-up dominates
on CPU); a second job of 4 processes runs FSDP+TP on a true (2, 2) mesh.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from griffinlm import LanguageModel, ModelConfig
from griffinlm.data import Batch
from griffinlm.parallel import (TensorParallelError, apply_tensor_parallel, build_context, check_tp_degree,
                                clip_grad_norm_, dp_sum, local_rows, parallelize)
from griffinlm.parallel.checkpoint import full_state_dict, load_distributed, save_distributed
from griffinlm.parallel.launch import spawn

# Griffin (R, R, A): every kind of block; 4 heads and 4 gate blocks split over 2 TP ranks.
CONFIG = dict(width=64, depth=3, num_heads=4, local_window=16, vocab_size=64)
BATCH, SEQ, STEPS, SAVE_AT, LR = 4, 16, 5, 3, 1e-3
LAYOUTS = {"dp": (1, False), "fsdp": (1, True), "tp": (2, False), "fsdp+tp": (2, True)}  # name: (tp, fsdp)


def make_model(**overrides) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.preset("griffin-tiny", **{**CONFIG, **overrides}))
    # Embedding rows of norm ~1 (not the default ~1/sqrt(width)): gradients well above fp32
    # rounding, so AdamW's normalised updates compare tightly across layouts.
    torch.nn.init.normal_(model.embed.weight, std=model.config.width ** -0.5)
    return model


def make_batches() -> list[Batch]:
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        tok = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ + 1), generator=g)
        mask = torch.rand(BATCH, SEQ, generator=g) > 0.2  # masked targets: counts differ per rank
        seg = torch.arange(SEQ).expand(BATCH, SEQ).clone()
        seg[1, 7:] -= 7  # a document starts mid-row: resets in the recurrence, conv and attention
        out.append(Batch(tok[:, :-1], tok[:, 1:], seg, mask, float(mask.sum())))
    return out


def make_optimizer(model: LanguageModel) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def train(model, opt, batches, ctx=None, grads: dict | None = None) -> list[float]:
    """Steps of AdamW on the mean cross-entropy of each global batch; returns the losses.
    `grads`: filled with the first step's full gradients."""
    losses = []
    for b in batches:
        n = b.num_targets  # of the global batch
        lb = local_rows(b, ctx) if ctx else b
        logits = model(lb.tokens, segment_pos=lb.segment_pos)
        targets = lb.targets.masked_fill(~lb.loss_mask, -100)
        nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        (nats / n).backward()
        if grads is not None and not grads:
            for name, p in model.named_parameters():
                g = p.grad
                grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        if ctx:
            clip_grad_norm_(model.parameters(), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((dp_sum([float(nats.detach())], ctx)[0] if ctx else float(nats.detach())) / n)
    return losses


def _layout_run(tp: int, fsdp: bool) -> dict:
    ctx = build_context(tp, torch.device("cpu"))
    model = parallelize(make_model(), ctx, fsdp=fsdp)
    grads: dict = {}
    losses = train(model, make_optimizer(model), make_batches(), ctx, grads)
    return {"losses": losses, "grads": grads, "params": full_state_dict(model)}


def _worker(rank: int, world: int, out: str, layouts: dict, checkpoints: bool) -> None:
    results = {name: _layout_run(tp, fsdp) for name, (tp, fsdp) in layouts.items()}
    if checkpoints:
        # 2 ranks (FSDP+TP) save after SAVE_AT steps; the test resumes that on 1 process.
        ctx = build_context(2, torch.device("cpu"))
        model = parallelize(make_model(), ctx, fsdp=True)
        opt = make_optimizer(model)
        train(model, opt, make_batches()[:SAVE_AT], ctx)
        save_distributed(os.path.join(out, "ckpt_2ranks"), model, opt)
        # 1 process saved (in the test, before spawning): resume it on 2 ranks (TP).
        ctx = build_context(2, torch.device("cpu"))
        model = parallelize(make_model(), ctx)
        opt = make_optimizer(model)
        load_distributed(os.path.join(out, "ckpt_1rank"), model, opt)
        results["resumed_on_2"] = train(model, opt, make_batches()[SAVE_AT:], ctx)
        # A TP degree that does not divide the gate blocks / heads is refused before any sharding.
        try:
            apply_tensor_parallel(make_model(num_heads=2, lru_num_blocks=3, lru_width=96, width=64), ctx.mesh["tp"])
            results["refused"] = None
        except TensorParallelError as e:
            results["refused"] = str(e)
    if rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    dist.barrier()


@pytest.fixture(scope="module")
def reference():
    """One process on the global batches: losses, first gradients, final parameters; and a
    checkpoint after SAVE_AT steps."""
    model = make_model()
    grads: dict = {}
    opt = make_optimizer(model)
    losses = train(model, opt, make_batches(), None, grads)
    return {"losses": losses, "grads": grads, "params": {k: v.detach() for k, v in model.state_dict().items()}}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parallel2"))
    model = make_model()
    opt = make_optimizer(model)
    train(model, opt, make_batches()[:SAVE_AT])
    save_distributed(os.path.join(out, "ckpt_1rank"), model, opt)
    spawn(_worker, 2, out, LAYOUTS, True)
    return out, torch.load(os.path.join(out, "results.pt"), weights_only=True)


def _check_same_as_one_process(result: dict, reference: dict) -> None:
    for step, (a, b) in enumerate(zip(result["losses"], reference["losses"])):
        assert abs(a - b) < 1e-5, f"step {step + 1}: loss {a} vs one process {b}"
    for name, g in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    for name, p in reference["params"].items():
        # AdamW moves each weight by up to ~lr per step: 2e-5 is 1/50 of one step's move.
        torch.testing.assert_close(result["params"][name], p, rtol=0, atol=2e-5, msg=f"parameter {name}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_match_one_process(layout, two_ranks, reference):
    _, results = two_ranks
    _check_same_as_one_process(results[layout], reference)


def test_checkpoint_saved_on_2_ranks_resumes_on_1(two_ranks, reference):
    out, _ = two_ranks
    model = make_model()
    opt = make_optimizer(model)
    load_distributed(os.path.join(out, "ckpt_2ranks"), model, opt)
    losses = train(model, opt, make_batches()[SAVE_AT:])
    assert losses == pytest.approx(reference["losses"][SAVE_AT:], abs=1e-5)


def test_checkpoint_saved_on_1_rank_resumes_on_2(two_ranks, reference):
    _, results = two_ranks
    assert results["resumed_on_2"] == pytest.approx(reference["losses"][SAVE_AT:], abs=1e-5)


def test_tp_degree_not_dividing_heads_or_gate_blocks_is_refused(two_ranks):
    _, results = two_ranks
    assert results["refused"] is not None and "tensor-parallel degree 2" in results["refused"]
    assert "lru_num_blocks=3" in results["refused"]
    cfg = ModelConfig.preset("griffin-tiny", **CONFIG)
    check_tp_degree(cfg, 2)
    check_tp_degree(cfg, 4)
    with pytest.raises(TensorParallelError, match="num_heads=4.*lru_num_blocks=4"):
        check_tp_degree(cfg, 3)


def test_fsdp_plus_tp_on_a_2x2_mesh(tmp_path, reference):
    spawn(_worker, 4, str(tmp_path), {"fsdp+tp 2x2": (2, True)}, False)
    _check_same_as_one_process(torch.load(tmp_path / "results.pt", weights_only=True)["fsdp+tp 2x2"], reference)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_tp_split_parameters_come_from_the_plan(kv_heads):
    """`griffinlm plan` counts TP-split parameters from the plan `apply_tensor_parallel` applies."""
    from griffinlm.parallel.plan import count_params
    from griffinlm.parallel.tensor_parallel import split_parameters

    cfg = ModelConfig.preset("griffin-tiny", width=64, depth=3, num_heads=4, num_kv_heads=kv_heads,
                             mlp_activation="swiglu", mlp_bias=True, attention_out_bias=True)
    with torch.device("meta"):
        model = LanguageModel(cfg)
    split = split_parameters(model)
    names = dict(model.named_parameters())
    assert "embed.weight" not in split and not any(n.endswith("norm.weight") for n in split)
    for n in names:
        if n.endswith(("linear_out.bias", "o_proj.bias", "down_proj.bias")):
            assert n not in split, n
        if n.endswith(("q_proj.weight", "gate_proj.weight", "up_proj.weight", "linear_x.weight", "conv1d.weight",
                       "rg_lru.lambda_", "rg_lru.gate_r_weight", "o_proj.weight", "down_proj.weight")):
            assert n in split, n
        if ".k_proj." in n or ".v_proj." in n:
            assert (n in split) == (kv_heads > 1), n
    counts = count_params(cfg)
    assert counts.tp_split == sum(names[n].numel() for n in split)
    assert counts.total == sum(p.numel() for p in names.values())
