"""Blocked sliding-window attention against the dense masked reference."""
from __future__ import annotations

import pytest
import torch

from griffinlm.ops import attention_reference, causal_attention


def doc_starts(B: int, T: int, p: float, gen: torch.Generator) -> torch.Tensor:
    new_doc = torch.rand(B, T, generator=gen) < p
    new_doc[:, 0] = True
    pos = torch.arange(T).expand(B, T)
    return torch.where(new_doc, pos, torch.zeros_like(pos)).cummax(dim=1).values


def case_inputs(T: int, window: int, H: int, Hkv: int, docs: bool):
    """q (2, H, T, 8), k and v (2, Hkv, T, 8) float64 leaves, document starts (or None), and the
    generator they came from (seeded by the case; it draws the cotangent next)."""
    gen = torch.Generator().manual_seed(T + window)
    B, hd = 2, 8
    q = torch.randn(B, H, T, hd, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, T, hd, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, T, hd, generator=gen, dtype=torch.float64, requires_grad=True)
    return q, k, v, doc_starts(B, T, 0.08, gen) if docs else None, gen


@pytest.mark.parametrize(
    "T,window,block,H,Hkv,docs",
    [
        (37, 5, 4, 4, 1, False),    # T not a multiple of the block
        (37, 5, 3, 4, 2, True),     # GQA, documents
        (10, 50, 4, 2, 1, False),   # window larger than T
        (100, 16, 16, 4, 1, True),  # block = window
        (33, 1, 4, 2, 2, True),     # a query sees only itself
        (64, 20, 256, 4, 1, True),  # block capped to the window
        (300, 64, 48, 2, 1, False),  # window not a multiple of the block
        (45, 7, 4, 6, 2, False),    # GQA without documents: query heads folded per kv head
        (20, 30, 8, 4, 1, False),   # every block's span starts before key 0 (no shared-pattern blocks)
        (50, 8, 8, 3, 3, False),    # multi-head (one query head per kv head)
    ],
)
def test_blocked_matches_dense_reference(T, window, block, H, Hkv, docs):
    q, k, v, ds, gen = case_inputs(T, window, H, Hkv, docs)
    out = causal_attention(q, k, v, window, ds, block=block, impl="blocked")
    ref = attention_reference(q.double(), k, v, window, ds)  # reference computes in fp32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,docs", [(None, False), (None, True), (40, False), (40, True), (1000, True)])
def test_default_dispatch_matches_reference(window, docs):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 130, 16, generator=gen)
    k, v = torch.randn(2, 1, 1, 130, 16, generator=gen)
    ds = doc_starts(1, 130, 0.05, gen) if docs else None
    torch.testing.assert_close(causal_attention(q, k, v, window, ds), attention_reference(q, k, v, window, ds),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("Hkv,docs", [(1, True), (2, False)])
def test_training_calls_use_the_training_block_and_match_the_reference(Hkv, docs, monkeypatch):
    """With autograd recording, the default dispatch takes `training_block(window)` (longer blocks
    than the forward-only MQA choice) and the gradients still equal the dense reference's."""
    import griffinlm.ops.attention as attention

    seen = []
    blocked = attention._blocked_local_attention
    monkeypatch.setattr(attention, "_blocked_local_attention",
                        lambda *a: seen.append(a[-1]) or blocked(*a))
    q, k, v, ds, gen = case_inputs(400, 300, 4, Hkv, docs)
    out = causal_attention(q, k, v, 300, ds)
    assert seen == [attention.training_block(300)] == [75]
    ref = attention_reference(q, k, v, 300, ds)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        causal_attention(q, k, v, 300, ds)
    assert seen[-1] == (attention.MQA_BLOCK if Hkv == 1 else attention.MHA_BLOCK)
    assert [attention.training_block(w) for w in (16, 256, 512, 1024, 4096)] == [64, 64, 128, 256, 256]


def test_blocked_scale_and_bf16():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 70, 16, generator=gen).bfloat16()
    k, v = torch.randn(2, 1, 1, 70, 16, generator=gen).bfloat16()
    out = causal_attention(q, k, v, 9, scale=0.3, block=8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attention_reference(q, k, v, 9, scale=0.3).float(), rtol=2e-2, atol=2e-2)


# --- flex_attention (the CUDA path of local attention), checked on CPU ---
# torch 2.13 runs flex_attention's forward on CPU but refuses requires_grad there; its eager
# path (the unfused math implementation, which applies the mask predicate to every score in
# forward and backward) is checked with that refusal lifted, the BlockMask's tiles against the
# dense mask, and the compiled CPU forward (which skips tiles by the BlockMask) once.

FLEX_CASES = [  # (T, window, block, H, Hkv, docs)
    (37, 5, 4, 4, 1, True), (64, 40, 8, 2, 1, False), (100, 16, 16, 4, 2, True), (33, 1, 4, 2, 2, True),
    (50, 60, 8, 3, 1, True), (130, 33, 16, 2, 1, False),
]


def _blocks_of_dense(mask: torch.Tensor, T: int, block: int):
    """(B, T, T) bool mask -> per (query block, key block) tile: any visible, all visible."""
    n = -(-T // block)
    m = torch.nn.functional.pad(mask, (0, n * block - T, 0, n * block - T)).view(mask.shape[0], n, block, n, block)
    complete = torch.zeros(n, dtype=torch.bool)
    complete[: T // block] = True
    return m.any(4).any(2), m.all(4).all(2) & complete[:, None] & complete[None, :]


@pytest.mark.parametrize("T,window,block,H,Hkv,docs", FLEX_CASES)
def test_flex_block_mask_tiles_match_the_dense_mask(T, window, block, H, Hkv, docs):
    """Every tile holding a visible (query, key) pair is computed, no other; tiles marked full
    (computed without the predicate) are entirely visible."""
    from torch.nn.attention.flex_attention import _ordered_to_dense

    from griffinlm.ops import attention_mask
    from griffinlm.ops.attention.flex import local_block_mask

    gen = torch.Generator().manual_seed(T)
    ds = doc_starts(2, T, 0.1, gen) if docs else None
    bm = local_block_mask(T, window, ds, 2, torch.device("cpu"), block)
    pos = torch.arange(T)
    any_visible, all_visible = _blocks_of_dense(attention_mask(pos, pos, window, ds).expand(2, T, T), T, block)
    assert torch.equal(bm.to_dense()[:, 0].bool(), any_visible)
    n = -(-T // block)
    full = _ordered_to_dense(bm.full_kv_num_blocks, bm.full_kv_indices, n)[:, 0].bool()
    assert not (full & ~all_visible).any()
    if not docs:
        assert torch.equal(full, all_visible)  # and every whole-visible tile skips the predicate


@pytest.mark.parametrize("T,window,block,H,Hkv,docs", FLEX_CASES)
def test_flex_local_attention_matches_dense_reference(T, window, block, H, Hkv, docs, monkeypatch):
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)  # lift the CPU backward refusal
    q, k, v, ds, gen = case_inputs(T, window, H, Hkv, docs)
    from griffinlm.ops.attention.flex import flex_local_attention

    out = flex_local_attention(q, k, v, window, ds, 0.4, compiled=False, block=block)
    # through the entry point (flex's own 128-row tiles; eager on CPU)
    torch.testing.assert_close(causal_attention(q, k, v, window, ds, 0.4, impl="flex"), out)
    ref = attention_reference(q, k, v, window, ds, scale=0.4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.slow
def test_flex_compiled_forward_on_cpu_skips_tiles_correctly():
    """torch.compile'd flex_attention on CPU (no gradient) reads only the BlockMask's tiles:
    equal to the reference, documents and GQA included."""
    from griffinlm.ops.attention.flex import flex_local_attention

    gen = torch.Generator().manual_seed(3)
    B, H, Hkv, T, hd = 2, 4, 2, 300, 16
    q = torch.randn(B, H, T, hd, generator=gen)
    k, v = torch.randn(2, B, Hkv, T, hd, generator=gen)
    ds = doc_starts(B, T, 0.02, gen)
    out = flex_local_attention(q, k, v, 40, ds, compiled=True)
    torch.testing.assert_close(out, attention_reference(q, k, v, 40, ds), rtol=1e-4, atol=1e-5)


def test_cpu_dispatch_is_unchanged_and_bad_flex_inputs_raise():
    from griffinlm.ops.attention.flex import flex_local_attention

    q = torch.randn(1, 2, 20, 8)
    k = torch.randn(1, 1, 20, 8)
    # CPU default for a local window: the blocked path, bit for bit
    torch.testing.assert_close(causal_attention(q, k, k, 5), causal_attention(q, k, k, 5, impl="blocked"),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="Hkv dividing H"):
        flex_local_attention(q, torch.randn(1, 3, 20, 8), torch.randn(1, 3, 20, 8), 5)
    with pytest.raises(ValueError, match="window must be at least 1"):
        flex_local_attention(q, k, k, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_on_cuda_matches_reference_with_gradients():
    gen = torch.Generator().manual_seed(4)
    B, H, T, hd = 2, 4, 1000, 64
    q = torch.randn(B, H, T, hd, generator=gen).cuda().requires_grad_()
    k, v = (torch.randn(B, 1, T, hd, generator=gen).cuda().requires_grad_() for _ in range(2))
    ds = doc_starts(B, T, 0.01, gen).cuda()
    out = causal_attention(q, k, v, 256, ds)  # the default on CUDA: flex
    ref = attention_reference(q, k, v, 256, ds)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3)
