"""RecurrentGemma interop: loading errors, tokenizer, `griffinlm convert` round trips."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")

from griffinlm.cli import main  # noqa: E402
from griffinlm.interop import NotRecurrentGemmaError, load_recurrentgemma, load_tokenizer  # noqa: E402
from griffinlm.interop.hf_config import hf_to_model_config, model_config_to_hf  # noqa: E402
from griffinlm.interop.recurrentgemma import empty_model  # noqa: E402

from interop_helpers import make_hf_model, save_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = make_hf_model(seed=3, vocab_size=40)
    return model, save_hf_model(model, tmp_path_factory.mktemp("hf"))


def _copy_with(src: str, dst, edit) -> str:
    """A copy of checkpoint `src` in `dst` whose tensors dict went through `edit`."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    tensors = safetensors_torch.load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    safetensors_torch.save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_not_a_recurrentgemma_directory(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_recurrentgemma(tmp_path / "nope")
    with pytest.raises(NotRecurrentGemmaError, match="no config.json"):
        load_recurrentgemma(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NotRecurrentGemmaError, match="model_type 'llama'"):
        load_recurrentgemma(tmp_path)
    (tmp_path / "config.json").write_text(open(os.path.join(hf_dir[1], "config.json")).read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickled weights are not loaded"):
        load_recurrentgemma(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, hf_dir):
    src = hf_dir[1]
    name = "model.layers.1.temporal_block.rg_lru.recurrent_param"
    bad = _copy_with(src, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensors: \['{name}'\]"):
        load_recurrentgemma(bad)
    bad = _copy_with(src, tmp_path / "extra", lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: \['model.layers.0.extra.weight'\]"):
        load_recurrentgemma(bad)
    conv = "model.layers.0.temporal_block.conv_1d.weight"
    bad = _copy_with(src, tmp_path / "shape", lambda t: t.update({conv: torch.zeros(32, 1, 3)}))
    want = rf"shape mismatch for {conv}: checkpoint has \[32, 1, 3\], config implies \[32, 1, 4\]"
    with pytest.raises(ValueError, match=want):
        load_recurrentgemma(bad)


def test_config_mapping_and_unexpressible_export():
    hf = {"model_type": "recurrent_gemma", "hidden_size": 2560, "intermediate_size": 15360,
          "num_attention_heads": 10, "num_key_value_heads": 1, "num_hidden_layers": 26,
          "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    cfg = hf_to_model_config(hf)  # transformers < 5 keeps rope settings at top level
    assert (cfg.mlp_hidden, cfg.head_dim, cfg.lru_num_blocks, cfg.local_window) == (7680, 256, 10, 2048)
    assert (cfg.embed_scale, cfg.norm_unit_offset) == ("sqrt_bf16", True)
    assert (cfg.rope_fraction, cfg.rope_pairing, cfg.logits_soft_cap) == (0.5, "split_half", 30.0)
    assert cfg.lru_unscaled_reset and cfg.window_includes_current and cfg.gelu_approximate == "tanh"
    # the 2B layout: 2.68B parameters (paper notes)
    assert abs(empty_model(cfg).param_count(include_embedding=True) / 2.68e9 - 1) < 0.01
    again = hf_to_model_config(model_config_to_hf(cfg))
    assert again == cfg
    with pytest.raises(ValueError, match="untied"):
        hf_to_model_config({**hf, "tie_word_embeddings": False})
    with pytest.raises(ValueError, match=r"embed_scale='sqrt'.*logits_soft_cap=None"):
        from griffinlm.config import ModelConfig
        model_config_to_hf(ModelConfig())


def test_empty_model_allocates_no_parameters():
    cfg = hf_to_model_config({"model_type": "recurrent_gemma", "num_hidden_layers": 3, "hidden_size": 64,
                              "intermediate_size": 64, "num_attention_heads": 2, "vocab_size": 1000})
    model = empty_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert not model.blocks[2].temporal.rope.inv_freq.is_meta  # buffers stay real
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the patch is undone


def _write_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(directory, "tokenizer.json"))


def test_tokenizer_from_directory(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    _write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = [int(i) for i in tok.encode("the cat sat on a mat")]
    assert ids == [4, 5, 6, 7, 9, 8]
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "the cat sat on a mat"


def test_convert_cli_round_trip(tmp_path, hf_dir, capsys):
    from griffinlm.checkpoint import load_model

    hf, src = hf_dir
    _write_tokenizer(src)
    assert main(["convert", "--from-hf", src, "--out", str(tmp_path / "run")]) == 0
    info = json.loads(capsys.readouterr().out)
    model, ckpt = load_model(str(tmp_path / "run"))
    assert ckpt.path == info["checkpoint"] and ckpt.trainer["source_format"] == "recurrentgemma"
    from griffinlm.data import load_tokenizer as data_tokenizer
    tok = data_tokenizer(ckpt.trainer["tokenizer"])
    prompt = torch.tensor([[tok.bos_id, *[int(i) for i in tok.encode("the dog sat")]]])
    with torch.no_grad():
        assert (model(prompt) - hf(prompt, use_cache=False).logits).abs().max() < 1e-4
    if importlib.util.find_spec("griffinlm.inference") is not None:  # `griffinlm generate` on the conversion
        with torch.no_grad():
            want = hf.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                               attention_mask=torch.ones_like(prompt))[0, prompt.shape[1]:]
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "the dog sat",
                     "--max-new-tokens", "6", "--no-echo", "--ignore-eos"]) == 0
        ids = prompt[0].tolist()  # the continuation's text in context (SentencePiece keeps its leading space)
        assert capsys.readouterr().out == tok.decode(ids + want.tolist())[len(tok.decode(ids)):] + "\n"
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    assert os.path.isfile(tmp_path / "back" / "tokenizer.json")
    back = transformers.RecurrentGemmaForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        assert torch.equal(back(prompt, use_cache=False).logits, hf(prompt, use_cache=False).logits)
    assert main(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a RecurrentGemma checkpoint" in capsys.readouterr().err


def test_sentencepiece_tokenizer_from_directory(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the cat sat on the mat", "a dog sat on a log", "the dog and the cat"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=30,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, model_type="bpe")  # Gemma's ids
    tok = load_tokenizer(tmp_path)
    assert type(tok).__name__ == "SentencePieceTokenizer"
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    ids = [int(i) for i in tok.encode("the dog sat on the mat")]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "the dog sat on the mat"


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_recurrentgemma_loads_straight_into_quantized_weights(tmp_path, hf_dir, mode):
    """Quantized while reading (no fp32 copy of the projections is kept); close to the fp32 load,
    and `convert --quantize` writes a checkpoint that loads back to the same logits."""
    from griffinlm.checkpoint import load_model
    from griffinlm.ops.quantized import QuantizedWeight

    _, path = hf_dir
    ref = load_recurrentgemma(path, dtype="float32")
    q = load_recurrentgemma(path, quantize=mode)
    assert q.quantization == mode and isinstance(q.embed.weight, QuantizedWeight)
    assert not any(p.device.type == "meta" for p in q.parameters())
    assert all(p.dtype == torch.float32 for p in q.parameters())  # RG-LRU, norms, conv, biases
    tokens = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        want, got = ref(tokens), q(tokens)
    assert float((got - want).abs().max() / want.abs().max()) < (2e-2 if mode == "int8" else 1e-2)
    out = str(tmp_path / "rg")
    assert main(["convert", "--from-hf", path, "--out", out, "--quantize", mode]) == 0
    loaded, _ = load_model(out)
    assert loaded.quantization == mode
    with torch.no_grad():
        assert torch.equal(loaded(tokens), got)


def test_one_loader_reads_every_kind_of_directory(tmp_path, hf_dir):
    """`griffinlm.load`: a RecurrentGemma directory, its conversion (also once moved elsewhere, so
    the recorded tokenizer path points nowhere) and a weights directory all give the same model
    and tokenizer; bad directories are named."""
    import shutil

    from griffinlm import load
    from griffinlm.checkpoint import CheckpointError

    hf, src = hf_dir
    _write_tokenizer(src)
    prompt = torch.tensor([[2, 4, 5, 6]])
    with torch.no_grad():
        want = hf(prompt, use_cache=False).logits
    assert main(["convert", "--from-hf", src, "--out", str(tmp_path / "run")]) == 0
    moved = shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    weights = tmp_path / "weights"
    weights.mkdir()
    model, _ = load(src)
    (weights / "config.json").write_text(json.dumps(model.config.to_dict()))
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(weights / "model.safetensors"))
    shutil.copy(os.path.join(src, "tokenizer.json"), weights / "tokenizer.json")
    for path in (src, moved, os.path.join(moved, "checkpoints", "step_00000000"), weights):
        model, tok = load(path)
        assert [int(i) for i in tok.encode("the cat")] == [4, 5], path
        with torch.no_grad():
            assert (model(prompt) - want).abs().max() < 1e-4, path
    loaded, _ = load(weights, dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
    q, _ = load(src, quantize="int8")
    assert getattr(q, "quantization", None) == "int8"
    os.remove(weights / "tokenizer.json")  # falls back to bytes: 259 ids for a 40-id model
    with pytest.raises(ValueError, match="tokenizer has 259 tokens but the model's vocab_size is 40"):
        load(weights)
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load(tmp_path / "empty")
