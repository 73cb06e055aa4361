"""Sequential reference for the diagonal linear recurrence h_t = a_t * h_{t-1} + x_t.

This is the ground truth every fast scan is tested against: a plain loop over time, so
it is obviously correct. Run it in float64 for tests; it is far too slow for training.
"""
from __future__ import annotations

import torch


def linear_scan_reference(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over time computing h_t = a_t * h_{t-1} + x_t.

    Args:
        a: (B, T, D) decay per step.
        x: (B, T, D) input per step.
        h0: optional (B, D) state before step 0 (zeros if None).

    Returns:
        h: (B, T, D) all states, in the promoted dtype of the inputs (at least float32).
        h_last: (B, D) the state after the last step.
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, x.dtype), torch.float32)
    B, T, D = x.shape
    h = torch.zeros(B, D, dtype=dtype, device=x.device) if h0 is None else h0.to(dtype)
    out = []
    for t in range(T):
        h = a[:, t].to(dtype) * h + x[:, t].to(dtype)
        out.append(h)
    hs = torch.stack(out, dim=1) if out else x.new_zeros(B, 0, D, dtype=dtype)
    return hs, h
