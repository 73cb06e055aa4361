"""`ops.linear` (the backend-choosing linear) against F.linear, and its bf16 autocast path."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from griffinlm.config import ModelConfig
from griffinlm.layers.linear import Linear
from griffinlm.model import LanguageModel
from griffinlm.ops import gemm_backend as gb
from griffinlm.ops.gemm_backend import GEMM_CALLS, force
from griffinlm.ops.linear import linear

needs_onednn = pytest.mark.skipif(not gb.onednn_available(), reason="torch built without oneDNN")
needs_bf16 = pytest.mark.skipif(not gb.native_bf16(), reason="CPU without native bf16")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def operands(shape, n, bias, noncontiguous):
    """x of `shape` (..., K) (a transposed view when noncontiguous), W (n, K), b (n,) or None."""
    k = shape[-1]
    if noncontiguous:
        x = torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
        assert not x.is_contiguous()
    else:
        x = torch.randn(*shape)
    w = torch.randn(n, k) / k ** 0.5
    b = torch.randn(n) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b)]


@needs_onednn
@pytest.mark.parametrize("backend", ["mkl", "onednn", "onednn_packed"])
@pytest.mark.parametrize("shape,n,bias,noncontiguous", [
    ((7, 33), 65, True, False),          # odd sizes
    ((3, 37, 129), 255, False, False),    # 3-D input, no bias
    ((2, 45, 96), 130, True, True),       # non-contiguous 3-D input
    ((1, 520), 1536, True, False),        # one row (a decoding step)
])
def test_each_backend_equals_f_linear_with_gradients(backend, shape, n, bias, noncontiguous):
    x, w, b = operands(shape, n, bias, noncontiguous)
    g = torch.randn(*shape[:-1], n)
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad(ref, [t for t in (x, w, b) if t is not None], g)
    GEMM_CALLS.clear()
    with force(backend):
        y = linear(x, w, b)
        grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5
    grad_backend = "onednn" if backend == "onednn_packed" else backend
    assert GEMM_CALLS == {f"forward:{backend}": 1, f"grad_input:{grad_backend}": 1,
                          f"grad_weight:{grad_backend}": 1}


@needs_onednn
def test_auto_measures_once_per_shape_class_and_remembers(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIFFINLM_CACHE", str(tmp_path))
    monkeypatch.setattr(gb, "CHOICES", gb.Choices())
    x, w, b = (torch.randn(100, 512), torch.randn(1536, 512), torch.randn(1536))
    GEMM_CALLS.clear()
    with torch.no_grad():
        y = linear(x, w, b)
        linear(x[:70], w, b)  # rows 70 and 100 are one class (128)
    assert rel_err(y, F.linear(x, w, b)) < 1e-5
    chosen = gb.CHOICES.current()
    assert list(chosen) == ["forward float32 M128 N1536 K512"]
    assert chosen["forward float32 M128 N1536 K512"] in gb.BACKENDS
    assert sum(GEMM_CALLS.values()) == 2
    saved = json.loads((tmp_path / "gemm_backends.json").read_text())
    assert saved == {gb.machine_key(): chosen}
    gb.CHOICES = gb.Choices()  # a new process reads the file instead of measuring again
    assert gb.CHOICES.get("forward float32 M128 N1536 K512") == chosen["forward float32 M128 N1536 K512"]


@pytest.mark.parametrize("M,N,K", [(2051, 16, 40), (64, 300, 16), (37, 5, 9)])
def test_split_weight_gradient_equals_the_product(M, N, K, tmp_path, monkeypatch):
    """The "mkl_split" backend of the weight gradient (chunks over M, either orientation, a ragged
    tail): equal to g^T x, stored and read back as a choice, and used when it is the one chosen."""
    from griffinlm.ops.linear import grad_weight_fp32, split_reduction

    g, x = torch.randn(M, N, dtype=torch.float64), torch.randn(M, K, dtype=torch.float64)
    for chunks in (2, 3, 4):
        torch.testing.assert_close(split_reduction(g, x, chunks), g.t() @ x)
    monkeypatch.setenv("GRIFFINLM_CACHE", str(tmp_path))
    monkeypatch.setattr(gb, "CHOICES", gb.Choices())
    monkeypatch.setattr(gb, "MIN_MNK", 0)
    monkeypatch.setattr(gb, "fastest", lambda times: "mkl_split" if "mkl_split" in times else "mkl")
    GEMM_CALLS.clear()
    g32, x32 = g.float(), x.float()
    torch.testing.assert_close(grad_weight_fp32(g32, x32), g32.t() @ x32, rtol=1e-5, atol=1e-4)
    split = M >= 4 * torch.get_num_threads() and gb.onednn_available()
    assert GEMM_CALLS == {f"grad_weight:{'mkl_split' if split else 'mkl'}": 1}
    if split:
        assert gb.Choices().get(f"grad_weight float32 M{gb.row_class(M)} N{N} K{K}") == "mkl_split"


@needs_onednn
def test_frozen_weight_input_gradient_on_its_packed_transpose():
    """A frozen weight's input gradient (LoRA's base) may run on W^T packed once: equal to g @ W,
    and re-packed when the weight changes in place."""
    from griffinlm.ops.linear import grad_input_fp32

    g, w = torch.randn(64, 48), torch.randn(48, 40)
    GEMM_CALLS.clear()
    with force("onednn_packed"):
        torch.testing.assert_close(grad_input_fp32(g, w), g @ w, rtol=1e-5, atol=1e-4)
        w.mul_(2.0)
        torch.testing.assert_close(grad_input_fp32(g, w), g @ w, rtol=1e-5, atol=1e-4)
        trainable = w.clone().requires_grad_()
        torch.testing.assert_close(grad_input_fp32(g, trainable), g @ w, rtol=1e-5, atol=1e-4)
    assert GEMM_CALLS == {"grad_input:onednn_packed": 2, "grad_input:onednn": 1}


@needs_onednn
def test_disabled_weight_copies_fall_back_to_the_weights(monkeypatch):
    """After `disable_weight_copies` (FSDP2 runs) nothing is packed or stacked: the products
    run on the weights themselves and stay equal to F.linear."""
    monkeypatch.setattr(gb, "COPIES", gb.WeightCopies(1 << 30))
    x, w, b = torch.randn(64, 48), torch.randn(40, 48), torch.randn(40)
    gb.disable_weight_copies()
    assert gb.packed(w) is None and gb.packed_concat((w, w)) is None and gb.packed_transposed(w) is None
    GEMM_CALLS.clear()
    with torch.no_grad(), force("onednn_packed"):
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert GEMM_CALLS == {"forward:onednn": 1}
    assert gb.bf16_copy(w).dtype == torch.bfloat16


def test_a_corrupt_choices_file_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIFFINLM_CACHE", str(tmp_path))
    (tmp_path / "gemm_backends.json").write_text("{not json")
    choices = gb.Choices()
    assert choices.get("forward float32 M16 N8 K8") is None
    choices.put("forward float32 M16 N8 K8", "mkl")
    assert gb.Choices().get("forward float32 M16 N8 K8") == "mkl"


def test_a_backend_must_beat_mkl_by_the_margin():
    assert gb.fastest({"mkl": 1.0, "onednn": 0.97, "onednn_packed": 0.99}) == "mkl"
    assert gb.fastest({"mkl": 1.0, "onednn": 0.90, "onednn_packed": 0.80}) == "onednn_packed"
    assert gb.fastest({"mkl": 1.0, "onednn": 1.30}) == "mkl"
    assert gb.row_class(1) == 1 and gb.row_class(17) == 32 and gb.row_class(10 ** 6) == gb.MAX_ROW_CLASS


def test_unknown_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown GEMM backend 'cublas'"):
        with force("cublas"):
            pass
    monkeypatch.setenv("GRIFFINLM_GEMM", "fast")
    gb._env_backend.cache_clear()
    try:
        with pytest.raises(ValueError, match="unknown GEMM backend 'fast'"):
            linear(torch.randn(4, 8), torch.randn(3, 8))
    finally:
        monkeypatch.delenv("GRIFFINLM_GEMM")
        gb._env_backend.cache_clear()


def test_other_dtypes_and_subclasses_take_f_linear():
    class Sub(torch.Tensor):
        pass

    GEMM_CALLS.clear()
    x64, w64 = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(linear(x64, w64), F.linear(x64, w64))
    xs = torch.randn(5, 8).as_subclass(Sub)
    linear(xs, torch.randn(3, 8))
    with pytest.raises(RuntimeError):  # shape errors are F.linear's own
        linear(torch.randn(5, 7), torch.randn(3, 8))
    assert not GEMM_CALLS


@needs_onednn
def test_no_stale_packed_weight_after_optimizer_steps():
    """A model on prepacked weights trained 3 steps equals the same model on F.linear trained
    alongside: every optimizer step changes the weights in place, so the packed copies must
    be made again."""
    cfg = ModelConfig(vocab_size=64, width=64, depth=2, num_heads=2, lru_width=64, local_window=8,
                      block_pattern=("recurrent", "attention"))
    fast = LanguageModel(cfg)
    plain = copy.deepcopy(fast)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (fast, plain)]
    tokens = torch.randint(0, 64, (2, 24))
    GEMM_CALLS.clear()
    for _ in range(3):
        losses = []
        for model, opt, backend in ((fast, opts[0], "onednn_packed"), (plain, opts[1], "mkl")):
            with force(backend):
                loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[1])
    with torch.no_grad(), force("onednn_packed"):
        fast_out = fast(tokens)
    with torch.no_grad(), force("mkl"):
        assert rel_err(fast_out, plain(tokens)) < 1e-4
    assert GEMM_CALLS["forward:onednn_packed"] > 0 and GEMM_CALLS["forward:mkl"] > 0
    w = fast.blocks[0].temporal.linear_x.weight
    with torch.no_grad(), force("onednn_packed"):
        x = torch.randn(3, 64)
        before = linear(x, w)
        w.mul_(2.0)  # any in-place write
        assert rel_err(linear(x, w), 2 * before) < 1e-5


def test_linear_layer_is_an_nn_linear_with_the_same_state_dict():
    layer = Linear(16, 8)
    assert isinstance(layer, torch.nn.Linear)
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 16)
    assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)


@needs_bf16
def test_bf16_autocast_gemms_with_fp32_out_and_fp32_gradients():
    x, w, b = operands((2, 50, 96), 130, True, False)
    g = torch.randn(2, 50, 130)
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    GEMM_CALLS.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w, b)
        grads = torch.autograd.grad(y, (x, w, b), g)
    assert y.dtype == torch.float32 and all(t.dtype == torch.float32 for t in grads)
    # bf16 operands: 8 mantissa bits, fp32 accumulation
    assert rel_err(y, ref) < 2e-2
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 2e-2
    assert rel_err(grads[2], ref_grads[2]) < 1e-6  # the bias gradient is an fp32 sum
    assert GEMM_CALLS == {"forward:bf16": 1, "grad_input:bf16": 1, "grad_weight:bf16": 1}


@needs_bf16
def test_bf16_weight_copy_follows_weight_updates():
    w = torch.randn(130, 96)
    x = torch.randn(4, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = linear(x, w)
        w.mul_(-1.0)
        assert torch.equal(linear(x, w), -before)


@needs_onednn
def test_linear_many_stacks_projections_of_one_input_and_follows_weight_updates():
    from griffinlm.ops.linear import linear_many

    x = torch.randn(19, 96)
    layers = [(torch.randn(130, 96), torch.randn(130)), (torch.randn(33, 96), None), (torch.randn(64, 96), None)]
    GEMM_CALLS.clear()
    with torch.no_grad(), force("onednn_packed"):
        outs = linear_many(x, layers)
        assert GEMM_CALLS["forward_stacked:onednn_packed"] == 1
        for o, (w, b) in zip(outs, layers):
            assert rel_err(o, F.linear(x, w, b)) < 1e-5
        layers[1][0].mul_(3.0)  # one of the stacked weights changes in place: the stack is re-made
        assert rel_err(linear_many(x, layers)[1], F.linear(x, layers[1][0])) < 1e-5
    with torch.no_grad(), force("mkl"):  # separate products
        GEMM_CALLS.clear()
        assert rel_err(linear_many(x, layers)[2], F.linear(x, layers[2][0])) < 1e-5
        assert GEMM_CALLS == {"forward:mkl": 3}


@needs_onednn
def test_step_products_equal_f_linear_and_follow_in_place_updates():
    """The decoding step's resolved products: stacked (weights and biases as copies) or separate,
    column blocks equal to F.linear; an in-place update of a weight or a bias, or another forced
    backend, resolves again instead of reusing a stale copy."""
    from griffinlm.ops.linear import step_products

    torch.manual_seed(0)
    x = torch.randn(13, 96)
    ws = (torch.randn(64, 96), torch.randn(64, 96), torch.randn(32, 96))
    bs = (torch.randn(64), torch.randn(64), torch.randn(32))

    def check(call, ws, bs, stacked):
        blocks = call(x)
        for (out, col), w, b in zip(blocks, ws, bs):
            assert out.is_contiguous()
            assert rel_err(out[:, col:col + w.shape[0]], F.linear(x, w, b)) < 1e-5
        assert (len({id(out) for out, _ in blocks}) == 1) == stacked

    with torch.no_grad():
        with force("onednn_packed"):
            call = step_products(x, ws, bs)
            GEMM_CALLS.clear()
            check(call, ws, bs, stacked=True)
            assert GEMM_CALLS == {"forward_stacked:onednn_packed": 1}
            ws[1].mul_(-2.0)  # the packed stack would be stale
            check(call, ws, bs, stacked=True)
            bs[2].add_(5.0)  # so would the stacked bias
            check(call, ws, bs, stacked=True)
            mixed = (bs[0], None, bs[2])  # some layers without bias: separate products
            check(step_products(x, ws, mixed), ws, mixed, stacked=False)
            one = step_products(x, ws[:1], bs[:1])
            GEMM_CALLS.clear()
            check(one, ws[:1], bs[:1], stacked=True)
            assert GEMM_CALLS == {"forward:onednn_packed": 1}
            with force("mkl"):  # another override: resolved again, F.linear each
                GEMM_CALLS.clear()
                check(call, ws, bs, stacked=False)
                assert GEMM_CALLS == {"forward:mkl": 3}
    with pytest.raises(ValueError, match="2 weights but 1 biases"):
        step_products(x, ws[:2], bs[:1])
