"""Study 1, length extrapolation: train at T_train, then score the same held-out tokens of windows
up to 16 x T_train long twice within each model: with the full context (the whole window before the
token) and with the context truncated to the training length (sliding-window scoring: at most the
last T_train tokens). The paired difference, truncated minus full in bits per byte, per position
bucket, isolates what the context beyond T_train does to the model (positive: the longer context
helps; negative: it hurts), free of the content differences between positions. It is averaged over
the windows per model, and its 95% Student-t interval taken over the training seeds (`intervals`).

The paper's claim (De et al. 2024, Section 6): Hawk and Griffin extrapolate to sequences much longer
than they were trained on, the Transformer does not. Full-context scoring goes through the model in
chunks of T_train via the cache (`model(chunk, cache=cache)`), so memory stays bounded.
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
from .intervals import Interval, mean_interval, noninferiority_verdict, verdict
from .report import md_table, pyplot, write_report
from .scoring import chunked_token_nats, truncated_context_nats
from .study import StudyContext, resolve_settings, settings_dict
from .training import run_key, study_settings, train_model

LN2 = math.log(2.0)
NAME = "extrapolation"


@dataclass(frozen=True)
class ExtrapolationSettings:
    """train_len: T_train (tokens); max_factor: longest evaluation length in units of T_train;
    eval_windows: held-out windows of max_factor * T_train tokens; chunk: tokens per cached forward
    (0: T_train); trunc_stride: positions scored per truncated-context forward, so a truncated
    context holds T_train - trunc_stride + 1 to T_train tokens (0: T_train / 8); plot_bin: positions
    per point of the plot (0: T_train / 4); seeds: training seeds (initialisation and data order);
    margin: bits per byte by which the full context may be worse than the truncated one and still
    count as "no worse" (the recurrent models' claim; the Transformer's "degrades" needs the whole
    interval below -margin)."""

    archs: tuple[str, ...] = ARCHS
    width: int = 128
    depth: int = 3
    num_heads: int = 2
    local_window: int = 128
    train_len: int = 256
    batch_size: int = 8
    steps: int = 300
    lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    max_factor: int = 16
    eval_windows: int = 12
    chunk: int = 0
    trunc_stride: int = 0
    plot_bin: int = 0
    margin: float = 0.01
    data: str = "stdlib"


BUDGETS = {
    "micro": ExtrapolationSettings(width=32, depth=3, num_heads=2, local_window=8, train_len=16, batch_size=4,
                                   steps=4, max_factor=4, eval_windows=2, seeds=(0, 1)),
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


def _evaluate(model, windows: np.ndarray, chunk: int, stride: int, train_len: int, bytes_per_token: float,
              edges: list[int], plot_bin: int) -> dict[str, Any]:
    """Full- and truncated-context bits per byte of the same tokens, per bucket and plot bin (means
    over windows and positions), and their difference (truncated minus full) per window and bucket."""
    full, trunc = [], []
    for w in windows:  # one window at a time: the global cache is max_factor * T_train long
        x = torch.from_numpy(w[None])
        f = chunked_token_nats(model, x, chunk)
        full.append(f[0].cpu().numpy())
        trunc.append(truncated_context_nats(model, x, train_len, stride, full=f)[0].cpu().numpy())
    to_bpb = 1.0 / LN2 / bytes_per_token
    full_b, trunc_b = np.stack(full) * to_bpb, np.stack(trunc) * to_bpb  # (N, L): index t scores token t + 1
    diff = trunc_b - full_b
    L = diff.shape[1]

    def buckets(a: np.ndarray) -> list[float]:
        return [float(a[:, lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])]
    return {"full_bucket_bpb": buckets(full_b), "trunc_bucket_bpb": buckets(trunc_b), "diff_bucket_bpb": buckets(diff),
            "diff_beyond_bpb": float(diff[:, train_len:].mean()),
            "diff_window_bucket_bpb": [[float(d[lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])] for d in diff],
            "full_bin_bpb": [float(full_b[:, p:p + plot_bin].mean()) for p in range(0, L, plot_bin)],
            "diff_bin_bpb": [float(diff[:, p:p + plot_bin].mean()) for p in range(0, L, plot_bin)],
            "windows": len(windows)}


def run_extrapolation(ctx: StudyContext, budget: str = "small", overrides: dict[str, Any] | None = None) -> dict:
    """Runs (or completes, from the run cache) the study and writes extrapolation.md/.png/.json."""
    s = resolve_settings(BUDGETS, budget, overrides)
    T = s.train_len
    max_len = s.max_factor * T
    chunk = s.chunk or T
    stride = s.trunc_stride or max(1, T // 8)
    plot_bin = s.plot_bin or max(1, T // 4)
    edges = bucket_edges(T, s.max_factor)
    tok = load_tokenizer("byte")
    corpus = open_corpus(s.data, tok)
    windows = long_windows(corpus.val, max_len, s.eval_windows)
    ctx.log(f"{NAME}: {len(windows)} held-out windows of {max_len} tokens; T_train {T}")
    configs = matched_archs(s.archs, s.width, s.depth, s.num_heads, s.local_window)
    results: dict[str, list[dict]] = {a: [] for a in s.archs}
    for seed in s.seeds:
        spec = study_settings(s.steps, s.batch_size, s.lr, seed)
        for arch in s.archs:
            cfg = configs[arch]
            key = {"study": NAME, "arch": arch, "model": cfg.to_dict(), "train": run_key(spec), "data": s.data,
                   "train_len": T, "eval": {"max_len": max_len, "windows": s.eval_windows, "chunk": chunk,
                                            "edges": edges, "plot_bin": plot_bin, "trunc_stride": stride}}

            def compute(cfg=cfg, arch=arch, spec=spec) -> dict:
                ctx.log(f"{NAME}: training {arch} seed {spec.seed} ({s.steps} steps of {s.batch_size} x {T} tokens)")
                data = open_run_data(s.data, "byte", "text", T, s.batch_size, spec.seed, verbose=False)
                model, info = train_model(cfg, data.sampler.next_batch, spec, ctx.device, log=ctx.log)
                ctx.log(f"{NAME}: scoring {arch} at {max_len} tokens, full and truncated to {T}")
                ev = _evaluate(model, windows, chunk, stride, T, corpus.val.bytes_per_text_token, edges, plot_bin)
                return {"params": info["params"], "train_seconds": info["train_seconds"],
                        "train_loss": info["train_loss"], **ev}
            results[arch].append(ctx.cache.run(f"{NAME}-{arch}-seed{seed}", key, compute))
    return _write(ctx, s, results, edges, plot_bin, stride, len(windows))


def _extrapolates(arch: str) -> bool:
    """The paper's claim: Hawk and Griffin extrapolate (the context beyond T_train does not hurt),
    the Transformer does not (it hurts)."""
    return arch != "transformer"


def extrapolation_verdict(arch: str, diff: Interval, margin: float) -> str:
    """The verdict on the paper's claim from the interval of truncated minus full-context bits per
    byte: for Hawk and Griffin "no worse with the full context" (the interval above -margin); for
    the Transformer "worse with the full context" (the interval below -margin)."""
    call = noninferiority_verdict(diff, margin)
    if _extrapolates(arch):
        return call
    return {"agrees": "disagrees", "disagrees": "agrees"}.get(call, call)


def _iv(iv: Interval, digits: int = 3) -> str:
    return f"{iv.mean:+.{digits}f} [{iv.lo:+.{digits}f}, {iv.hi:+.{digits}f}]"


def _write(ctx: StudyContext, s: ExtrapolationSettings, results: dict[str, list[dict]], edges: list[int],
           plot_bin: int, stride: int, n_windows: int) -> dict:
    T = s.train_len
    names = [f"[{a}, {b})" for a, b in zip(edges[:-1], edges[1:])]
    beyond = list(range(1, len(names)))  # buckets past T_train (the first one is identical by construction)
    diffs = {a: [mean_interval([r["diff_bucket_bpb"][k] for r in results[a]]) for k in range(len(names))]
             for a in s.archs}
    pooled = {a: mean_interval([r["diff_beyond_bpb"] for r in results[a]]) for a in s.archs}
    rows = [[ARCH_LABELS[a], results[a][0]["params"], *[_iv(diffs[a][k]) for k in beyond], _iv(pooled[a]),
             extrapolation_verdict(a, diffs[a][-1], s.margin)] for a in s.archs]
    t1 = md_table(["model", "params", *names[1:], f"all positions >= {T}", "verdict (last bucket)"], rows)
    per_seed = [[ARCH_LABELS[a], seed, *[r["diff_bucket_bpb"][k] for k in beyond], r["diff_beyond_bpb"],
                 r["train_loss"]] for a in s.archs for seed, r in zip(s.seeds, results[a])]
    t2 = md_table(["model", "seed", *names[1:], f">= {T}", "train loss (nats/token)"], per_seed, digits=4)
    full = [[ARCH_LABELS[a], *[mean_interval([r["full_bucket_bpb"][k] for r in results[a]]).mean
                               for k in range(len(names))],
             *[mean_interval([r["trunc_bucket_bpb"][k] for r in results[a]]).mean for k in beyond]]
            for a in s.archs]
    t3 = md_table(["model", *[f"full {n}" for n in names], *[f"truncated {names[k]}" for k in beyond]], full)
    plot_ok = _plot(ctx.out, s, results, plot_bin)
    intro = (f"The same held-out tokens scored twice within each model: with the full context (every token of the "
             f"window before it) and with the context truncated to the training length T_train = {T} "
             f"(sliding-window scoring: each block of {stride} positions is scored by a fresh forward over the "
             f"{T} tokens ending at the block, so a token sees {T - stride + 1} to {T} tokens). Positions below "
             f"T_train see the same context both ways, so their difference is 0 by construction. Windows: "
             f"{n_windows} held-out windows of {edges[-1]:,} tokens ({s.max_factor}x T_train), the same for every "
             f"model. Models: width {s.width}, depth {s.depth}, {s.num_heads} heads, Griffin local window "
             f"{s.local_window}, parameters matched through the MLP width; trained {s.steps} steps of "
             f"{s.batch_size} x {T} tokens of `{s.data}` for each seed of {list(s.seeds)}. The measure is truncated "
             f"minus full-context bits per byte (positive: the context beyond T_train helps; negative: it hurts), "
             f"averaged over the windows per model; intervals are 95% Student-t over the {len(s.seeds)} seeds "
             f"(n - 1 degrees of freedom). The baseline of no effect is 0. Verdicts: a model \"extrapolates\" (the "
             f"paper's claim for Hawk and Griffin) when the whole interval lies above -{s.margin} bits/byte (the full "
             f"context no worse than the truncated one, within that margin), and \"degrades\" (its claim for the "
             f"Transformer) when the whole interval lies below -{s.margin}; otherwise unresolved.")
    sections = [f"## Truncated minus full-context bits per byte by position bucket (tokens), 95% intervals\n\n{t1}",
                f"## Per seed (bits per byte)\n\n{t2}",
                "## Bits per byte by position bucket, mean over seeds (confounded)\n\nThese absolute values "
                "compare different tokens at different positions (every window starts at a document's start), so "
                "position is confounded with content; only the paired difference above is a measurement of "
                f"extrapolation.\n\n{t3}"]
    summary = {a: {"bucket_diff": [[iv.mean, iv.lo, iv.hi] for iv in diffs[a]],
                   "beyond_diff": [pooled[a].mean, pooled[a].lo, pooled[a].hi],
                   "verdict": extrapolation_verdict(a, diffs[a][-1], s.margin),
                   "full_better": verdict(diffs[a][-1])} for a in s.archs}
    data = {"settings": settings_dict(s), "edges": edges, "trunc_stride": stride, "summary": summary,
            "results": results}
    write_report(ctx.out, NAME, "Length extrapolation", ctx.command, intro, sections,
                 _verdicts(s, diffs, pooled, names), data, plot_ok)
    return data


def _verdicts(s: ExtrapolationSettings, diffs: dict[str, list[Interval]], pooled: dict[str, Interval],
              names: list[str]) -> list[str]:
    out = []
    for a in s.archs:
        far = diffs[a][-1]
        if _extrapolates(a):
            paper = (f"extrapolates: the context beyond T_train does not hurt (tested as: the interval lies above "
                     f"-{s.margin} bits/byte)")
            strict = {"agrees": "the full context is better", "disagrees": "the full context is worse",
                      "unresolved": "the sign of the difference is unresolved"}[verdict(far)]
            extra = f"; strictly, {strict} (interval vs 0)"
        else:
            paper = (f"does not extrapolate: the context beyond T_train hurts (tested as: the interval lies below "
                     f"-{s.margin} bits/byte)")
            extra = ""
        out.append(f"{ARCH_LABELS[a]}: truncated minus full context at positions {names[-1]} {_iv(far)} bits/byte "
                   f"(all positions beyond T_train: {_iv(pooled[a])}){extra}. The paper says it {paper}: "
                   f"**{extrapolation_verdict(a, far, s.margin)}**.")
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


def _plot(out: str, s: ExtrapolationSettings, results: dict[str, list[dict]], plot_bin: int) -> bool:
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for k, a in enumerate(s.archs):
        color = f"C{k}"
        curves = [_log_groups(r["diff_bin_bpb"], plot_bin) for r in results[a]]
        x = np.asarray(curves[0][0])
        keep = x >= s.train_len  # below T_train the two scorings are identical
        ivs = [mean_interval([c[1][i] for c in curves]) for i in range(len(x))]
        mean = np.asarray([iv.mean for iv in ivs])
        lo = np.asarray([iv.lo if math.isfinite(iv.lo) else iv.mean for iv in ivs])
        hi = np.asarray([iv.hi if math.isfinite(iv.hi) else iv.mean for iv in ivs])
        ax.plot(x[keep], mean[keep], marker=".", lw=1.2, color=color, label=ARCH_LABELS[a])
        ax.fill_between(x[keep], lo[keep], hi[keep], color=color, alpha=0.2)
        full = [_log_groups(r["full_bin_bpb"], plot_bin) for r in results[a]]
        bx.plot(full[0][0], np.mean([f[1] for f in full], axis=0), marker=".", lw=1.0, color=color,
                label=f"{ARCH_LABELS[a]} ({results[a][0]['params']:,} params)")
    ax.axhline(0, color="gray", lw=1)
    ax.set_title(f"Truncated (to {s.train_len}) minus full-context bits/byte, same tokens\n"
                 f"mean over seeds {list(s.seeds)} with 95% t band; > 0: the long context helps")
    ax.set_ylabel("bits per byte")
    bx.set_title("Full-context bits/byte by position, mean over seeds\n(confounded: different tokens at each position)")
    for p in (ax, bx):
        p.axvline(s.train_len, color="gray", ls="--", lw=1)
        p.set_xscale("log", base=2)
        p.set_xlabel("position in the evaluation window (tokens)")
        p.grid(alpha=0.3)
        p.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}/{NAME}.png", dpi=120)
    plt.close(fig)
    return True
