"""Fused RMSNorm (ops/norm) against the float64 torch reference."""
import pytest
import torch

from griffinlm.ops import rms_norm, rms_norm_reference
from griffinlm.ops.norm import fusable
from harness import check_against_reference, needs_numba


@needs_numba
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (2, 67, 96), (130, 40)])
def test_rms_norm_matches_float64(unit_offset, shape):
    torch.manual_seed(1)
    x = 2 * torch.randn(shape) + 0.5
    w = 0.3 * torch.randn(shape[-1]) + (0.0 if unit_offset else 1.0)
    assert fusable(x, w)
    check_against_reference("rms_norm", lambda a, b: rms_norm(a, b, 1e-6, unit_offset),
                            lambda a, b: rms_norm_reference(a, b, 1e-6, unit_offset), [x, w])


def test_rms_norm_falls_back_outside_float32_cpu():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert not fusable(x, torch.ones(8))
    assert rms_norm(x, torch.ones(8)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not match"):
        rms_norm(torch.randn(2, 8), torch.ones(7))


@needs_numba
def test_rms_norm_accepts_non_contiguous_inputs_and_leaves_parameters_resizable():
    torch.manual_seed(2)
    x = torch.randn(6, 16, 10).transpose(0, 1)  # (16, 6, 10), non-contiguous
    w = torch.nn.Parameter(torch.randn(10))
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w, 1e-6, False))
    w.untyped_storage().resize_(0)  # what FSDP does to an unsharded parameter after use
