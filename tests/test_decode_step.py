"""The fused numba decoding ops (ops/decode_step.py, ops/decode_step_numba.py, ops/decode_mix_numba.py) against their
torch references, through `LanguageModel.step` over shuffled slots."""
from collections import Counter

import pytest
import torch

from griffinlm import LanguageModel, ModelConfig
from griffinlm.ops import decode_step, numba_common

needs_numba = pytest.mark.skipif(not numba_common.available(), reason="numba not installed")

SMALL = dict(width=64, depth=3, num_heads=4, local_window=8, vocab_size=97)

CONFIGS = {
    "griffin": ModelConfig.preset("griffin-tiny", **SMALL),
    "hawk": ModelConfig.preset("hawk-tiny", **SMALL),
    "transformer": ModelConfig.preset("transformer-tiny", **SMALL),
    # every RecurrentGemma convention at once, plus GQA, biases, narrower blocks
    "recurrentgemma-like": ModelConfig.preset(
        "griffin-tiny", **SMALL, window_includes_current=False, norm_unit_offset=True, logits_soft_cap=30.0,
        rope_fraction=0.5, lru_unscaled_reset=True, attention_qkv_bias=True, attention_out_bias=True,
        mlp_bias=True, lru_width=96, lru_num_blocks=2, embed_scale="sqrt_bf16"),
    "interleaved-gqa": ModelConfig.preset("griffin-tiny", **SMALL, rope_pairing="interleaved", num_kv_heads=2,
                                          recurrent_bias=False, conv_bias=False, conv_width=2),
}
for _act in ("glu", "bilinear", "reglu", "swiglu", "relu", "gelu", "swish"):
    CONFIGS[f"mlp-{_act}"] = ModelConfig.preset("griffin-tiny", **SMALL, mlp_activation=_act, gelu_approximate="none")
CONFIGS["learnable-beta"] = ModelConfig.preset("griffin-tiny", **SMALL, mlp_activation="swiglu",
                                               learnable_swish_beta=True)


def make_model(cfg: ModelConfig, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms, biases, Lambda and beta
        for p in model.parameters():
            if p.dim() < 2:
                p.add_(0.2 * torch.randn_like(p))
    return model


def cache_tensors(cache):
    return [cache.positions, cache.doc_start] + [t for c in cache.blocks for t in c.tensors().values()]


def kernel_calls_per_step(model, rows: int) -> Counter:
    """The kernel calls of one step: the streaming kernels up to MAX_BATCH rows, the GEMM +
    `*_mix` kernels above."""
    kind = "step" if rows <= decode_step.MAX_BATCH else "mix"
    blocks = Counter(f"recurrent_{kind}" if b.kind == "recurrent" else f"attention_{kind}" for b in model.blocks)
    return blocks + Counter({f"mlp_{kind}": len(model.blocks), f"logits_{kind}": 1})


def run_both(model, prompts, seg, steps, max_length=None, monkeypatch=None):
    """Decode `steps` tokens with the fused ops and with their torch references from the same
    prefill, the slots in a shuffled order each step; returns the largest logit difference
    relative to the logits' scale, and both caches. Asserts the kernels ran on every step."""
    B = prompts.shape[0]
    caches = [model.init_cache(B, max_length=max_length or prompts.shape[1] + steps + 1) for _ in range(2)]
    worst = 0.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for c in caches:
            model(prompts, cache=c, segment_pos=seg)
        nxt = torch.randint(0, model.config.vocab_size, (B,), generator=g)
        for _ in range(steps):
            slots = torch.randperm(B, generator=g)
            before = decode_step.step_kernel_calls()
            fused = model.step(nxt[slots], caches[0], slots)
            assert decode_step.step_kernel_calls() - before == kernel_calls_per_step(model, B)
            before = decode_step.step_kernel_calls()
            with decode_step.references_only():  # every op through its torch reference
                ref = model.step(nxt[slots], caches[1], slots)
            assert decode_step.step_kernel_calls() == before
            assert fused.shape == ref.shape == (B, model.config.vocab_size)
            worst = max(worst, ((fused - ref).abs().max() / ref.abs().max()).item())
            nxt = torch.empty_like(nxt).index_copy_(0, slots, ref.argmax(-1))
    return worst, caches


@needs_numba
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_step_equals_eager_step(name):
    cfg = CONFIGS[name]
    model = make_model(cfg)
    B, T = 3, 9
    prompts = torch.randint(0, cfg.vocab_size, (B, T))
    # row 0 starts a new document mid-prompt, row 1 is left-padded (its document starts at 3)
    seg = torch.arange(T).repeat(B, 1)
    seg[0, 5:] = torch.arange(T - 5)
    seg[1] = (torch.arange(T) - 3).clamp(min=0)
    seg[1, :3] = 0
    worst, (c_fused, c_eager) = run_both(model, prompts, seg, steps=14)  # the ring of 8 wraps
    assert worst < 1e-5, worst
    for a, b in zip(cache_tensors(c_fused), cache_tensors(c_eager)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_numba
@pytest.mark.parametrize("arch", ["griffin", "hawk", "transformer", "recurrentgemma-like", "mlp-swish"])
@pytest.mark.parametrize("B", [1, 3, 6, 7, 8, 16, 37, 64])
def test_every_batch_size_equals_the_references(arch, B):
    """Streaming kernels up to MAX_BATCH rows, GEMMs + mix kernels above: the same logits and
    states as the torch references, the local-attention ring wrapping, documents restarting."""
    cfg = CONFIGS[arch]
    model = make_model(cfg, seed=B)
    T = 6
    prompts = torch.randint(0, cfg.vocab_size, (B, T))
    seg = torch.arange(T).repeat(B, 1)
    seg[::2, 3:] = torch.arange(T - 3)  # every other row starts a second document mid-prompt
    worst, (c_fast, c_ref) = run_both(model, prompts, seg, steps=10)
    assert worst < 1e-5, worst
    for a, b in zip(cache_tensors(c_fast), cache_tensors(c_ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_numba
@pytest.mark.parametrize("arch", ["griffin", "interleaved-gqa"])
@pytest.mark.parametrize("parts", [1, 3, 4])
@pytest.mark.parametrize("B", [1, 2, 9])
def test_any_number_of_row_chunks_equals_the_references(arch, parts, B, monkeypatch):
    """The kernels split their work into `parts` chunks (numba's thread count, here forced): at
    one or two rows attention splits each kv group's query heads across them (4 heads into 3
    chunks: 2 + 1 + 1; GQA's 2 heads per group into at most 2), and the RG-LRU's gate blocks and
    the projections' rows into uneven chunks."""
    monkeypatch.setattr(decode_step.numba_common, "threads", lambda: parts)
    cfg = CONFIGS[arch]
    model = make_model(cfg, seed=parts)
    T = 5
    prompts = torch.randint(0, cfg.vocab_size, (B, T))
    worst, (c_fast, c_ref) = run_both(model, prompts, None, steps=6)
    assert worst < 1e-5, worst
    for a, b in zip(cache_tensors(c_fast), cache_tensors(c_ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_numba
def test_fused_step_batch_of_one_continuing_document():
    cfg = CONFIGS["griffin"]
    model = make_model(cfg, seed=3)
    worst, _ = run_both(model, torch.randint(0, cfg.vocab_size, (1, 5)), None, steps=20)
    assert worst < 1e-5


@needs_numba
def test_global_attention_reads_only_written_slots():
    """A global cache much longer than the sequence: empty slots must not be attended."""
    cfg = CONFIGS["transformer"]
    model = make_model(cfg, seed=4)
    worst, _ = run_both(model, torch.randint(0, cfg.vocab_size, (2, 3)), None, steps=6, max_length=64)
    assert worst < 1e-5


@needs_numba
def test_slots_at_different_positions_in_one_fused_step():
    """Rows of one step at their own positions (staggered prefills), fused vs references."""
    cfg = CONFIGS["griffin"]
    model = make_model(cfg, seed=8)
    caches = [model.init_cache(5, max_length=64) for _ in range(2)]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for slot, n in ((0, 3), (1, 11), (3, 6), (4, 1)):  # slot 2 stays empty until later
            toks = torch.randint(0, cfg.vocab_size, (n,), generator=g)
            for c in caches:
                model.prefill(toks, c, slot)
        for i in range(12):
            slots = torch.tensor([4, 0, 3, 1] if i < 5 else [2, 4, 1, 0, 3])
            toks = torch.randint(0, cfg.vocab_size, (len(slots),), generator=g)
            fused = model.step(toks, caches[0], slots)
            with decode_step.references_only():
                ref = model.step(toks, caches[1], slots)
            torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for a, b in zip(cache_tensors(caches[0]), cache_tensors(caches[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_numba
def test_greedy_generation_identical_to_reference(monkeypatch):
    cfg = CONFIGS["recurrentgemma-like"]
    model = make_model(cfg, seed=5)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    before = decode_step.FUSED_CALLS["recurrent_step"]
    fused = model.generate(prompts, 24)
    assert decode_step.FUSED_CALLS["recurrent_step"] > before
    with decode_step.references_only():
        reference = model.generate(prompts, 24)
    for a, b in zip(fused, reference):
        assert torch.equal(a, b)


@needs_numba
@pytest.mark.parametrize("name", ["griffin", "learnable-beta"])
def test_sees_in_place_weight_updates_and_replaced_parameters(name):
    cfg = CONFIGS[name]
    model = make_model(cfg, seed=6)
    prompts = torch.randint(0, cfg.vocab_size, (2, 6))
    run_both(model, prompts, None, steps=2)  # builds the fused views
    with torch.no_grad():  # an optimizer-like in-place update
        for p in model.parameters():
            p.mul_(0.9)
    worst, _ = run_both(model, prompts, None, steps=4)
    assert worst < 1e-5
    model.double().float()  # new parameter storage: the views must be rebuilt
    worst, _ = run_both(model, prompts, None, steps=4)
    assert worst < 1e-5
    # a replaced submodule and a replaced Parameter object are noticed too
    old_up = model.blocks[0].mlp.up_proj
    model.blocks[0].mlp.up_proj = torch.nn.Linear(old_up.in_features, old_up.out_features, bias=False)
    model.blocks[1].mlp_norm.weight = torch.nn.Parameter(torch.rand(cfg.width) + 0.5)
    worst, _ = run_both(model, prompts, None, steps=4)
    assert worst < 1e-5


@needs_numba
def test_falls_back_to_the_references_where_it_does_not_apply():
    cfg = CONFIGS["griffin"]
    model = make_model(cfg)
    cache = model.init_cache(decode_step.MAX_BATCH + 1)
    slots = torch.arange(decode_step.MAX_BATCH + 1)
    toks = torch.ones(len(slots), dtype=torch.long)
    before = decode_step.step_kernel_calls()
    with torch.no_grad():
        model.step(toks, cache, slots)  # too many rows for the weight-streaming kernels: the hybrid path
    assert decode_step.step_kernel_calls() - before == kernel_calls_per_step(model, len(slots))
    before = sum(decode_step.step_kernel_calls().values())
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode_step, "HYBRID", False)
        model.step(toks, cache, slots)
    assert sum(decode_step.step_kernel_calls().values()) == before
    logits = model.step(toks[:1], cache, [0])  # autograd on: the references keep the graph
    assert logits.requires_grad and sum(decode_step.step_kernel_calls().values()) == before
    with torch.no_grad():
        model64 = make_model(cfg).double()
        assert model64.step(torch.tensor([3]), model64.init_cache(1), [0]).dtype == torch.float64
    assert sum(decode_step.step_kernel_calls().values()) == before


def test_without_numba_decoding_and_fused_ops_use_torch(monkeypatch):
    """numba is optional (the `fast` extra): nothing may import it when it is unavailable."""
    import builtins

    real_import = builtins.__import__

    def no_numba(name, *args, **kwargs):
        if name == "numba" or name.startswith("numba."):
            raise ModuleNotFoundError("No module named 'numba'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(numba_common, "available", lambda: False)
    monkeypatch.setattr(builtins, "__import__", no_numba)
    cfg = CONFIGS["griffin"]
    model = make_model(cfg, seed=7)
    prompts = torch.randint(0, cfg.vocab_size, (2, 6))
    before = sum(decode_step.step_kernel_calls().values())
    out = model.generate(prompts, 8)  # the step's ops -> references; norms and GeGLU -> torch compositions
    assert out.shape == (2, 14)
    assert sum(decode_step.step_kernel_calls().values()) == before
    loss = model(prompts).logsumexp(-1).mean()
    loss.backward()  # training path without numba


@needs_numba
def test_hybrid_step_binds_once_per_row_class_and_follows_changes(monkeypatch):
    """Above MAX_BATCH rows each op binds its GEMMs (`linear.step_products`) and kernels once per
    row class and reuses them while nothing changed: a batch of another class binds its own, a
    batch of a bound class binds nothing, and in-place weight updates and another forced GEMM
    backend still give the references' logits."""
    from griffinlm.ops.gemm_backend import GEMM_CALLS, force, onednn_available

    binds = Counter()
    real = decode_step.step_products
    monkeypatch.setattr(decode_step, "step_products", lambda *a: binds.update(["bind"]) or real(*a))
    cfg = CONFIGS["recurrentgemma-like"]  # biases on every projection
    model = make_model(cfg, seed=11)
    N = 3 * decode_step.MAX_BATCH
    caches = [model.init_cache(N, max_length=64) for _ in range(2)]
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, cfg.vocab_size, (N, 5), generator=g)
    with torch.no_grad():
        for c in caches:
            model(prompts, cache=c)

    def step(n: int) -> int:
        """One step of n random slots, fused vs references; returns the binds it made."""
        slots = torch.randperm(N, generator=g)[:n]
        toks = torch.randint(0, cfg.vocab_size, (n,), generator=g)
        before = binds["bind"]
        with torch.no_grad():
            fused = model.step(toks, caches[0], slots)
            made = binds["bind"] - before
            with decode_step.references_only():
                ref = model.step(toks, caches[1], slots)
        assert ((fused - ref).abs().max() / ref.abs().max()).item() < 1e-5
        return made

    small, large = decode_step.MAX_BATCH + 1, N  # two row classes
    assert step(small) > 0  # the first step gathers the arguments and binds
    assert step(small) == 0 and step(small + 1) == 0  # the same row class
    assert step(large) > 0 and step(large) == 0
    assert step(small) == 0  # the smaller class's calls were kept
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)  # in place: the bound calls stay, their GEMMs resolve again
    assert step(large) == 0 and step(small) == 0
    # replaced weights (what a LoRA model's merged weights are after training): the step that
    # notices binds its class again, and the other class's bound calls may not outlive them
    for block in model.blocks:
        temporal = block.temporal
        for lin in (block.mlp.up_proj, getattr(temporal, "linear_x", None), getattr(temporal, "q_proj", None)):
            if lin is not None:
                lin.weight = torch.nn.Parameter(torch.randn_like(lin.weight) * 0.2)
    assert step(large) > 0 and step(small) > 0
    if onednn_available():
        for backend in ("onednn_packed", "mkl"):
            GEMM_CALLS.clear()
            with force(backend):
                assert step(large) == 0
            assert any(k.endswith(backend) for k in GEMM_CALLS)
    for a, b in zip(cache_tensors(caches[0]), cache_tensors(caches[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _twin_steps(fast, ref, caches, toks, slots):
    """One step of `fast` (its default path) and of `ref` (a copy, torch references only) on
    twin caches; returns the largest logit difference relative to the logits' scale."""
    with torch.no_grad():
        got = fast.step(toks, caches[0], slots)
        with decode_step.references_only():
            want = ref.step(toks, caches[1], slots)
    return ((got - want).abs().max() / want.abs().max()).item()


@needs_numba
@pytest.mark.parametrize("arch", ["griffin", "hawk", "transformer", "recurrentgemma-like"])
@pytest.mark.parametrize("B", [1, 3, 16])
def test_step_plan_replays_the_bound_calls(arch, B):
    """From the second step of an unchanged model on the same pool, the step replays its ops'
    bound calls (`ops.kernel_views.StepPlan`): the same kernels run, with the references' logits
    and states."""
    import copy

    from griffinlm.ops.kernel_views import REPLAYS

    cfg = CONFIGS[arch]
    fast = make_model(cfg, seed=B)
    ref = copy.deepcopy(fast)
    caches = [m.init_cache(B, max_length=32) for m in (fast, ref)]
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, cfg.vocab_size, (B, 5), generator=g)
    with torch.no_grad():
        for m, c in zip((fast, ref), caches):
            m(prompts, cache=c)
    steps = 6
    replays = numba_common.FUSED_CALLS[REPLAYS]
    for _ in range(steps):
        slots = torch.randperm(B, generator=g)
        before = decode_step.step_kernel_calls()
        worst = _twin_steps(fast, ref, caches, torch.randint(0, cfg.vocab_size, (B,), generator=g), slots)
        assert worst < 1e-5, worst
        assert decode_step.step_kernel_calls() - before == kernel_calls_per_step(fast, B)
    assert numba_common.FUSED_CALLS[REPLAYS] - replays == steps - 1
    for a, b in zip(cache_tensors(caches[0]), cache_tensors(caches[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_numba
def test_step_plan_follows_changes():
    """A replayed step notices what `KernelViews.run` notices: replaced parameters, another pool,
    a replaced state tensor, rows of another kind (streaming vs hybrid); each step still equals the
    references, and replay resumes once nothing changes."""
    import copy

    from griffinlm.ops.kernel_views import REPLAYS

    cfg = CONFIGS["recurrentgemma-like"]
    fast = make_model(cfg, seed=5)
    ref = copy.deepcopy(fast)
    N = 2 * decode_step.MAX_BATCH + 1
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(0, cfg.vocab_size, (N, 5), generator=g)

    def pools():
        caches = [m.init_cache(N, max_length=64) for m in (fast, ref)]
        with torch.no_grad():
            for m, c in zip((fast, ref), caches):
                m(prompts, cache=c)
        return caches

    def step(caches, n: int) -> bool:
        """One step of n random slots; True when it replayed."""
        replays = numba_common.FUSED_CALLS[REPLAYS]
        slots = torch.randperm(N, generator=g)[:n]
        worst = _twin_steps(fast, ref, caches, torch.randint(0, cfg.vocab_size, (n,), generator=g), slots)
        assert worst < 1e-5, worst
        return numba_common.FUSED_CALLS[REPLAYS] > replays

    caches = pools()
    assert not step(caches, 1) and step(caches, 1) and step(caches, 2)  # any streaming row count
    assert not step(caches, N) and step(caches, N)  # hybrid rows: another kind of plan
    assert not step(caches, 1) and step(caches, 1)
    with torch.no_grad():  # in place (an optimizer's update): the bound calls stay valid
        for m in (fast, ref):
            for p in m.parameters():
                p.mul_(0.9)
    assert step(caches, 1)
    for m in (fast, ref):  # a replaced Parameter: bound again, with the new weights
        m.blocks[0].mlp.up_proj.weight = torch.nn.Parameter(m.blocks[0].mlp.up_proj.weight * 1.5)
    assert not step(caches, 1) and step(caches, 1)
    other = pools()  # another pool
    assert not step(other, 1) and step(other, 1)
    for c in other:  # a state tensor replaced inside the pool: the kernels must write the new one
        c.blocks[0].rnn = c.blocks[0].rnn.clone()
    assert not step(other, 1) and step(other, 1)
    for a, b in zip(cache_tensors(other[0]), cache_tensors(other[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_numba
def test_copied_and_pickled_models_after_decoding_use_their_own_weights():
    """The step's memos (views, bound calls, plan, tree watch) are not copied: a model copied
    together with its pool after decoding (`copy.deepcopy`) steps with its own weights into its
    own pool, and pickling such a model (what `torch.save(model)` does) works and gives a model
    that decodes the same."""
    import copy
    import pickle

    cfg = CONFIGS["griffin"]
    model = make_model(cfg, seed=9)
    prompts = torch.randint(0, cfg.vocab_size, (2, 5))
    toks = torch.tensor([1, 2])
    cache = model.init_cache(2, max_length=16)
    with torch.no_grad():
        model(prompts, cache=cache)
        want = [model.step(toks, cache) for _ in range(3)]  # bound calls, then a replayed plan
    twin, twin_cache = copy.deepcopy((model, cache))
    before = cache_tensors(cache)
    before = [t.clone() for t in before]
    ref_cache = copy.deepcopy(twin_cache)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        got = twin.step(toks, twin_cache)
        with decode_step.references_only():
            ref = twin.step(toks, ref_cache)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(cache_tensors(cache), before):  # the original pool untouched
        assert torch.equal(a, b)
    loaded = pickle.loads(pickle.dumps(model))  # what torch.save(model) pickles; raised before the fix
    fresh = loaded.init_cache(2, max_length=16)
    with torch.no_grad():
        loaded(prompts, cache=fresh)
        for ref_logits in want:
            torch.testing.assert_close(loaded.step(toks, fresh), ref_logits, rtol=1e-5, atol=1e-5)
