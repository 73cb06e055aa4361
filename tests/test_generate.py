"""Generation: prompts of different lengths, chunked prefill, stop tokens, sampling, streaming, cache limits."""
import pytest
import torch

from griffinlm import LanguageModel, ModelConfig
from griffinlm.generate import check_sampling, filter_logits

ARCHS = ["transformer", "hawk", "griffin"]


def small(arch: str, **kw) -> LanguageModel:
    # window 6 is shorter than the prompts below, so the local-attention ring wraps.
    cfg = ModelConfig.preset(f"{arch}-tiny", width=64, depth=3, num_heads=2, local_window=6, **kw)
    return LanguageModel(cfg).eval()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g) for n in lengths]


def left_pad(rows, pad_id):
    """Left-padded (B, T) tokens, segment positions (0 on every pad: each is its own document)."""
    T = max(len(r) for r in rows)
    tokens = torch.stack([torch.cat([r.new_full((T - len(r),), pad_id), r]) for r in rows])
    seg = torch.stack([(torch.arange(T) - (T - len(r))).clamp(min=0) for r in rows])
    return tokens, seg


@pytest.mark.parametrize("arch", ARCHS)
def test_prompts_of_different_lengths_equal_each_row_alone(arch):
    m = small(arch).double()
    rows = prompts([9, 3, 14, 1])
    # Left padding with document resets still isolates each row (the packed-documents path).
    tokens, seg = left_pad(rows, 258)
    logits = m(tokens, segment_pos=seg)
    for b, r in enumerate(rows):
        torch.testing.assert_close(logits[b, tokens.shape[1] - len(r):], m(r[None])[0], rtol=1e-9, atol=1e-9)
    # The generation loop needs no padding: each prompt prefills its own slot.
    batched = m.generate(rows, 12, pad_id=258)
    for r, got in zip(rows, batched):
        assert torch.equal(got, m.generate(r[None], 12)[0])
        gen_logits = m(got[None])[0, len(r) - 1:-1]
        assert torch.equal(gen_logits.argmax(-1), got[len(r):])


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_equals_one_prefill(arch):
    m = small(arch).double()
    x = torch.randint(0, 256, (2, 31))
    seg = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.arange(28).expand(2, -1)], 1)  # 3 pads
    one = m.init_cache(2, max_length=40)
    full, one = m(x, cache=one, segment_pos=seg)
    chunked = m.init_cache(2, max_length=40)
    parts = []
    for a, b in ((0, 2), (2, 3), (3, 11), (11, 12), (12, 31)):  # pads split, a lone step, > window
        out, chunked = m(x[:, a:b], cache=chunked, segment_pos=seg[:, a:b])
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-6, atol=1e-6)
    assert chunked.positions.tolist() == one.positions.tolist() == [31, 31]
    for c1, c2 in zip(one.blocks, chunked.blocks):
        for name, t in vars(c1).items():
            if isinstance(t, torch.Tensor):
                torch.testing.assert_close(getattr(c2, name), t, rtol=1e-6, atol=1e-6)
    nxt = torch.tensor([5, 7])
    slots = torch.arange(2)
    torch.testing.assert_close(m.step(nxt, chunked, slots), m.step(nxt, one, slots), rtol=1e-6, atol=1e-6)


def test_local_ring_holds_exactly_the_visible_keys():
    # Paper convention: a query sees local_window keys (itself included) -> local_window slots.
    m = small("griffin")
    assert [c.entries for c in m.init_cache(1).blocks if hasattr(c, "ring")] == [6]
    # RecurrentGemma's convention: itself + local_window previous keys -> local_window + 1 slots.
    m = small("griffin", window_includes_current=False)
    assert [c.entries for c in m.init_cache(1).blocks if hasattr(c, "ring")] == [7]
    cache = m.init_cache(2)
    size = cache.nbytes()
    m(torch.randint(0, 256, (2, 40)), cache=cache)
    m.step(torch.tensor([1, 2]), cache, [1, 0])
    assert cache.nbytes() == size


def test_static_step_equals_eager_sliced_step():
    # The compiled step attends over every global entry of gathered rows (static shapes);
    # eager slices the filled prefix and reads the whole pool in place.
    m = small("transformer").double()
    x = torch.randint(0, 256, (2, 9))
    a, b = m.init_cache(2, max_length=20), m.init_cache(2, max_length=20)
    m(x, cache=a)
    m(x, cache=b)
    tok, slots = torch.tensor([3, 4]), torch.arange(2)
    eager = m.step(tok, a, slots)  # keys=10 (9 filled entries + this token's), whole pool in place
    static = m._step(tok, b, slots)
    torch.testing.assert_close(static, eager, rtol=1e-9, atol=1e-9)
    assert a.positions.tolist() == b.positions.tolist() == [10, 10]


def test_stop_tokens_end_only_their_row():
    m = small("griffin")
    rows = prompts([5, 8, 6], seed=3)
    free = m.generate(rows, 12)
    gen0 = free[0][5:]
    stop = int(gen0[4])
    cut = int((gen0 == stop).nonzero()[0]) + 1
    out = m.generate(rows, 12, stop_tokens=[[stop], None, []])
    assert torch.equal(out[0], free[0][: 5 + cut])
    assert torch.equal(out[1], free[1]) and torch.equal(out[2], free[2])
    # A tensor batch keeps its shape; the stopped row is padded after its stop token.
    t = torch.stack([r[:5] for r in rows])
    full = m.generate(t, 12)
    padded = m.generate(t, 12, stop_tokens=[[int(full[0, 5 + 4])], None, None], pad_id=258)
    k = 5 + int((full[0, 5:] == full[0, 9]).nonzero()[0]) + 1
    assert torch.equal(padded[0, :k], full[0, :k]) and (padded[0, k:] == 258).all()
    assert torch.equal(padded[1:], full[1:])
    # Every row stopping ends the generation early.
    everyone = m.generate(t, 12, stop_tokens=list(range(259)))
    assert everyone.shape == (3, 6)


def test_fixed_seed_reproduces_samples():
    m = small("hawk")
    rows = prompts([4, 7])
    kw = dict(temperature=1.3, top_k=40, top_p=0.95)
    a = m.generate(rows, 16, generator=torch.Generator().manual_seed(7), **kw)
    b = m.generate(rows, 16, generator=torch.Generator().manual_seed(7), **kw)
    c = m.generate(rows, 16, generator=torch.Generator().manual_seed(8), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("arch", ["transformer", "griffin"])
def test_top_k_one_and_tiny_top_p_equal_greedy(arch):
    m = small(arch)
    x = torch.randint(0, 256, (2, 6))
    greedy = m.generate(x, 10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(m.generate(x, 10, temperature=2.0, top_k=1, generator=g), greedy)
    assert torch.equal(m.generate(x, 10, temperature=2.0, top_p=1e-6, generator=g), greedy)


def test_filter_logits():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
    p = torch.softmax(logits, -1)[0]  # 0.032, 0.644, 0.087, 0.237
    keep = ~torch.isinf(filter_logits(logits, top_p=float(p[1] + 0.01)))
    assert keep.tolist() == [[False, True, False, True]]
    assert not torch.isinf(filter_logits(logits, top_k=10, top_p=1.0)).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_yields_the_tokens_of_generate(arch):
    m = small(arch)
    rows = prompts([3, 9, 5], seed=5)
    kw = dict(temperature=0.8, top_p=0.9, stop_tokens=[[17, 99], None, [3]], pad_id=258)
    out = m.generate(rows, 14, generator=torch.Generator().manual_seed(1), **kw)
    steps = list(m.generate_stream(rows, 14, generator=torch.Generator().manual_seed(1), **kw))
    assert all(s.shape == (3,) for s in steps)
    streamed = torch.stack(steps, 1)
    for b, r in enumerate(rows):
        n = len(out[b]) - len(r)
        assert torch.equal(streamed[b, :n], out[b][len(r):])
        assert (streamed[b, n:] == 258).all()


def test_tensor_with_prompt_lengths_equals_list_of_prompts():
    m = small("griffin")
    rows = prompts([4, 10])
    tokens, _ = left_pad(rows, 0)
    out = m.generate(tokens, 8, prompt_lengths=[4, 10])
    ref = m.generate(rows, 8)
    for b, r in enumerate(ref):
        assert torch.equal(out[b, tokens.shape[1] - len(rows[b]):], r)


def test_global_cache_limit_raises_a_clear_error():
    m = small("transformer")
    cache = m.init_cache(1, max_length=8)
    m(torch.randint(0, 256, (1, 6)), cache=cache)
    m.step(torch.tensor([1]), cache, [0])
    m(torch.tensor([[2]]), cache=cache)
    with pytest.raises(ValueError, match="global attention cache holds 8 positions.*max_length"):
        m.step(torch.tensor([1]), cache, [0])
    with pytest.raises(ValueError, match="holds 8 positions"):
        m(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="holds 8 positions"):
        m.prefill(torch.tensor([1]), cache, 0)
    assert cache.positions.tolist() == [8]  # a refused call leaves the cache as it was
    with pytest.raises(ValueError, match="holds 4 positions"):
        m(torch.randint(0, 256, (1, 5)), cache=m.init_cache(1, max_length=4))
    # Recurrent and local-attention caches have no limit.
    g = small("griffin")
    c = g.init_cache(1, max_length=4)
    g(torch.randint(0, 256, (1, 12)), cache=c)
    assert c.capacity is None


def test_bad_arguments_raise_value_error():
    m = small("griffin")
    x = torch.randint(0, 256, (1, 3))
    for kw in (dict(temperature=-0.1), dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_p=1.5),
               dict(temperature=1.0, top_k=0), dict(top_k=-3), dict(top_p=-1.0), dict(temperature=float("nan"))):
        with pytest.raises(ValueError):
            m.generate(x, 4, **kw)
        with pytest.raises(ValueError):
            next(m.generate_stream(x, 4, **kw))
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(x, -1)
    with pytest.raises(ValueError, match="empty"):
        m.generate([[1, 2], []], 3)
    with pytest.raises(ValueError, match="per-row"):
        m.generate([[1, 2], [3]], 3, stop_tokens=[[1], [2], [3]])
    check_sampling(0.0, 1, 1.0)  # the edges are allowed
