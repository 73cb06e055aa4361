"""The within-model extrapolation measure: truncated-context (sliding-window) scoring against a
direct computation, and a paired difference of 0 for a model that cannot see past the truncation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from griffinlm import LanguageModel, ModelConfig
from griffinlm.evaluate.extrapolation import _evaluate, bucket_edges
from griffinlm.evaluate.scoring import (chunked_token_nats, truncated_context_blocks, truncated_context_lengths,
                                        truncated_context_nats)

SMALL = dict(vocab_size=259, width=32, depth=2, num_heads=2, mlp_expansion=2.0)


def _model(arch: str, **overrides) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig.preset(f"{arch}-tiny", **{**SMALL, "local_window": 8, **overrides})).eval()


def test_truncated_blocks_tile_every_position_once():
    for length, context, stride in ((41, 8, 3), (40, 8, 8), (9, 8, 1), (64, 16, 2)):
        blocks = truncated_context_blocks(length, context, stride)
        covered = [t for first, stop, _ in blocks for t in range(first, stop)]
        assert covered == list(range(context, length - 1))
        lengths = truncated_context_lengths(length, context, stride)
        assert len(lengths) == length - 1
        assert lengths[:context] == list(range(1, context + 1))
        assert all(context - stride + 1 <= n <= context for n in lengths[context:])
    with pytest.raises(ValueError):
        truncated_context_blocks(20, 4, 5)


@pytest.mark.parametrize("arch,stride", [("transformer", 1), ("griffin", 3)])
def test_truncated_scoring_matches_direct_computation(arch, stride):
    """Each token scored from a fresh forward over exactly the context `truncated_context_lengths`
    says it sees (a new sequence at position 0)."""
    model = _model(arch)
    tokens = torch.randint(0, 256, (2, 30))
    context = 8
    got = truncated_context_nats(model, tokens, context, stride, batch_size=5)
    lengths = truncated_context_lengths(tokens.shape[1], context, stride)
    want = torch.empty_like(got)
    with torch.no_grad():
        for t, n in enumerate(lengths):
            logits = model(tokens[:, t + 1 - n:t + 1])
            want[:, t] = F.cross_entropy(logits[:, -1].float(), tokens[:, t + 1], reduction="none")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # below the context length the truncated scores are the full-context ones
    full = chunked_token_nats(model, tokens, context)
    torch.testing.assert_close(got[:, :context], full[:, :context])


def test_paired_difference_is_zero_without_context_beyond_the_truncation():
    """Two layers of local attention over 4 keys see at most 7 tokens back: truncating the context to
    16 - 4 + 1 = 13 or more tokens changes nothing, so truncated minus full is 0 in every bucket,
    while a global-attention Transformer's difference is not."""
    local = _model("transformer", block_pattern=("attention",), local_window=4)
    assert local.config.attention_keys <= 4
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, (2, 4 * 16 + 1))
    edges = bucket_edges(16, 4)
    ev = _evaluate(local, windows, chunk=16, stride=4, train_len=16, bytes_per_token=1.0, edges=edges, plot_bin=4)
    assert ev["diff_bucket_bpb"] == pytest.approx([0.0] * (len(edges) - 1), abs=1e-4)
    assert ev["full_bucket_bpb"][-1] > 1.0 and ev["trunc_bucket_bpb"] == pytest.approx(ev["full_bucket_bpb"], abs=1e-4)
    glob = _model("transformer")
    ev = _evaluate(glob, windows, chunk=16, stride=4, train_len=16, bytes_per_token=1.0, edges=edges, plot_bin=4)
    assert ev["diff_bucket_bpb"][0] == 0.0 and abs(ev["diff_bucket_bpb"][-1]) > 1e-3


def test_extrapolation_verdicts_use_the_margin():
    """Hawk/Griffin "no worse" within the margin; the Transformer "degrades" beyond it."""
    from griffinlm.evaluate.extrapolation import extrapolation_verdict
    from griffinlm.evaluate.intervals import Interval
    tiny_loss = Interval(-0.002, -0.004, -0.001, 3)  # worse by less than the margin: no worse
    assert extrapolation_verdict("hawk", tiny_loss, 0.01) == "agrees"
    assert extrapolation_verdict("transformer", tiny_loss, 0.01) == "disagrees"
    big_loss = Interval(-0.9, -1.2, -0.6, 3)
    assert extrapolation_verdict("griffin", big_loss, 0.01) == "disagrees"
    assert extrapolation_verdict("transformer", big_loss, 0.01) == "agrees"
    wide = Interval(-0.01, -0.05, 0.03, 3)
    assert extrapolation_verdict("hawk", wide, 0.01) == extrapolation_verdict("transformer", wide, 0.01) == "unresolved"
