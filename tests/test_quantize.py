"""Weight-only quantization (`griffinlm.quantize`, `ops.quantized`): accuracy against fp32, the
decoding kernels on quantized weights against their references, save/load, errors."""
import contextlib
import copy
import json
import os

import pytest
import torch

from griffinlm import LanguageModel, ModelConfig
from griffinlm.checkpoint import CheckpointError
from griffinlm.ops import decode_step, numba_common
from griffinlm.ops.gemm_backend import GEMM_CALLS, native_bf16
from griffinlm.ops.quantized import QuantizedWeight, quantized_linear, quantized_linear_reference
from griffinlm.quantize import quantize_, save_quantized

needs_numba = pytest.mark.skipif(not numba_common.available(), reason="numba not installed")
SMALL = dict(width=64, depth=3, num_heads=2, local_window=8, vocab_size=259)
ARCHS = {a: ModelConfig.preset(f"{a}-tiny", **SMALL) for a in ("griffin", "hawk", "transformer")}
TOL = {"int8": 2e-2, "bf16": 1e-2}  # largest logit error relative to the largest |logit|


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def model(arch="griffin", seed=0):
    torch.manual_seed(seed)
    m = LanguageModel(ARCHS[arch]).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() < 2:
                p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_quantized_weight_round_trip_and_products(mode):
    w = torch.randn(130, 96)
    q = QuantizedWeight.quantize(w, mode)
    assert q.data.dtype == (torch.int8 if mode == "int8" else torch.bfloat16)
    assert rel(q.dequantize(), w) < (1 / 127 if mode == "int8" else 2 ** -8)
    for rows in (1, 5, 6, 7, 300):  # the streaming kernel up to 6 rows, a GEMM above
        x, b = torch.randn(rows, 96), torch.randn(130)
        GEMM_CALLS.clear()
        with torch.no_grad():
            y = quantized_linear(x, q, b)
        ref = quantized_linear_reference(x, q, b)  # the dequantized fp32 product
        stream = rows <= 6 and numba_common.available()
        assert rel(y, ref) < (1e-5 if stream else 1e-2), rows
        assert sum(v for k, v in GEMM_CALLS.items() if k.startswith("quantized_stream")) == int(stream)


@pytest.mark.parametrize("mode", ["int8", "bf16"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_quantized_logits_near_fp32(arch, mode):
    m = model(arch)
    tokens = torch.randint(0, 259, (2, 20))
    with torch.no_grad():
        ref = m(tokens)
        q = quantize_(copy.deepcopy(m), mode)
        assert rel(q(tokens), ref) < TOL[mode]
    assert q.param_count() == m.param_count()
    assert all(not p.requires_grad for p in q.parameters())
    assert isinstance(q.blocks[0].mlp.up_proj.weight, QuantizedWeight) and isinstance(q.embed.weight, QuantizedWeight)


@needs_numba
@pytest.mark.parametrize("mode", ["int8", "bf16"])
@pytest.mark.parametrize("B", [1, 3, 8, 16])
def test_decoding_kernels_on_quantized_weights_equal_their_references(mode, B, monkeypatch):
    """Streaming kernels (<= MAX_BATCH rows) read int8 / bf16 weights themselves; the hybrid path
    takes them through `quantized_linear`: both equal the torch references on the same weights.
    (Above the streaming rows the products are fp32 GEMMs here: bf16 GEMMs would round both paths'
    outputs to bf16, hiding kernel errors below 1e-2.)"""
    import griffinlm.ops.quantized as quantized

    monkeypatch.setattr(quantized, "native_bf16", lambda: False)
    q = quantize_(model("griffin", seed=B), mode)

    calls = {}

    def mark():
        calls["before"] = decode_step.step_kernel_calls()

    def check(fast, ref):  # the references add no kernel calls
        ran = decode_step.step_kernel_calls() - calls["before"]
        assert ran["recurrent_step" if B <= decode_step.MAX_BATCH else "recurrent_mix"] == 2
        assert rel(fast, ref) < 1e-4

    decode_both(q, B, 6, check, mark)


def decode_both(q, B: int, steps: int, check, before_step=lambda: None, context=contextlib.nullcontext):
    """Prefills two pools of B slots alike, then steps them `steps` times with the fast path (inside
    `context()`) and the references; check(fast, ref) after each step (before_step() before it)."""
    prompts = torch.randint(0, 259, (B, 5))
    caches = [q.init_cache(B, max_length=32) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            q(prompts, cache=c)
        tok = torch.randint(0, 259, (B,))
        for _ in range(steps):
            before_step()
            with context():
                fast = q.step(tok, caches[0], torch.arange(B))
            with decode_step.references_only():
                ref = q.step(tok, caches[1], torch.arange(B))
            check(fast, ref)
            tok = ref.argmax(-1)


@needs_numba
@pytest.mark.skipif(not native_bf16(), reason="CPU without native bf16")
@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_hybrid_step_runs_stacked_bf16_gemms_on_quantized_weights(mode):
    """Above the streaming rows, a quantized model's projections of one input run as one packed
    bf16 GEMM (`quantized.stacked_bf16_products`, bound once per row class): logits as the
    references' separate bf16 GEMMs give, up to their bf16 rounding of the outputs. (Forced: this
    tiny model's products are below the size where backends are measured.)"""
    from griffinlm.ops.gemm_backend import force

    q = quantize_(model("griffin", seed=3), mode)

    def check(fast, ref):
        assert GEMM_CALLS[f"quantized_stacked_bf16:{mode}"] > 0
        assert rel(fast, ref) < 2e-2

    decode_both(q, 2 * decode_step.MAX_BATCH + 1, 4, check, GEMM_CALLS.clear, lambda: force("onednn_packed"))


def trained_model(tmp_path):
    """A tiny Griffin trained for 150 steps on a small regular corpus (confident predictions)."""
    from griffinlm.train import TrainConfig, Trainer

    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {j % 7}\n" for j in range(20)))
    cfg = TrainConfig(data=str(root), steps=150, batch_size=8, seq_len=64, lr=3e-3, eval_every=150,
                      save_every=150, progress=False, tensorboard=False, plot=False, sample_tokens=0)
    tr = Trainer(ModelConfig.preset("griffin-tiny", width=64, depth=2, num_heads=2, local_window=16), cfg,
                 str(tmp_path / "run"))
    tr.run()
    return tr.model.eval()


def test_trained_model_greedy_tokens_identical_and_save_load_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIFFINLM_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    m = trained_model(tmp_path)
    prompt = [[256] + list(b"def f3(x):\n    return")]
    want = m.generate(prompt, 32)[0]
    for mode in ("int8", "bf16"):
        q = quantize_(copy.deepcopy(m), mode)
        assert torch.equal(q.generate(prompt, 32)[0], want), mode
        out = tmp_path / f"q-{mode}"
        save_quantized(q, str(out))
        from griffinlm import load

        loaded, _ = load(str(out))
        assert getattr(loaded, "quantization", None) == mode
        tokens = torch.randint(0, 259, (2, 16))
        with torch.no_grad():
            assert torch.equal(loaded(tokens), q(tokens))
        assert torch.equal(loaded.generate(prompt, 32)[0], want)


def test_quantization_errors(tmp_path):
    m = model()
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_(copy.deepcopy(m), "int4")
    q = quantize_(copy.deepcopy(m), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(q, "bf16")
    from griffinlm.train import make_optimizer

    with pytest.raises(ValueError, match="quantized weights are for inference"):
        make_optimizer(q, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    x = torch.randn(3, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="for inference only"):
        quantized_linear(x, q.blocks[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(m, str(tmp_path / "x"))
    # a file whose int8 weights lost their scales
    save_quantized(q, str(tmp_path / "q"))
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = str(tmp_path / "q" / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".scale")}
        meta = f.metadata()
    save_file(tensors, path, metadata=meta)
    from griffinlm.checkpoint import load_weights_file

    with pytest.raises(CheckpointError, match="int8 weights without their scales"):
        load_weights_file(path, model())
    assert json.load(open(os.path.join(tmp_path, "q", "config.json")))["width"] == 64


def test_generate_cli_with_quantize(tmp_path, capsys):
    from safetensors.torch import save_file

    from griffinlm.cli import main

    m = model()
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    for mode in ("int8", "bf16"):
        assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "5",
                     "--quantize", mode]) == 0
    assert capsys.readouterr().out.startswith("ab")
