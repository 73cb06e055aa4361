"""ops.lora: the fused LoRA linear (frozen base, one adapter, numba dropout) against peft's
composition in float64 with the same dropout mask: outputs and the gradients of x, A and B."""
import pytest
import torch

from griffinlm.ops.lora import dropout_mask, lora_linear, lora_linear_reference
from harness import fast_path, needs_numba, output_and_grads

pytestmark = needs_numba


@pytest.mark.parametrize("shape,K,N,r,p", [((2, 37), 48, 80, 4, 0.0), ((3, 5, 11), 64, 33, 8, 0.3),
                                           ((130,), 17, 96, 1, 0.05)])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_peft_composition(shape, K, N, r, p, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, K, generator=g)
    w, b = torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g) if bias else None
    a, bb = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g)
    seed_gen = torch.Generator().manual_seed(123)
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(123))) if p else 0
    keep = dropout_mask((*shape, K), p, seed) if p else None

    x32, a32, b32 = (t.clone().requires_grad_() for t in (x, a, bb))
    with fast_path("lora_linear"):
        out, grads = output_and_grads(lambda x_, a_, b_: lora_linear(x_, w, b, a_, b_, 1.5, p, generator=seed_gen),
                                      [x32, a32, b32])
    x64, a64, b64 = (t.double().requires_grad_() for t in (x, a, bb))
    ref, ref_grads = output_and_grads(
        lambda x_, a_, b_: lora_linear_reference(x_, w.double(), None if b is None else b.double(), a_, b_, 1.5, keep, p),
        [x64, a64, b64])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "lora_A", "lora_B"), grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)


def test_dropout_mask_rate_and_seeds():
    keep = dropout_mask((256, 512), 0.25, 7)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    f = keep.float()
    # no structure along rows or columns (standard deviations of these means: 0.019 and 0.027),
    # no correlation between neighbours (0.003)
    assert (f.mean(1) - 0.75).abs().max() < 0.1 and (f.mean(0) - 0.75).abs().max() < 0.14
    c = f - 0.75
    for a, b in ((c[:, 1:], c[:, :-1]), (c[1:], c[:-1])):
        assert abs((a * b).mean().item() / 0.1875) < 0.02
    assert torch.equal(keep, dropout_mask((256, 512), 0.25, 7))
    assert not torch.equal(keep, dropout_mask((256, 512), 0.25, 8))
    assert dropout_mask((4, 8), 0.0, 3).all()


def test_trainable_base_takes_the_reference_path():
    """Full fine-tuning with an adapter on top (a trainable base weight) is peft's composition."""
    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8, requires_grad=True), torch.randn(2, 8), torch.randn(6, 2)
    with fast_path("lora_linear", runs=0):
        y = lora_linear(x, w, None, a, b, 2.0)
    torch.testing.assert_close(y, lora_linear_reference(x, w, None, a, b, 2.0))
    y.sum().backward()
    assert w.grad is not None


def test_dropout_streams_give_independent_masks():
    """Data-parallel ranks draw the same seeds; their streams make the masks differ."""
    x, w = torch.randn(64, 32), torch.randn(16, 32)
    a, b = torch.randn(4, 32), torch.randn(16, 4)

    def out(stream):
        torch.manual_seed(5)
        return lora_linear(x, w, None, a, b, 2.0, 0.5, stream=stream)

    assert torch.equal(out(1), out(1)) and torch.equal(out(0), out(0))
    assert not torch.equal(out(0), out(1))
