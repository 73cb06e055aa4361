"""Fine-tuning (issue 18): LoRA through peft on every fast path, instruction data with prompt
masking, exact resume, merge and peft-format adapters that load in transformers."""
import copy
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from griffinlm import LanguageModel, ModelConfig
from griffinlm.checkpoint import load_weights_file, list_checkpoints
from griffinlm.data import ByteTokenizer
from griffinlm.ops import decode_step, numba_common

pytest.importorskip("peft")

from griffinlm.finetune.data import InstructionRows, parse_example  # noqa: E402
from griffinlm.finetune.lora import LoraSettings, apply_lora, load_adapter, merge_lora, save_adapter  # noqa: E402
from griffinlm.inference.chat import ChatFormat  # noqa: E402

SMALL = dict(width=64, depth=3, num_heads=4, local_window=8, vocab_size=300)
ARCHS = ("griffin-tiny", "hawk-tiny", "transformer-tiny")
TOK = ByteTokenizer()
FRUITS = {"apple": "red", "banana": "yellow", "lime": "green", "plum": "purple", "cherry": "red",
          "lemon": "yellow", "kiwi": "green", "grape": "purple"}


def adapted(name: str, gates: bool = True, seed: int = 0, fused: bool = True):
    """(plain copy of the base, LoRA model with non-zero adapters, its PeftModel); `fused`: our
    LoRA layers (ops.lora_linear), else peft's own (a plain get_peft_model)."""
    torch.manual_seed(seed)
    base = LanguageModel(ModelConfig.preset(name, **SMALL)).eval()
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() < 2:
                p.add_(0.2 * torch.randn_like(p))
    lm = copy.deepcopy(base)
    pm = apply_lora(lm, LoraSettings(r=4, alpha=8, dropout=0.0, gates=gates and name != "transformer-tiny"), fused)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return base, lm.eval(), pm


def decode(model, tokens, B, prompt=20, steps=4):
    cache = model.init_cache(B, max_length=prompt + steps + 1)
    with torch.no_grad():
        model(tokens[:B, :prompt], cache=cache)
        return torch.stack([model.step(tokens[:B, prompt + i], cache) for i in range(steps)])


@pytest.mark.parametrize("name,fused", [(a, True) for a in ARCHS] + [("griffin-tiny", False)])
def test_lora_logits_equal_merged_on_every_path(name, fused):
    base, lm, pm = adapted(name, fused=fused)
    merged = merge_lora(copy.deepcopy(pm)).eval()
    tokens = torch.randint(0, 256, (8, 700))
    # the adapters matter: without them the logits are far away
    with torch.no_grad():
        assert (lm(tokens[:2, :40]) - base(tokens[:2, :40])).abs().max() > 0.1
    # the training forward (autograd) and the no-grad forward over many rows (chunked MLP, fused ops)
    before = Counter(numba_common.FUSED_CALLS)
    train_out = lm(tokens[:2, :64])
    assert torch.allclose(train_out, merged(tokens[:2, :64]), atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(lm(tokens), merged(tokens), atol=2e-5, rtol=1e-5)
    if numba_common.available():
        ran = Counter(numba_common.FUSED_CALLS) - before
        assert ran["rms_norm"] > 0
        assert (ran["lora_linear"] > 0) == fused
        if name != "transformer-tiny":  # the RG-LRU and its block-diagonal gates (LoRA on them too)
            assert ran["block_diagonal_linear"] > 0 and ran["rglru"] > 0, ran
    # every decoding path: the weight-streaming kernels, GEMMs + mix kernels, the references
    for B in (2, 8):
        before = decode_step.step_kernel_calls()
        fast = decode(lm, tokens, B)
        calls = decode_step.step_kernel_calls() - before
        if numba_common.available():
            kind = "step" if B <= decode_step.MAX_BATCH else "mix"
            assert calls[f"mlp_{kind}"] == 4 * 3 and calls[f"logits_{kind}"] == 4, calls
        assert torch.allclose(fast, decode(merged, tokens, B), atol=2e-5, rtol=1e-5)
        with decode_step.references_only():
            before = decode_step.step_kernel_calls()
            ref = decode(lm, tokens, B)
            assert decode_step.step_kernel_calls() == before
        assert torch.allclose(ref, fast, atol=2e-5, rtol=1e-5)


def test_fused_dropout_streams_follow_the_distributed_rank(monkeypatch):
    """Data-parallel ranks draw the same dropout seeds; without being told, each fused adapter's
    stream is its process's rank, so ranks drop different units; `set_dropout_stream` fixes it."""
    from griffinlm.finetune.lora import set_dropout_stream

    torch.manual_seed(0)
    lm = LanguageModel(ModelConfig.preset("hawk-tiny", **SMALL))
    pm = apply_lora(lm, LoraSettings(r=4, alpha=8, dropout=0.5, gates=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.train()
    tokens = torch.randint(0, 256, (2, 12))

    def logits(rank):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: rank is not None)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        torch.manual_seed(7)  # every rank draws the same seeds
        with torch.no_grad():
            return lm(tokens)

    alone, rank0, rank1 = logits(None), logits(0), logits(1)
    assert torch.equal(alone, rank0) and not torch.equal(rank0, rank1)
    set_dropout_stream(lm, 0)  # an explicit stream wins over the rank
    assert torch.equal(logits(1), rank0)
    set_dropout_stream(lm, None)
    assert torch.equal(logits(1), rank1)


def test_quantizing_an_adapted_model_is_refused():
    from griffinlm.quantize import quantize_

    _, lm, _ = adapted("hawk-tiny")
    with pytest.raises(ValueError, match="LoRA adapters"):
        quantize_(lm, "int8")


def test_decode_sees_adapter_updates_and_disabling():
    """The step's memo of adapted weights follows in-place adapter updates (an optimizer step)
    and peft's disable_adapter()."""
    base, lm, pm = adapted("griffin-tiny")
    tokens = torch.randint(0, 256, (2, 30))
    first = decode(lm, tokens, 2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(-1.0)  # in place, like AdamW
    flipped = decode(lm, tokens, 2)
    assert not torch.allclose(first, flipped, atol=1e-3)
    assert torch.allclose(flipped, decode(merge_lora(copy.deepcopy(pm)).eval(), tokens, 2), atol=2e-5)
    with pm.disable_adapter():
        assert torch.allclose(decode(lm, tokens, 2), decode(base, tokens, 2), atol=2e-5)


def test_prompt_tokens_are_never_targets():
    chat = ChatFormat(TOK)
    ex = parse_example({"prompt": "Q: color of lime?\nA:", "completion": " green"}, TOK, chat, 1)
    text = TOK.decode(ex.tokens[ex.counted])
    assert text == " green" and ex.counted[-1] and ex.tokens[-1] == TOK.eos_id
    chat_ex = parse_example({"messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"},
                                          {"role": "user", "content": "color of lime?"},
                                          {"role": "assistant", "content": "green"}]}, TOK, chat, 1)
    assert TOK.decode(chat_ex.tokens[chat_ex.counted]) == " hello\n green\n"
    assert TOK.decode(chat_ex.prompt_ids[1:]).endswith("User: color of lime?\nAssistant:")
    rows = InstructionRows([ex, chat_ex, ex], seq_len=128, pad_id=TOK.pad_id)
    assert len(rows) == 2 and rows.truncated == 0  # whole examples, first fit
    batch = rows.get(np.arange(len(rows)))
    assert TOK.decode(batch.targets[batch.loss_mask].tolist()) == " green hello\n green\n green"
    assert int((batch.targets[batch.loss_mask] == TOK.eos_id).sum()) == 3
    # changing the labels of every uncounted position leaves the loss unchanged
    from griffinlm.train.step import masked_nats

    logits = torch.randn(*batch.tokens.shape, 300)
    other = copy.copy(batch)
    other.targets = torch.where(batch.loss_mask, batch.targets, torch.randint_like(batch.targets, 0, 256))
    assert torch.equal(masked_nats(logits, batch), masked_nats(logits, other))
    # each example restarts its segment positions
    assert (batch.segment_pos == 0).sum() >= 2


def write_jsonl(path, n=200, seed=0):
    rng = np.random.default_rng(seed)
    names = sorted(FRUITS)
    with open(path, "w") as f:
        for i in range(n):
            k = names[rng.integers(len(names))]
            if i % 2:
                f.write(json.dumps({"prompt": f"Q: color of {k}?\nA:", "completion": f" {FRUITS[k]}"}) + "\n")
            else:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"color of {k}?"},
                                                 {"role": "assistant", "content": FRUITS[k]}]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny Griffin pre-trained for a few steps on the built-in corpus."""
    from griffinlm.train.config import TrainConfig
    from griffinlm.train.loop import Trainer

    out = str(tmp_path_factory.mktemp("base"))
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=64, progress=False, plot=False, tensorboard=False,
                      sample_tokens=0, eval_sequences=4)
    Trainer(ModelConfig.preset("griffin-tiny", width=64, depth=3, num_heads=2, local_window=16), cfg, out).run()
    return out


def finetune_cli(*args):
    from griffinlm.cli import main

    return main(["finetune", "--no-progress", "--no-plot", "--no-tensorboard", *map(str, args)])


def test_bad_input_fails_before_training(base_run, tmp_path, capsys):
    cases = {
        '{"prompt": "a"}\n': "line 1",
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "  "}\n': "line 2: empty completion",
        '{"prompt": "a", "completion": "b"}\nnot json\n': "line 2: not valid JSON",
        '{"messages": [{"role": "user", "content": "x"}]}\n': "last message must be the assistant",
    }
    for i, (text, message) in enumerate(cases.items()):
        data = tmp_path / f"bad{i}.jsonl"
        data.write_text(text)
        assert finetune_cli("--checkpoint", base_run, "--data", data, "--out", tmp_path / f"o{i}") == 2
        assert message in capsys.readouterr().err
        assert not list_checkpoints(str(tmp_path / f"o{i}"))
    data = write_jsonl(tmp_path / "ok.jsonl", 20)
    for spec, message in (("targets=qkv_proj", "'qkv_proj' matches nothing"), ("r=1000", "larger than"),
                          ("gates=true", "needs dropout=0"), ("rank=4", "unknown key 'rank'")):
        assert finetune_cli("--checkpoint", base_run, "--data", data, "--out", tmp_path / "o", "--lora", spec) == 2
        assert message in capsys.readouterr().err
        assert not list_checkpoints(str(tmp_path / "o"))


def test_lora_finetune_learns_keeps_base_and_resumes_exactly(base_run, tmp_path, capsys):
    from griffinlm import load
    from griffinlm.finetune.job import FinetuneConfig, answer_accuracy, prepare
    from griffinlm.train.config import TrainConfig
    from griffinlm.train.loop import Trainer, evaluate

    data = write_jsonl(tmp_path / "fruits.jsonl", 240)
    cfg = TrainConfig(data=data, steps=40, batch_size=16, seq_len=96, lr=3e-3, weight_decay=0.0, progress=False,
                      plot=False, tensorboard=False, sample_tokens=0, eval_sequences=8, save_every=20)
    lora = LoraSettings(r=8, alpha=16, dropout=0.05)
    job, held_out, _ = prepare(FinetuneConfig(base_run, lora), cfg, verbose=False)
    tok = job.data.tokenizer
    before_loss = evaluate(job.model, job.data.held_out(None), torch.device("cpu"))["loss"]
    before_acc = answer_accuracy(job.model, tok, held_out)
    base_state = {k: v.clone() for k, v in job.model.state_dict().items() if "lora_" not in k}
    trainer = Trainer(None, cfg, str(tmp_path / "ft"), job=job)
    grads = {}
    hooks = [p.register_hook(lambda g, n=n: grads.__setitem__(n, True)) for n, p in trainer.model.named_parameters()
             if p.requires_grad]
    summary = trainer.run()
    for h in hooks:
        h.remove()
    assert grads and all("lora_" in n for n in grads)  # only adapters were trained
    after = {k: v for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_state[k], after[k]) for k in base_state)  # the base, bit for bit
    assert summary["held_out"]["loss"] < 0.5 * before_loss
    assert answer_accuracy(trainer.model, tok, held_out) > before_acc + 0.3
    # the checkpoint holds only the adapters; `load` rebuilds base + adapters, folded in
    ckpt = list_checkpoints(str(tmp_path / "ft"))[-1]
    from safetensors import safe_open
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())
    loaded, _ = load(str(tmp_path / "ft"))
    probe = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.allclose(loaded(probe), trainer.model.eval()(probe), atol=2e-5)
    # exact resume: stop at step 20, resume in a new process state, same adapters at step 40
    job2, _, _ = prepare(FinetuneConfig(base_run, lora), cfg, verbose=False)
    Trainer(None, cfg, str(tmp_path / "ft2"), job=job2).run(until=20)
    job3, _, _ = prepare(FinetuneConfig(base_run, lora), cfg, verbose=False)
    resumed = Trainer(None, cfg, str(tmp_path / "ft2"), resume=True, job=job3)
    assert resumed.step == 20
    resumed.run()
    a = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # resuming with other LoRA settings is refused, naming them
    job4, _, _ = prepare(FinetuneConfig(base_run, LoraSettings(r=4, alpha=16, dropout=0.05)), cfg, verbose=False)
    with pytest.raises(Exception, match="lora"):
        Trainer(None, cfg, str(tmp_path / "ft2"), resume=True, job=job4)


def test_cli_merge_and_full_finetune(base_run, tmp_path, capsys):
    from griffinlm import load

    data = write_jsonl(tmp_path / "fruits.jsonl", 60)
    out = tmp_path / "lora"
    assert finetune_cli("--checkpoint", base_run, "--data", data, "--out", out, "--steps", 4, "--batch-size", 4,
                        "--seq-len", 64, "--merge", "--lora", "r=4,alpha=8,gates=true,dropout=0",
                        "--answer-tokens", 8) == 0
    printed = capsys.readouterr().out
    assert "held-out completion loss" in printed and "greedy answers exact" in printed
    # this model has no RecurrentGemma export (our default conventions), so our names are kept
    assert json.load(open(out / "adapter" / "adapter_config.json"))["target_parameters"] == [
        "gate_r_weight", "gate_i_weight"]
    merged, _ = load(str(out / "merged"))
    lora, _ = load(str(out))
    fresh, _ = load(base_run)
    load_adapter(fresh, str(out / "adapter"))  # the peft-format files alone, on the base
    probe = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert torch.allclose(merged(probe), lora(probe), atol=2e-5)
        assert torch.allclose(fresh.eval()(probe), lora(probe), atol=2e-5)
    with pytest.raises(ValueError, match="not a readable peft adapter"):
        load_adapter(load(base_run)[0], str(tmp_path))
    full = tmp_path / "full"
    assert finetune_cli("--checkpoint", base_run, "--data", data, "--out", full, "--steps", 2, "--batch-size", 4,
                        "--seq-len", 64, "--full", "--answer-tokens", 0) == 0
    assert not (full / "adapter").exists()
    state = {}
    base_model, _ = load(base_run)
    load_weights_file(os.path.join(list_checkpoints(str(full))[-1], "model.safetensors"), base_model)
    state = dict(base_model.named_parameters())
    assert len(state) == len(list(LanguageModel(base_model.config).parameters()))


def test_peft_adapter_loads_onto_the_exported_transformers_model(tmp_path):
    pytest.importorskip("transformers")
    from peft import PeftModel
    from transformers import RecurrentGemmaForCausalLM

    from griffinlm import load
    from griffinlm.interop.convert import convert_to_hf
    from interop_helpers import make_hf_model, save_hf_model

    src = save_hf_model(make_hf_model(vocab_size=300), tmp_path / "hf")  # room for the byte tokenizer
    # `griffinlm finetune` starts from a RecurrentGemma directory as from any checkpoint
    data = write_jsonl(tmp_path / "fruits.jsonl", 30)
    assert finetune_cli("--checkpoint", src, "--data", data, "--out", tmp_path / "ft", "--steps", 2,
                        "--batch-size", 4, "--seq-len", 64, "--answer-tokens", 0, "--lora", "r=4") == 0
    assert json.load(open(tmp_path / "ft" / "adapter" / "adapter_config.json"))["target_modules"]
    tuned, _ = load(str(tmp_path / "ft"))
    assert tuned.config == load(src)[0].config
    ours, _ = load(src)
    pm = apply_lora(ours, LoraSettings(r=4, alpha=8, dropout=0.0, gates=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapter = save_adapter(pm, str(tmp_path / "adapter"))
    convert_to_hf(src, str(tmp_path / "exported"))
    hf = RecurrentGemmaForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
    hf_lora = PeftModel.from_pretrained(hf, adapter).eval()
    tokens = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        theirs = hf_lora(tokens).logits
        mine = ours.eval()(tokens)
        plain = RecurrentGemmaForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()(tokens).logits
    assert (theirs - plain).abs().max() > 1e-2  # the adapters were loaded and act
    assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()
    # and back: the RecurrentGemma-named adapter loads onto a fresh griffinlm model
    again, _ = load(src)
    load_adapter(again, adapter)
    with torch.no_grad():
        assert torch.allclose(again.eval()(tokens), mine, atol=1e-5)
