"""Block-diagonal gate matmuls (ops/block_diag) against an explicit per-block float64 loop."""
import pytest
import torch

from griffinlm.ops import block_diagonal_linear, block_diagonal_linear_reference
from griffinlm.ops.block_diag import _fusable
from harness import fast_path, leaf


def naive(x, weights, biases):
    H, bw, _ = weights[0].shape
    outs = []
    for w, b in zip(weights, biases):
        blocks = [x[..., h * bw:(h + 1) * bw] @ w[h] + (b[h] if b is not None else 0) for h in range(H)]
        outs.append(torch.cat(blocks, dim=-1))
    return outs


@pytest.mark.parametrize("shape", [(2, 37, 12), (130, 8), (1, 65, 6)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("used", [(0, 1), (0,), (1,)])
def test_fused_gates_match_float64_loop(shape, bias, used):
    torch.manual_seed(0)
    D = shape[-1]
    H = 4 if D % 4 == 0 else 3
    bw = D // H
    x = leaf(torch.randn(shape, dtype=torch.float64))
    ws = [leaf(torch.randn(H, bw, bw, dtype=torch.float64)) for _ in range(2)]
    bs = [leaf(torch.randn(H, bw, dtype=torch.float64)) if bias else None for _ in range(2)]
    assert _fusable(x, ws, bs)
    with fast_path("block_diagonal_linear"):
        outs = block_diagonal_linear(x, ws, bs)
    assert all("BlockDiagonal" in type(o.grad_fn).__name__ for o in outs)  # the fused path ran
    refs = naive(x, ws, bs)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r)
    gs = [torch.randn(shape, dtype=torch.float64) for _ in range(2)]
    leaves = [x, *ws, *(b for b in bs if b is not None)]
    got = torch.autograd.grad([outs[k] for k in used], leaves, [gs[k] for k in used], allow_unused=True)
    exp = torch.autograd.grad([refs[k] for k in used], leaves, [gs[k] for k in used], allow_unused=True)
    for a, e in zip(got, exp):
        if e is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, e)


def test_small_inputs_and_mixed_dtypes_use_einsum_and_agree():
    torch.manual_seed(1)
    ws = [torch.randn(2, 3, 3) for _ in range(2)]
    bs = [torch.randn(2, 3), None]
    x = torch.randn(5, 6)  # fewer rows than a per-block matmul pays off for
    assert not _fusable(x, ws, bs) and not _fusable(torch.randn(100, 6).bfloat16(), ws, bs)
    for o, r in zip(block_diagonal_linear(x, ws, bs), naive(x, ws, bs)):
        torch.testing.assert_close(o, r)
    for o, r in zip(block_diagonal_linear_reference(x, ws, bs), naive(x, ws, bs)):
        torch.testing.assert_close(o, r)
    with pytest.raises(ValueError, match="block_diagonal_linear"):
        block_diagonal_linear(torch.randn(4, 7), ws, bs)
