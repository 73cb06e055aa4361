"""Fitting loss = a * C^(-b) + c (C: training FLOPs) and picking the compute-efficient frontier."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def pareto_frontier(flops: Sequence[float], losses: Sequence[float]) -> list[int]:
    """Indices of the points no cheaper point beats: sorted by FLOPs, each has a lower loss than
    every point with fewer FLOPs (the compute-efficient frontier)."""
    order = sorted(range(len(flops)), key=lambda i: (flops[i], losses[i]))
    keep, best = [], math.inf
    for i in order:
        if losses[i] < best:
            keep.append(i)
            best = losses[i]
    return keep


def fit_power_law(flops: Sequence[float], losses: Sequence[float], grid: int = 400) -> dict[str, float]:
    """Least-squares fit of loss = a * flops^(-b) + c with b > 0 and 0 <= c < min(loss).

    For each c on a grid, log(loss - c) is linear in log(flops), which gives a and b in closed
    form; the c with the smallest squared error in loss space wins. Returns a, b, c, r2 (in loss
    space) and the number of points."""
    x = np.log(np.asarray(flops, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    if len(x) < 2:
        raise ValueError(f"a power-law fit needs at least 2 points, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("power-law fit: FLOPs and losses must be finite")
    best: dict[str, float] | None = None
    for c in np.linspace(0.0, y.min() * (1 - 1e-6), grid) if len(x) > 2 else [0.0]:
        slope, intercept = np.polyfit(x, np.log(y - c), 1)
        b = -slope
        if b <= 0:
            continue
        pred = np.exp(intercept - b * x) + c
        sse = float(((pred - y) ** 2).sum())
        if best is None or sse < best["sse"]:
            best = {"a": float(np.exp(intercept)), "b": float(b), "c": float(c), "sse": sse}
    if best is None:  # loss does not fall with compute: report a flat fit
        best = {"a": 0.0, "b": 0.0, "c": float(y.mean()), "sse": float(((y - y.mean()) ** 2).sum())}
    total = float(((y - y.mean()) ** 2).sum())
    best["r2"] = 1.0 - best["sse"] / total if total > 0 else 1.0
    best["points"] = len(x)
    return best


def power_law(flops: float | np.ndarray, fit: dict[str, float]) -> float | np.ndarray:
    """The fitted loss at `flops`."""
    return fit["a"] * np.power(flops, -fit["b"]) + fit["c"]
