"""The compiled decode step captured as a CUDA graph (issue 20 item 7): the pool's tensors have
static addresses (`ModelCache` marks them on CUDA), so Inductor records no reason to skip
graphs ("mutated inputs" was the expected one). Needs a CUDA device and a C++/Triton toolchain;
skipped otherwise."""
from __future__ import annotations

import pytest
import torch

from griffinlm import LanguageModel, ModelConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SMALL = dict(width=64, depth=3, num_heads=4, local_window=8, vocab_size=97)


def pool_tensors(cache) -> list[torch.Tensor]:
    return [cache.positions, cache.doc_start, cache.all_slots] + [t for c in cache.blocks for t in c.tensors().values()]


def test_cpu_pool_is_left_unmarked():
    """Only CUDA pools are marked: the CPU decode path (numba kernels, eager) is unchanged."""
    model = LanguageModel(ModelConfig.preset("griffin-tiny", **SMALL)).eval()
    cache = model.init_cache(2, max_length=16)
    assert not any(hasattr(t, "_dynamo_static_input_type") for t in pool_tensors(cache))


@needs_cuda
def test_cuda_pool_tensors_have_static_addresses():
    model = LanguageModel(ModelConfig.preset("griffin-tiny", **SMALL)).cuda().eval()
    cache = model.init_cache(2, max_length=16)
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in pool_tensors(cache))
    part = cache.select([1, 0])  # a pool made from another is marked too
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in pool_tensors(part))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny"])
def test_compiled_step_is_a_cuda_graph(preset):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.preset(preset, **SMALL)).cuda().eval()
    compiled, eager = model.init_cache(2, max_length=32), model.init_cache(2, max_length=32)
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 5), device="cuda")
    counters.clear()
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
        model(prompt, cache=compiled)
        model(prompt, cache=eager)
        model.compile_decode_step(mode="reduce-overhead")
        try:
            for _ in range(4):  # warm-up, recording, then replays
                tok = torch.randint(0, SMALL["vocab_size"], (2,), device="cuda")
                got = model.step(tok, compiled).clone()
                model.compile_decode_step(False)
                want = model.step(tok, eager)
                model.compile_decode_step(mode="reduce-overhead")
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        finally:
            model.compile_decode_step(False)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert compiled.positions.tolist() == eager.positions.tolist() == [9, 9]
