"""RecurrentGemma interop: our model on converted weights reproduces `transformers`."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from griffinlm.interop import export_recurrentgemma, load_recurrentgemma  # noqa: E402

from interop_helpers import make_hf_model, save_hf_model  # noqa: E402

TOL = 1e-4
# name -> RecurrentGemmaConfig overrides; all use a window (8) smaller than the sequence (40)
CONFIGS = {
    "griffin_rra_d3": dict(),
    "griffin_ar_d5_lru48_gqa": dict(num_hidden_layers=5, block_types=["attention", "recurrent"], lru_width=48,
                                    num_key_value_heads=2, attention_bias=True),
    "hawk_d2": dict(num_hidden_layers=2, block_types=["recurrent"], lru_width=64),
    "mqa_d2_window4": dict(num_hidden_layers=2, block_types=["attention"], attention_window_size=4),
    "griffin_rar_d7_lru16": dict(num_hidden_layers=7, block_types=["recurrent", "attention", "recurrent"],
                                 lru_width=16, hidden_size=48, num_attention_heads=4, intermediate_size=64),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for i, (name, overrides) in enumerate(CONFIGS.items()):
        model = make_hf_model(seed=i, **overrides)
        out[name] = (model, save_hf_model(model, tmp_path_factory.mktemp(name)))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(hf_models, name):
    hf, path = hf_models[name]
    ours = load_recurrentgemma(path)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits  # transformers' cache needs an attention layer
        got = ours(tokens)
    diff = (want - got).abs().max().item()
    print(f"{name}: max |logit diff| = {diff:.3g} (logit scale {want.abs().max().item():.3g})")
    assert want.abs().max() > 1.0  # the comparison is not trivially small numbers
    assert diff < TOL


@pytest.mark.parametrize("name", ["griffin_rra_d3", "hawk_d2"])
def test_positions_that_do_not_start_at_zero_match_transformers(hf_models, name):
    """position_ids 5, 6, ...: the document began before the tokens, so token 0 is no reset
    (with RecurrentGemma's unscaled reset a forced reset skips its sqrt(1 - a^2) factor)."""
    hf, path = hf_models[name]
    ours = load_recurrentgemma(path)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 24))
    pos = torch.arange(5, 29).expand(2, -1)
    with torch.no_grad():
        want = hf(tokens, position_ids=pos, use_cache=False).logits
        got = ours(tokens, segment_pos=pos)
        # the same through the slot pool: a prefill chunk, then one-token steps
        cache = ours.init_cache(2, max_length=24)
        first, cache = ours(tokens[:, :10], cache=cache, segment_pos=pos[:, :10])
        steps = [ours(tokens[:, t:t + 1], cache=cache, segment_pos=pos[:, t:t + 1])[0] for t in range(10, 24)]
    assert (want - got).abs().max().item() < TOL
    assert (want - torch.cat([first, *steps], 1)).abs().max().item() < TOL


def test_padded_batch(hf_models):
    """Left padding, our convention: each pad is a one-token document, the prompt starts at
    segment_pos 0. Non-pad positions must equal transformers on the unpadded row.

    transformers' own padded forward differs: its Conv1D ignores attention_mask and
    position_ids, so the pad tokens leak into the first conv outputs of the row (we measure it).
    """
    hf, path = hf_models["griffin_rra_d3"]
    ours = load_recurrentgemma(path)
    lengths = [24, 17, 9]
    T = max(lengths)
    rows = [torch.randint(3, hf.config.vocab_size, (n,)) for n in lengths]
    tokens = torch.zeros(len(rows), T, dtype=torch.long)  # pad id 0
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    segment_pos = (mask.cumsum(-1) - 1).clamp(min=0)  # pads -> 0 (own document), prompt 0, 1, ...
    with torch.no_grad():
        got = ours(tokens, segment_pos=segment_pos)
        hf_padded = hf(tokens, attention_mask=mask, position_ids=segment_pos).logits
        worst, hf_leak = 0.0, 0.0
        for i, r in enumerate(rows):
            want = hf(r[None]).logits[0]
            worst = max(worst, (got[i, T - len(r):] - want).abs().max().item())
            hf_leak = max(hf_leak, (hf_padded[i, T - len(r):] - want).abs().max().item())
    print(f"padded batch: ours vs transformers unpadded {worst:.3g}; transformers padded vs unpadded {hf_leak:.3g}")
    assert worst < TOL


@pytest.mark.parametrize("name", ["griffin_rra_d3", "griffin_ar_d5_lru48_gqa"])
def test_greedy_generation_matches_transformers(hf_models, name):
    hf, path = hf_models[name]
    ours = load_recurrentgemma(path)
    prompt = torch.randint(3, hf.config.vocab_size, (2, 11))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                           attention_mask=torch.ones_like(prompt))
    got = ours.generate(prompt, 64)
    assert got.shape == want.shape == (2, 11 + 64)
    assert torch.equal(got, want)


def test_export_round_trip_is_exact_and_loads_in_transformers(hf_models, tmp_path):
    from safetensors.torch import load_file

    hf, path = hf_models["griffin_ar_d5_lru48_gqa"]
    ours = load_recurrentgemma(path)
    export_recurrentgemma(ours, tmp_path / "export")
    again = load_recurrentgemma(tmp_path / "export")
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == ours.config
    original = load_file(os.path.join(path, "model.safetensors"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    original.pop("lm_head.weight", None)
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    reloaded = transformers.RecurrentGemmaForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    tokens = torch.randint(0, hf.config.vocab_size, (1, 30))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def test_sharded_checkpoint_and_dtype(hf_models, tmp_path):
    hf, _ = hf_models["griffin_rra_d3"]
    path = save_hf_model(hf, tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    ours = load_recurrentgemma(path)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    tokens = torch.randint(0, hf.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() < TOL
    half = load_recurrentgemma(path, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.blocks[2].temporal.rope.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert (half(tokens).float() - hf(tokens).logits).abs().max() < 1.0


def test_export_sharded(hf_models, tmp_path):
    _, path = hf_models["griffin_rra_d3"]
    ours = load_recurrentgemma(path)
    files = export_recurrentgemma(ours, tmp_path / "out", max_shard_bytes=16_000)
    assert any(f.endswith("model.safetensors.index.json") for f in files)
    again = load_recurrentgemma(tmp_path / "out")
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), again.parameters()))


def test_import_does_not_import_transformers():
    code = "import sys, griffinlm.interop, griffinlm.interop.cli, griffinlm.interop.convert; " \
           "print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
