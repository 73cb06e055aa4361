"""LanguageModel for all three architectures: causality, caches, generation, gradients, errors."""
import pytest
import torch

from griffinlm import LanguageModel, ModelCache, ModelConfig

ARCHS = ["transformer", "hawk", "griffin"]


def small(arch: str, **kw) -> LanguageModel:
    # window 6 < sequence lengths below, so the local-attention ring wraps. Float64 weights;
    # the RG-LRU state stays float32 by design, hence tolerances of 1e-5 below.
    cfg = ModelConfig.preset(f"{arch}-tiny", width=64, depth=3, num_heads=2, local_window=6, **kw)
    return LanguageModel(cfg).double().eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_causality(arch):
    m = small(arch)
    x = torch.randint(0, 259, (2, 24))
    base = m(x)
    for k in (0, 7, 23):
        y = x.clone()
        y[:, k] = (y[:, k] + 1) % 259
        out = m(y)
        torch.testing.assert_close(out[:, :k], base[:, :k], rtol=0, atol=0)
        assert not torch.allclose(out[:, k], base[:, k])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prefill", [1, 5, 13])
def test_prefill_then_decode_equals_full_forward(arch, prefill):
    m = small(arch)
    x = torch.randint(0, 259, (3, 29))
    full = m(x)
    cache = m.init_cache(3, max_length=29)
    logits, cache = m(x[:, :prefill], cache=cache)
    outs = [logits]
    for t in range(prefill, 29):
        logits, cache = m(x[:, t : t + 1], cache=cache)
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.positions.tolist() == [29, 29, 29]


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_and_packed_documents(arch):
    m = small(arch)
    x = torch.randint(0, 259, (2, 30))
    full = m(x)
    cache = m.init_cache(2, max_length=30)
    parts = [m(x[:, a:b], cache=cache)[0] for a, b in ((0, 4), (4, 19), (19, 30))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    # two documents packed in one row see nothing of each other
    seg = torch.cat([torch.arange(11), torch.arange(19)])[None].expand(2, -1)
    packed = m(x, segment_pos=seg)
    torch.testing.assert_close(packed[:, :11], m(x[:, :11]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 11:], m(x[:, 11:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_is_argmax_of_full_forward(arch):
    m = small(arch).float()
    prompt = torch.randint(0, 259, (2, 5))
    out = m.generate(prompt, max_new_tokens=15)
    assert out.shape == (2, 20)
    assert torch.equal(out[:, :5], prompt)
    logits = m(out)
    assert torch.equal(out[:, 5:], logits[:, 4:-1].argmax(-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter(arch):
    m = small(arch, mlp_activation="swiglu", learnable_swish_beta=True).float().train()
    x = torch.randint(0, 259, (2, 16))
    loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_matches():
    m = small("griffin").float().train()
    x = torch.randint(0, 259, (2, 16))
    m(x).square().mean().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    from griffinlm.parallel import apply_activation_checkpointing

    apply_activation_checkpointing(m)  # from outside, as the trainer's parallelize step does
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in small("griffin").named_parameters()]
    m(x).square().mean().backward()
    for a, b in zip(g1, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b)


# Table 2 of De et al. (2024), copied here as the independent reference:
# size: (D, D_RNN, depth, heads), the same for all three architectures; head dim 128, window 1024.
TABLE_2 = {"100m": (768, 1024, 12, 6), "200m": (1024, 1536, 12, 8), "400m": (1536, 2048, 12, 12),
           "1.3b": (2048, 2560, 24, 16), "3b": (3072, 4096, 24, 24), "7b": (4096, 5632, 32, 32),
           "14b": (5120, 8192, 40, 40)}
NOMINAL = {"100m": 100e6, "200m": 200e6, "400m": 400e6, "1.3b": 1.3e9, "3b": 3e9, "7b": 7e9, "14b": 14e9}


def test_presets_are_the_papers_table_2_shapes():
    for size, (D, D_rnn, depth, heads) in TABLE_2.items():
        counts = {}
        for arch in ARCHS:
            cfg = ModelConfig.preset(f"{arch}-{size}")
            assert (cfg.width, cfg.depth, cfg.num_heads, cfg.resolved_head_dim) == (D, depth, heads, 128), (arch, size)
            assert cfg.local_window == 1024 and cfg.resolved_mlp_hidden == 3 * D
            if arch != "transformer":
                assert cfg.resolved_lru_width == D_rnn
            with torch.device("meta"):
                counts[arch] = LanguageModel(cfg).param_count()
        # at equal shape the MQA Transformer is the smallest, as in the paper; Hawk is the nominal size
        assert counts["transformer"] < counts["griffin"] < counts["hawk"], (size, counts)
        assert abs(counts["hawk"] / NOMINAL[size] - 1) < 0.15, (size, counts)
    with pytest.raises(ValueError, match="known presets: .*griffin-1.3b"):
        ModelConfig.preset("griffin-1b")
    tiny = [LanguageModel(ModelConfig.preset(f"{a}-tiny")).param_count() for a in ARCHS]
    assert max(tiny) / min(tiny) < 1.1  # the tiny presets are comparable
    assert 2e6 < min(tiny) and max(tiny) < 10e6


def test_griffin_block_pattern():
    cfg = ModelConfig.preset("griffin-tiny", depth=6)
    assert cfg.block_types == ("recurrent", "recurrent", "attention") * 2
    assert set(ModelConfig.preset("hawk-tiny").block_types) == {"recurrent"}
    assert set(ModelConfig.preset("transformer-tiny").block_types) == {"global_attention"}


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(width=100, num_heads=3)
    with pytest.raises(ValueError, match="block_pattern"):
        ModelConfig(block_pattern=("recurrent", "mamba"))
    with pytest.raises(ValueError, match="depth"):
        ModelConfig(depth=0)
    with pytest.raises(ValueError, match="mlp_activation"):
        ModelConfig(mlp_activation="tanh")
    with pytest.raises(ValueError, match="lru_num_blocks"):
        ModelConfig(lru_width=100, lru_num_blocks=3)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("griffin-huge")
    with pytest.raises(ValueError, match="bad override"):
        ModelConfig.preset("griffin-tiny", wdith=3)
    cfg = ModelConfig.preset("griffin-tiny")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_bad_input_errors():
    m = small("griffin")
    with pytest.raises(ValueError, match=r"out of range \[0, 259\)"):
        m(torch.tensor([[1, 259]]))
    with pytest.raises(ValueError, match="out of range"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        m(torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        m(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="non-empty"):
        m(torch.zeros(1, 0, dtype=torch.long))
    cache = m.init_cache(2)
    with pytest.raises(ValueError, match="batch size 2"):
        m(torch.zeros(3, 4, dtype=torch.long), cache=cache)
    with pytest.raises(TypeError, match="ModelCache"):
        m(torch.zeros(2, 4, dtype=torch.long), cache={"k": 1})
    with pytest.raises(TypeError, match="tokens must be a torch.Tensor"):
        m([[1, 2]])


def test_cache_is_constant_size_for_recurrent_models():
    m = small("griffin")
    cache = m.init_cache(1, max_length=64)
    size = cache.nbytes()
    for _ in range(3):
        _, cache = m(torch.randint(0, 259, (1, 20)), cache=cache)
    assert isinstance(cache, ModelCache) and cache.nbytes() == size



@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("packed", [False, True])
def test_float32_fast_paths_match_float64_model(arch, packed, monkeypatch):
    """The float32 CPU forward (numba Conv1D, RG-LRU, norms and activations, per-block gate
    matmuls, folded blocked attention, and without autograd the row-chunked MLP and in-place
    residual adds) equals the same weights run in float64, which take the torch paths."""
    from griffinlm.layers import activations

    torch.manual_seed(0)
    m32 = small(arch).float()
    m64 = small(arch)
    m64.load_state_dict(m32.state_dict())
    x = torch.randint(0, 259, (2, 300))
    seg = None
    if packed:
        seg = torch.cat([torch.arange(120), torch.arange(180)])[None].expand(2, -1)
    ref = m64(x, segment_pos=seg)
    from griffinlm.ops import numba_common

    before = dict(numba_common.FUSED_CALLS)
    with_grad = m32(x, segment_pos=seg)
    if numba_common.available():  # the fast paths ran (the float64 model takes none of them)
        ran = {k for k, v in numba_common.FUSED_CALLS.items() if v > before.get(k, 0)}
        want = {"rms_norm", "gated_activation"} | ({"causal_conv1d", "rglru", "block_diagonal_linear"}
                                                   if arch != "transformer" else set())
        assert want <= ran, want - ran
    monkeypatch.setattr(activations, "CHUNK_BYTES", 3 * m32.config.resolved_mlp_hidden * 4 * 256)
    with torch.no_grad():
        x_before = x.clone()
        fast = m32(x, segment_pos=seg)
        assert torch.equal(x, x_before)
    torch.testing.assert_close(with_grad.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast, with_grad.detach(), rtol=1e-5, atol=1e-5)


def test_info_lists_the_paper_presets(capsys):
    from griffinlm.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Table 2" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("hawk-1.3b "))
    assert "width  2048" in line and "lru  2560" in line and "depth  24" in line and "tokens   25.0B" in line
    assert main(["info", "--model", "griffin-1b"]) == 2
    assert "known presets" in capsys.readouterr().err
