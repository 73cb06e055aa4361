"""Chunked cross-entropy over the tied output layer (ops/loss) against the whole-logits
reference in float64: the summed nats and the gradients w.r.t. hidden states and embedding,
with and without the soft-cap, masks and ignored targets, chunks that do not divide N."""
from __future__ import annotations

import pytest
import torch

from griffinlm.ops.loss import IGNORE, tied_cross_entropy, tied_cross_entropy_reference


def inputs(B, T, D, V, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=dtype) * 2).requires_grad_()  # logits of a few units
    t = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    return h, w, t, mask


def grads(fn, h, w):
    out = fn(h, w)
    return (out, *torch.autograd.grad(out * 1.7, (h, w)))  # a cotangent that is not 1


@pytest.mark.parametrize("soft_cap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 5, 64, None])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_matches_reference_float64(soft_cap, chunk, masked):
    h, w, t, mask = inputs(2, 13, 8, 37, seed=chunk or 0)
    t[0, 3] = IGNORE  # an ignored id counts for nothing, mask or not
    m = mask if masked else None
    got = grads(lambda h, w: tied_cross_entropy(h, w, t, m, soft_cap, chunk_tokens=chunk), h, w)
    want = grads(lambda h, w: tied_cross_entropy_reference(h, w, t, m, soft_cap), h, w)
    assert got[0].dtype == torch.float64
    for name, a, b in zip(("nats", "dhidden", "dembedding"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda s, name=name: f"{name}: {s}")


def test_float32_and_all_masked_chunks():
    h, w, t, mask = inputs(1, 40, 16, 50, seed=3, dtype=torch.float32)
    mask[0, :25] = False  # whole chunks with nothing counted: skipped in backward, zero gradient
    got = grads(lambda h, w: tied_cross_entropy(h, w, t, mask, 30.0, chunk_tokens=8), h, w)
    want = grads(lambda h, w: tied_cross_entropy_reference(h.double(), w.double(), t, mask, 30.0), h, w)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    assert got[1][0, :24].abs().max() == 0


def test_under_bf16_autocast_rounds_operands_like_the_model():
    """Under CPU bf16 autocast the GEMM operands are bf16-rounded, the rest fp32: equal to the
    reference on rounded inputs."""
    h, w, t, mask = inputs(2, 9, 16, 40, seed=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tied_cross_entropy(h, w, t, mask, 5.0, chunk_tokens=4)
    want = tied_cross_entropy_reference(h.bfloat16().double(), w.bfloat16().double(), t, mask, 5.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_only_hidden_requires_grad_and_no_grad_mode():
    h, w, t, _ = inputs(1, 6, 4, 11, seed=5)
    w = w.detach()
    (dh,) = torch.autograd.grad(tied_cross_entropy(h, w, t), h)
    (ref,) = torch.autograd.grad(tied_cross_entropy_reference(h, w, t), h)
    torch.testing.assert_close(dh, ref)
    with torch.no_grad():
        torch.testing.assert_close(tied_cross_entropy(h, w, t), tied_cross_entropy_reference(h, w, t))


def test_bad_inputs_raise():
    h, w, t, mask = inputs(1, 4, 4, 9)
    with pytest.raises(ValueError, match="embedding \\(V, D\\)"):
        tied_cross_entropy(h, w[:, :3], t)
    with pytest.raises(ValueError, match="leading shape"):
        tied_cross_entropy(h, w, t[:, :2])
    with pytest.raises(TypeError, match="integer ids"):
        tied_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="mask"):
        tied_cross_entropy(h, w, t, mask[:, :2])
    with pytest.raises(ValueError, match="out of range"):
        tied_cross_entropy(h, w, t.masked_fill(torch.ones_like(mask), 9))
    with pytest.raises(ValueError, match="chunk_tokens"):
        tied_cross_entropy(h, w, t, chunk_tokens=0)
