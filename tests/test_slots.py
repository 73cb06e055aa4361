"""The slot pool: sequences that arrive, advance and finish independently in one batched step,
against each sequence's own full forward; fork, snapshot, restore, save/load; bad input."""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from griffinlm import LanguageModel, ModelCache, ModelConfig, load_state, save_state
from griffinlm.ops import decode_step, numba_common

ARCHS = ["transformer", "hawk", "griffin"]
V = 97


def small(arch: str, dtype=torch.float32, seed: int = 0, **kw) -> LanguageModel:
    # window 5 is shorter than the sequences below, so every local-attention ring wraps
    cfg = ModelConfig.preset(f"{arch}-tiny", width=64, depth=3, num_heads=2, local_window=5, vocab_size=V, **kw)
    torch.manual_seed(seed)
    model = LanguageModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms, biases and Lambda
        for p in model.parameters():
            if p.dim() < 2:
                p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype)


class Sequence:
    """One request: its tokens, where its prompt ends, optional packed documents."""

    def __init__(self, tokens: torch.Tensor, prompt: int, segment_pos: torch.Tensor | None = None):
        self.tokens, self.prompt, self.segment_pos = tokens, prompt, segment_pos
        self.done = prompt  # tokens fed so far
        self.logits: list[torch.Tensor] = []


def run_pool(model, seqs, arrivals, slots_n, seed=0, chunk=None):
    """Feeds every sequence through a pool of `slots_n` slots: a sequence arrives at its tick
    (prefill of its prompt into a free slot, in chunks of `chunk` tokens), then each tick steps
    every active sequence by one of its own tokens (teacher forcing), slots shuffled; a
    finished sequence frees its slot for the next arrival. Records each sequence's logits."""
    rng = random.Random(seed)
    cache = model.init_cache(slots_n, max_length=max(len(s.tokens) for s in seqs) + 1)
    free, active, tick = list(range(slots_n)), {}, 0
    pending = sorted(range(len(seqs)), key=lambda i: arrivals[i])
    with torch.no_grad():
        while pending or active:
            while pending and arrivals[pending[0]] <= tick and free:
                i = pending.pop(0)
                slot = free.pop(rng.randrange(len(free)))
                cache.reset(slot)
                s = seqs[i]
                step = chunk or s.prompt
                for a in range(0, s.prompt, step):
                    b = min(a + step, s.prompt)
                    seg = None if s.segment_pos is None else s.segment_pos[a:b]
                    s.logits.append(model.prefill(s.tokens[a:b], cache, slot, segment_pos=seg))
                active[slot] = i
            if active:
                slots = list(active)
                rng.shuffle(slots)
                toks = torch.stack([seqs[active[sl]].tokens[seqs[active[sl]].done] for sl in slots])
                logits = model.step(toks, cache, torch.tensor(slots))
                for row, sl in enumerate(slots):
                    s = seqs[active[sl]]
                    s.logits.append(logits[row][None])
                    s.done += 1
                    if s.done == len(s.tokens):
                        free.append(sl)
                        del active[sl]
            tick += 1
    return cache


def check_against_full_forward(model, seqs, tol):
    with torch.no_grad():
        for s in seqs:
            seg = None if s.segment_pos is None else s.segment_pos[None]
            full = model(s.tokens[None], segment_pos=seg)[0]
            torch.testing.assert_close(torch.cat(s.logits), full, rtol=tol, atol=tol * full.abs().max().item())


def make_sequences(lengths, prompts, packed_at=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        seg = None
        if packed_at is not None and i % 2 == 0 and p > packed_at:  # a second document mid-prompt
            seg = torch.cat([torch.arange(packed_at), torch.arange(n - packed_at)])
        seqs.append(Sequence(torch.randint(0, V, (n,), generator=g), p, seg))
    return seqs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_staggered_sequences_equal_their_own_forward(arch, dtype):
    model = small(arch, dtype)
    seqs = make_sequences([17, 9, 23, 12, 15, 8], [6, 1, 9, 4, 7, 3], packed_at=3)
    arrivals = [0, 0, 2, 3, 5, 9]
    before = decode_step.step_kernel_calls()
    run_pool(model, seqs, arrivals, slots_n=4, chunk=4)
    check_against_full_forward(model, seqs, 1e-9 if dtype == torch.float64 else 2e-5)
    fused = sum((decode_step.step_kernel_calls() - before).values())
    if dtype == torch.float32 and numba_common.available():
        assert fused > 0  # the float32 run went through the fused kernels
    if dtype == torch.float64:
        assert fused == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_pool_greedy_tokens_equal_each_sequence_alone(arch):
    model = small(arch, seed=1)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (5, 2, 8, 3)]
    alone = [model.generate(p[None], 10)[0, len(p):] for p in prompts]
    cache = model.init_cache(3, max_length=32)
    out: dict[int, list[int]] = {}
    with torch.no_grad():
        # sequences 0-2 start together; 3 takes the slot of the first one to finish
        last = {b: model.prefill(prompts[b], cache, b, last_only=True) for b in range(3)}
        slot_of = {0: 0, 1: 1, 2: 2}
        waiting = [3]
        while last:
            owners = list(last)
            nxt = {i: int(last[i].argmax()) for i in owners}
            for i in owners:
                out.setdefault(i, []).append(nxt[i])
            for i in owners:
                if len(out[i]) == 10:
                    del last[i]
                    if waiting:
                        j = waiting.pop()
                        slot_of[j] = slot_of[i]
                        cache.reset(slot_of[j])
                        last[j] = model.prefill(prompts[j], cache, slot_of[j], last_only=True)
            going = [i for i in owners if i in last]
            if going:
                logits = model.step(torch.tensor([nxt[i] for i in reversed(going)]), cache,
                                    [slot_of[i] for i in reversed(going)])
                for row, i in enumerate(reversed(going)):
                    last[i] = logits[row]
    for i, p in enumerate(prompts):
        assert out[i] == alone[i].tolist()


@given(data=st.data())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_arrivals_prompts_and_finish_times(data):
    """Random arrival ticks, prompt lengths, sequence lengths (finish times) and pool sizes."""
    arch = data.draw(st.sampled_from(ARCHS))
    model = _MODELS.setdefault(arch, small(arch, torch.float64, seed=2))
    n = data.draw(st.integers(1, 5))
    lengths = data.draw(st.lists(st.integers(2, 14), min_size=n, max_size=n))
    prompts = [data.draw(st.integers(1, L - 1)) for L in lengths]
    arrivals = data.draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    slots_n = data.draw(st.integers(1, 4))
    seqs = make_sequences(lengths, prompts, seed=data.draw(st.integers(0, 2**16)))
    run_pool(model, seqs, arrivals, slots_n, seed=data.draw(st.integers(0, 99)),
             chunk=data.draw(st.sampled_from([None, 1, 3])))
    check_against_full_forward(model, seqs, 1e-9)


_MODELS: dict[str, LanguageModel] = {}


def _continue(model, cache, slot, tokens):
    with torch.no_grad():
        return torch.stack([model.step(t[None], cache, [slot])[0] for t in tokens])


@pytest.mark.parametrize("arch", ARCHS)
def test_fork_snapshot_restore_and_save_load_continue_identically(arch, tmp_path):
    model = small(arch, torch.float64, seed=4)
    g = torch.Generator().manual_seed(5)
    prefix, more = torch.randint(0, V, (9,), generator=g), torch.randint(0, V, (6,), generator=g)
    cache = model.init_cache(4, max_length=24)
    with torch.no_grad():
        model.prefill(torch.randint(0, V, (4,), generator=g), cache, 0)  # another sequence in slot 0
        model.prefill(prefix, cache, 1)
    snap = cache.snapshot(1)
    cache.copy_(1, [2, 3])
    assert cache.positions.tolist() == [4, 9, 9, 9]
    want = _continue(model, cache, 1, more)
    torch.testing.assert_close(_continue(model, cache, 3, more), want, rtol=0, atol=0)
    # the fork is independent: slot 2 still holds the prefix
    torch.testing.assert_close(_continue(model, cache, 2, more), want, rtol=0, atol=0)
    # restore into a used slot of another pool, and through a safetensors file
    path = tmp_path / "state.safetensors"
    save_state(path, snap)
    other = model.init_cache(2, max_length=30)
    with torch.no_grad():
        model.prefill(torch.randint(0, V, (12,), generator=g), other, 1)
    other.restore(1, load_state(path))
    assert other.positions.tolist() == [0, 9]
    torch.testing.assert_close(_continue(model, other, 1, more), want, rtol=0, atol=0)
    # the snapshot was a copy: the pool moving on does not change it
    assert torch.equal(load_state(path)["position"], snap["position"])
    for key, t in snap.items():
        torch.testing.assert_close(load_state(path)[key], t, rtol=0, atol=0)


def test_reset_empties_a_slot_and_leaves_the_others():
    model = small("griffin", torch.float64)
    cache = model.init_cache(2)
    x = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        model(x, cache=cache)
        ref = model.init_cache(1)
        model(x[1:], cache=ref)
        cache.reset(0)
        assert cache.positions.tolist() == [0, 7]
        assert all(not t[0].any() for c in cache.blocks for t in c.tensors().values())
        # slot 0 starts afresh, slot 1 goes on
        torch.testing.assert_close(model.prefill(x[0, :3], cache, 0), model(x[:1, :3])[0])
        torch.testing.assert_close(model.step(torch.tensor([5]), cache, [1]), model.step(torch.tensor([5]), ref, [0]))


def _pool_state(cache: ModelCache) -> list[torch.Tensor]:
    return [cache.positions.clone(), cache.doc_start.clone()] + [t.clone() for c in cache.blocks
                                                                   for t in c.tensors().values()]


def test_bad_input_is_a_clear_error_and_leaves_the_pool_unchanged(tmp_path):
    model = small("griffin", seed=6)
    cache = model.init_cache(3, max_length=16)
    with torch.no_grad():
        model.prefill(torch.tensor([1, 2, 3]), cache, 0)
    before = _pool_state(cache)
    cases = [
        (lambda: model.step(torch.tensor([1, 2]), cache, [0, 3]), r"slot index 3 out of range \[0, 3\)"),
        (lambda: model.step(torch.tensor([1, 2]), cache, [-1, 0]), "slot index -1 out of range"),
        (lambda: model.step(torch.tensor([1, 2]), cache, [1, 1]), "slot 1 appears more than once"),
        (lambda: model.step(torch.tensor([1, 2]), cache, [0]), "one entry per slot"),
        (lambda: model.step(torch.tensor([1, V]), cache, [0, 1]), f"token id {V} out of range"),
        (lambda: model.step(torch.tensor([[1]]), cache, [0]), r"shape \(n\)"),
        (lambda: model.step(torch.tensor([1.0]), cache, [0]), "integer"),
        (lambda: model.step(torch.tensor([1]), cache, torch.tensor([0.0])), "integer slot indices"),
        (lambda: model.prefill(torch.tensor([1, -2]), cache, 1), "token id -2 out of range"),
        (lambda: model.prefill(torch.tensor([1]), cache, 5), "slot: slot index 5"),
        (lambda: model.prefill(torch.tensor([]).long(), cache, 1), "non-empty"),
        (lambda: cache.copy_(0, [0, 1]), "contains the source slot"),
        (lambda: cache.reset([2, 7]), "slot index 7"),
        (lambda: cache.restore(1, {"position": torch.tensor(1)}), "missing"),
        (lambda: model.init_cache(0), "batch_size"),
    ]
    for call, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            call()
        for a, b in zip(before, _pool_state(cache)):
            assert torch.equal(a, b), match
    # a snapshot of another config names the mismatch
    other = small("griffin", lru_width=96)
    snap = other.init_cache(1).snapshot(0)
    with pytest.raises(ValueError, match=r"blocks\.0\.conv has shape .* another model config"):
        cache.restore(1, snap)
    hawk = small("hawk").init_cache(1).snapshot(0)
    with pytest.raises(ValueError, match="missing|unexpected"):
        cache.restore(1, hawk)
    for a, b in zip(before, _pool_state(cache)):
        assert torch.equal(a, b)
    # a global-attention slot at max_length
    tf = small("transformer")
    c = tf.init_cache(2, max_length=4)
    with torch.no_grad():
        tf.prefill(torch.tensor([1, 2, 3, 4]), c, 1)
        tf.step(torch.tensor([1]), c, [0])  # the other slot still has room
        with pytest.raises(ValueError, match="holds 4 positions per slot"):
            tf.step(torch.tensor([1, 2]), c, [0, 1])
    assert c.positions.tolist() == [1, 4]
    # files that are not states
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_state(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "missing.safetensors")


def test_step_allocates_no_cache_memory_and_keeps_storage():
    model = small("griffin")
    cache = model.init_cache(4, max_length=16)
    ptrs = [t.data_ptr() for c in cache.blocks for t in c.tensors().values()]
    size = cache.nbytes()
    with torch.no_grad():
        for b in range(4):
            model.prefill(torch.randint(0, V, (b + 2,)), cache, b)
        for _ in range(8):
            model.step(torch.randint(0, V, (3,)), cache, [3, 0, 2])
    assert cache.nbytes() == size
    assert ptrs == [t.data_ptr() for c in cache.blocks for t in c.tensors().values()]


@pytest.mark.slow
def test_compiled_step_equals_eager_step():
    model = small("griffin", torch.float64, seed=9)
    eager, compiled = model.init_cache(3, max_length=20), model.init_cache(3, max_length=20)
    x = torch.randint(0, V, (3, 6))
    with torch.no_grad():
        model(x, cache=eager)
        model(x, cache=compiled)
        model.compile_decode_step(backend="eager")  # tracing (static shapes) without a C++ toolchain
        try:
            for slots in ([2, 0], [1, 2], [0, 1]):
                tok = torch.randint(0, V, (2,))
                got = model.step(tok, compiled, slots)
                model.compile_decode_step(False)
                want = model.step(tok, eager, slots)
                model.compile_decode_step(backend="eager")
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        finally:
            model.compile_decode_step(False)
    assert compiled.positions.tolist() == eager.positions.tolist() == [8, 8, 8]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_forward_on_slots_at_different_positions(arch):
    """`model(tokens, cache=pool)` continues each slot from its own position."""
    model = small(arch, torch.float64, seed=10)
    g = torch.Generator().manual_seed(11)
    a, b = torch.randint(0, V, (2, 13), generator=g)
    pool = model.init_cache(2, max_length=16)
    with torch.no_grad():
        model.prefill(a[:3], pool, 0)
        model.prefill(b[:7], pool, 1)
        logits, pool = model(torch.stack([a[3:9], b[7:13]]), cache=pool)
        torch.testing.assert_close(logits[0], model(a[None, :9])[0, 3:], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(logits[1], model(b[None, :13])[0, 7:], rtol=1e-9, atol=1e-9)
    assert pool.positions.tolist() == [9, 13]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_many_equals_one_prefill_per_slot(arch):
    """Prompts of different lengths prefilled together (left-padded, pads a document of their
    own) leave every slot as its own prefill does: same last logits, same steps after."""
    model = small(arch)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (7, 1, 12, 4)]
    slots = [5, 0, 3, 1]
    alone, together = model.init_cache(6, max_length=40), model.init_cache(6, max_length=40)
    with torch.no_grad():
        want = torch.stack([model.prefill(p, alone, s, last_only=True) for p, s in zip(prompts, slots)])
        got = model.prefill_many(prompts, together, slots)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        tokens = torch.randint(0, V, (4,), generator=g)
        for _ in range(9):  # past the window of 5: the pads must never be attended
            a, b = model.step(tokens, alone, slots), model.step(tokens, together, slots)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            tokens = a.argmax(-1)
    assert together.positions[2] == 0 and together.positions[4] == 0  # other slots untouched


def test_prefill_many_refuses_bad_input_and_leaves_the_pool_unchanged():
    model = small("griffin")
    cache = model.init_cache(3)
    with torch.no_grad():
        model.prefill(torch.tensor([1, 2]), cache, 0)
        before = [t.clone() for t in cache._all_tensors()]
        with pytest.raises(ValueError, match="fresh slots"):
            model.prefill_many([torch.tensor([1]), torch.tensor([2, 3])], cache, [0, 1])
        with pytest.raises(ValueError, match="one prompt per slot"):
            model.prefill_many([torch.tensor([1])], cache, [1, 2])
        with pytest.raises(ValueError, match="out of range"):
            model.prefill_many([torch.tensor([V]), torch.tensor([2])], cache, [1, 2])
    assert all(torch.equal(a, b) for a, b in zip(before, cache._all_tensors()))


def test_select_forks_slots_and_put_writes_them_back():
    model = small("griffin")
    cache = model.init_cache(3)
    with torch.no_grad():
        model.prefill(torch.tensor([1, 2, 3]), cache, 1)
        model.prefill(torch.tensor([4]), cache, 2)
        forked = cache.select([1, 1, 2])
        assert forked.batch_size == 3 and forked.positions.tolist() == [3, 3, 1]
        a = model.step(torch.tensor([5, 5, 6]), forked)
        b = model.step(torch.tensor([5, 6]), cache, [1, 2])
        torch.testing.assert_close(a[[0, 2]], b)
        torch.testing.assert_close(a[0], a[1])
        fresh = model.init_cache(3)
        fresh.put([2, 0], cache.select([1, 2]))
        assert fresh.positions.tolist() == [2, 0, 4]
    with pytest.raises(ValueError, match="slots"):
        cache.select([3])
