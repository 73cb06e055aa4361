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
    gen = torch.Generator().manual_seed(T + window)
    B, hd = 2, 8
    q = torch.randn(B, H, T, hd, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, T, hd, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, T, hd, generator=gen, dtype=torch.float64, requires_grad=True)
    ds = doc_starts(B, T, 0.08, gen) if docs else None
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


def test_blocked_scale_and_bf16():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 70, 16, generator=gen).bfloat16()
    k, v = torch.randn(2, 1, 1, 70, 16, generator=gen).bfloat16()
    out = causal_attention(q, k, v, 9, scale=0.3, block=8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attention_reference(q, k, v, 9, scale=0.3).float(), rtol=2e-2, atol=2e-2)
