"""Study 1, length extrapolation: train at T_train, evaluate bits per byte by position up to
16 x T_train on held-out documents, for the Transformer (global attention with RoPE), Hawk and Griffin.

The paper's claim (De et al. 2024, Section 6): Hawk and Griffin extrapolate to sequences much longer
than they were trained on, the Transformer does not. Each evaluation window goes through the model
in chunks of T_train via the cache (`model(chunk, cache=cache)`), so memory stays bounded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import TokenSplit, load_tokenizer, open_corpus
from ..train.data import open_run_data
from .archs import ARCH_LABELS, ARCHS, matched_archs
from .intervals import one_run_verdict
from .report import md_table, pyplot, write_report
from .scoring import chunked_token_nats
from .study import StudyContext, resolve_settings, settings_dict
from .training import run_key, study_settings, train_model

LN2 = math.log(2.0)
NAME = "extrapolation"


@dataclass(frozen=True)
class ExtrapolationSettings:
    """train_len: T_train; max_factor: longest evaluation length in units of T_train;
    eval_windows: held-out windows of max_factor * T_train tokens; chunk: tokens per cached forward
    (0: T_train); plot_bin: positions per point of the plot (0: T_train / 4)."""

    archs: tuple[str, ...] = ARCHS
    width: int = 128
    depth: int = 3
    num_heads: int = 2
    local_window: int = 128
    train_len: int = 256
    batch_size: int = 8
    steps: int = 300
    lr: float = 3e-3
    seed: int = 0
    max_factor: int = 16
    eval_windows: int = 12
    chunk: int = 0
    plot_bin: int = 0
    data: str = "stdlib"


BUDGETS = {
    "micro": ExtrapolationSettings(width=32, depth=3, num_heads=2, local_window=8, train_len=16, batch_size=4,
                                   steps=4, max_factor=4, eval_windows=2),
    "small": ExtrapolationSettings(),
    "medium": ExtrapolationSettings(width=256, depth=6, num_heads=4, steps=2000, batch_size=16),
    "large": ExtrapolationSettings(width=512, depth=12, num_heads=4, local_window=512, train_len=1024,
                                   steps=10000, batch_size=32, lr=1e-3, eval_windows=32),
}


def long_windows(split: TokenSplit, length: int, max_windows: int) -> np.ndarray:
    """Up to `max_windows` non-overlapping windows of `length` + 1 tokens, each inside one document
    (the first window of a document starts at its BOS; the EOS is never a target), taken round-robin
    over documents so they come from as many documents as possible. Returns (N, length + 1) int64."""
    starts = np.asarray(split.doc_starts, dtype=np.int64)
    ends = np.append(starts[1:], len(split.tokens)) - 1  # drop each document's EOS
    per_doc = [list(range(s, e - length, length + 1)) for s, e in zip(starts, ends)]
    picked: list[int] = []
    depth = 0
    while len(picked) < max_windows and any(depth < len(p) for p in per_doc):
        picked += [p[depth] for p in per_doc if depth < len(p)][:max_windows - len(picked)]
        depth += 1
    if not picked:
        longest = int((ends - starts).max()) if len(starts) else 0
        raise ValueError(f"no held-out document has {length + 1} tokens (the longest has {longest}); "
                         f"use a smaller train_len or max_factor, or data with longer documents")
    return np.stack([np.asarray(split.tokens[p:p + length + 1], dtype=np.int64) for p in picked])


def bucket_edges(train_len: int, max_factor: int) -> list[int]:
    """[0, T, 2T, 4T, ..., max_factor * T] (max_factor rounded down to a power of two)."""
    edges, f = [0, train_len], 2
    while f <= max_factor:
        edges.append(f * train_len)
        f *= 2
    return edges


def _evaluate(model, windows: np.ndarray, chunk: int, bytes_per_token: float, edges: list[int],
              plot_bin: int) -> dict[str, Any]:
    nats = []
    for w in windows:  # one window at a time: the global cache is max_factor * T_train long
        nats.append(chunked_token_nats(model, torch.from_numpy(w[None]), chunk)[0].cpu().numpy())
    nats = np.stack(nats)  # (N, L): nats[:, t] scores the token at position t + 1 given t + 1 tokens
    to_bpb = 1.0 / LN2 / bytes_per_token
    buckets = [float(nats[:, a:b].mean() * to_bpb) for a, b in zip(edges[:-1], edges[1:])]
    cumulative = [float(nats[:, :b].mean() * to_bpb) for b in edges[1:]]
    L = nats.shape[1]
    bins = [float(nats[:, s:s + plot_bin].mean() * to_bpb) for s in range(0, L, plot_bin)]
    return {"bucket_bpb": buckets, "cumulative_bpb": cumulative, "bin_bpb": bins, "windows": len(windows)}


def run_extrapolation(ctx: StudyContext, budget: str = "small", overrides: dict[str, Any] | None = None) -> dict:
    """Runs (or completes, from the run cache) the study and writes extrapolation.md/.png/.json."""
    s = resolve_settings(BUDGETS, budget, overrides)
    T = s.train_len
    max_len = s.max_factor * T
    chunk = s.chunk or T
    plot_bin = s.plot_bin or max(1, T // 4)
    edges = bucket_edges(T, s.max_factor)
    tok = load_tokenizer("byte")
    corpus = open_corpus(s.data, tok)
    windows = long_windows(corpus.val, max_len, s.eval_windows)
    ctx.log(f"{NAME}: {len(windows)} held-out windows of {max_len} tokens; T_train {T}")
    configs = matched_archs(s.archs, s.width, s.depth, s.num_heads, s.local_window)
    spec = study_settings(s.steps, s.batch_size, s.lr, s.seed)
    results: dict[str, dict] = {}
    for arch in s.archs:
        cfg = configs[arch]
        key = {"study": NAME, "arch": arch, "model": cfg.to_dict(), "train": run_key(spec), "data": s.data,
               "train_len": T, "eval": {"max_len": max_len, "windows": s.eval_windows, "chunk": chunk,
                                        "edges": edges, "plot_bin": plot_bin}}

        def compute(cfg=cfg, arch=arch) -> dict:
            ctx.log(f"{NAME}: training {arch} ({s.steps} steps of {s.batch_size} x {T} tokens)")
            data = open_run_data(s.data, "byte", "text", T, s.batch_size, s.seed, verbose=False)
            model, info = train_model(cfg, data.sampler.next_batch, spec, ctx.device, log=ctx.log)
            ctx.log(f"{NAME}: evaluating {arch} at {max_len} tokens in chunks of {chunk}")
            ev = _evaluate(model, windows, chunk, corpus.val.bytes_per_text_token, edges, plot_bin)
            return {"params": info["params"], "train_seconds": info["train_seconds"],
                    "train_loss": info["train_loss"], **ev}
        results[arch] = ctx.cache.run(f"{NAME}-{arch}", key, compute)
    return _write(ctx, s, results, edges, plot_bin, len(windows))


def _write(ctx: StudyContext, s: ExtrapolationSettings, results: dict[str, dict], edges: list[int],
           plot_bin: int, n_windows: int) -> dict:
    T = s.train_len
    bucket_names = [f"[{a}, {b})" for a, b in zip(edges[:-1], edges[1:])]
    rows = [[ARCH_LABELS[a], results[a]["params"], *results[a]["bucket_bpb"]] for a in s.archs]
    table1 = md_table(["model", "params", *bucket_names], rows)
    lengths = [f"{b // T}x ({b})" for b in edges[1:]]
    rows2 = [[ARCH_LABELS[a], *results[a]["cumulative_bpb"]] for a in s.archs]
    table2 = md_table(["model", *lengths], rows2)
    plot_ok = _plot(ctx.out, s, results, plot_bin)
    verdicts = _verdicts(s, results)
    intro = (f"Bits per byte on {n_windows} held-out windows of {edges[-1]:,} tokens ({s.max_factor}x the "
             f"training length T_train = {T}), by position within the window. Models: width {s.width}, depth "
             f"{s.depth}, {s.num_heads} heads, Griffin local window {s.local_window}, parameters matched "
             f"through the MLP width; trained {s.steps} steps of {s.batch_size} x {T} tokens of `{s.data}` "
             f"(seed {s.seed}). Evaluation runs through the cache in chunks of {s.chunk or T} tokens.")
    sections = [f"## Bits per byte by position bucket (tokens)\n\n{table1}",
                f"## Mean bits per byte over the first L tokens (evaluation length L)\n\n{table2}"]
    data = {"settings": settings_dict(s), "edges": edges, "results": results}
    write_report(ctx.out, NAME, "Length extrapolation", ctx.command, intro, sections, verdicts, data, plot_ok)
    return data


def _verdicts(s: ExtrapolationSettings, results: dict[str, dict]) -> list[str]:
    out = []
    far = f"[{s.max_factor // 2 * s.train_len}, {s.max_factor * s.train_len})" if s.max_factor >= 2 else "last bucket"
    for a in s.archs:
        b = results[a]["bucket_bpb"]
        change = (b[-1] - b[0]) / b[0] * 100
        holds = change <= 2.0
        paper = "does not extrapolate" if a == "transformer" else "extrapolates"
        agree = holds == (a != "transformer")
        out.append(f"{ARCH_LABELS[a]}: bits/byte {b[0]:.3f} within T_train, {b[-1]:.3f} at positions {far} "
                   f"({change:+.1f}%): it {'extrapolates' if holds else 'degrades'} beyond its training "
                   f"length. The paper says it {paper}: {one_run_verdict(agree)}.")
    return out


def _log_groups(bins: list[float], width: int, per_octave: int = 4) -> tuple[list[float], list[float]]:
    """Equal-width position bins merged into groups a quarter octave wide (bins hold equal token
    counts, so a group's value is the plain mean): the far positions are otherwise too noisy to read."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for i, v in enumerate(bins):
        centre = (i + 0.5) * width
        groups.setdefault(int(math.floor(math.log2(centre) * per_octave)), []).append((centre, v))
    x = [float(np.mean([c for c, _ in g])) for _, g in sorted(groups.items())]
    y = [float(np.mean([v for _, v in g])) for _, g in sorted(groups.items())]
    return x, y


def _plot(out: str, s: ExtrapolationSettings, results: dict[str, dict], plot_bin: int) -> bool:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for a in s.archs:
        x, y = _log_groups(results[a]["bin_bpb"], plot_bin)
        ax.plot(x, y, marker=".", lw=1.2, label=f"{ARCH_LABELS[a]} ({results[a]['params']:,} params)")
    ax.axvline(s.train_len, color="gray", ls="--", lw=1)
    ax.text(s.train_len, ax.get_ylim()[0], " T_train", va="bottom", color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the evaluation window (tokens)")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"Length extrapolation: trained at {s.train_len}, evaluated to {s.max_factor * s.train_len}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}/{NAME}.png", dpi=120)
    plt.close(fig)
    return True
