"""Study 3, GLU variants (Shazeer 2020) in miniature: the same backbone, data and steps with each
feed-forward variant at equal parameter count (gated hidden = 2/3 of the ungated one), several
seeds, held-out bits per byte as mean and spread; plus Swish / SwiGLU with a learnable beta,
whose learned values are reported."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from ..config import GATED_ACTIVATIONS
from ..layers.activations import Swish
from ..train.data import open_run_data
from ..train.loop import evaluate
from .archs import ARCHS, arch_config, glu_variant_config
from .intervals import mean_interval, paired_interval, verdict
from .report import md_table, pyplot, write_report
from .study import StudyContext, resolve_settings, settings_dict
from .training import run_key, study_settings, train_model

NAME = "glu-variants"
LEARNED = "_learned"  # suffix of a variant whose Swish beta is a parameter
VARIANTS = ("relu", "gelu", "swish", "glu", "bilinear", "reglu", "geglu", "swiglu", "swish_learned",
            "swiglu_learned")
LABELS = {"relu": "FFN_ReLU", "gelu": "FFN_GELU", "swish": "FFN_Swish", "glu": "FFN_GLU",
          "bilinear": "FFN_Bilinear", "reglu": "FFN_ReGLU", "geglu": "FFN_GEGLU", "swiglu": "FFN_SwiGLU",
          "swish_learned": "FFN_Swish (learned beta)", "swiglu_learned": "FFN_SwiGLU (learned beta)"}
# Held-out log-perplexity after 65,536 steps in Shazeer (2020), Table 1 (recalled; lower is better).
PAPER_65K = {"relu": 1.997, "gelu": 1.983, "swish": 1.994, "glu": 1.982, "bilinear": 1.960, "reglu": 1.953,
             "geglu": 1.942, "swiglu": 1.944}
PAIRS = (("reglu", "relu"), ("geglu", "gelu"), ("swiglu", "swish"))


@dataclass(frozen=True)
class GluVariantsSettings:
    """arch: the backbone ("transformer" as in the paper, or "hawk" / "griffin"); ungated_expansion:
    the ungated FFN's hidden width in units of the model width (gated: 2/3 of it)."""

    arch: str = "transformer"
    variants: tuple[str, ...] = VARIANTS
    width: int = 64
    depth: int = 2
    num_heads: int = 1
    local_window: int = 64
    ungated_expansion: float = 4.0
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 250
    lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # five: a paired t interval at n = 3 is too wide to call most gaps
    eval_sequences: int = 64
    data: str = "stdlib"


BUDGETS = {
    "micro": GluVariantsSettings(width=32, depth=1, seq_len=16, batch_size=2, steps=2, seeds=(0, 1),
                                 eval_sequences=4),
    "small": GluVariantsSettings(),
    "medium": GluVariantsSettings(width=256, depth=4, num_heads=2, steps=3000, batch_size=16, lr=2e-3,
                                  seq_len=256, eval_sequences=None),
    "large": GluVariantsSettings(width=768, depth=12, num_heads=6, steps=20000, batch_size=32, lr=1e-3,
                                 seq_len=512, seeds=(0, 1, 2, 3, 4), eval_sequences=None),
}


def variant_config(s: GluVariantsSettings, variant: str):
    """The backbone with FFN_`variant` at the equal-parameter hidden width."""
    if s.arch not in ARCHS:
        raise ValueError(f"unknown backbone {s.arch!r}; expected one of {ARCHS}")
    activation = variant.removesuffix(LEARNED)
    base = arch_config(s.arch, s.width, s.depth, s.num_heads, s.local_window)
    return glu_variant_config(base, activation, s.ungated_expansion, learnable_beta=variant.endswith(LEARNED))


def learned_betas(model) -> list[float]:
    """The learnable Swish betas of a model, one per layer (empty if none)."""
    return [float(m.beta.detach()) for m in model.modules() if isinstance(m, Swish) and m.learnable]


def run_glu_variants(ctx: StudyContext, budget: str = "small", overrides: dict[str, Any] | None = None) -> dict:
    """Runs (or completes, from the run cache) the study and writes glu-variants.md/.png/.json."""
    s = resolve_settings(BUDGETS, budget, overrides)
    unknown = sorted(set(s.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected some of {VARIANTS}")
    results: dict[str, list[dict]] = {}
    for variant in s.variants:
        cfg = variant_config(s, variant)
        results[variant] = []
        for seed in s.seeds:
            spec = study_settings(s.steps, s.batch_size, s.lr, seed)
            key = {"study": NAME, "variant": variant, "model": cfg.to_dict(), "train": run_key(spec),
                   "data": s.data, "seq_len": s.seq_len, "eval_sequences": s.eval_sequences}

            def compute(cfg=cfg, spec=spec, variant=variant) -> dict:
                ctx.log(f"{NAME}: {variant} seed {spec.seed}: {s.steps} steps of {s.batch_size} x {s.seq_len}")
                data = open_run_data(s.data, "byte", "text", s.seq_len, s.batch_size, spec.seed, verbose=False)
                model, info = train_model(cfg, data.sampler.next_batch, spec, ctx.device)
                held = evaluate(model, data.held_out(s.eval_sequences), ctx.device)
                return {"params": info["params"], "mlp_hidden": cfg.mlp_hidden, "train_seconds": info["train_seconds"],
                        "bits_per_byte": held["bits_per_byte"], "betas": learned_betas(model)}
            results[variant].append(ctx.cache.run(f"{NAME}-{variant}-s{seed}", key, compute))
    return _write(ctx, s, results)


def _summary(runs: list[dict]) -> dict[str, float]:
    bpb = [r["bits_per_byte"] for r in runs]
    ci = mean_interval(bpb)
    return {"mean": ci.mean, "std": statistics.stdev(bpb) if len(bpb) > 1 else 0.0, "lo": ci.lo, "hi": ci.hi,
            "min": min(bpb), "max": max(bpb)}


def _write(ctx: StudyContext, s: GluVariantsSettings, results: dict[str, list[dict]]) -> dict:
    summary = {v: _summary(results[v]) for v in s.variants}
    rows = []
    for v in s.variants:
        runs, m = results[v], summary[v]
        rows.append([LABELS[v], "gated" if v.removesuffix(LEARNED) in GATED_ACTIVATIONS else "ungated",
                     runs[0]["mlp_hidden"], runs[0]["params"], m["mean"], m["lo"], m["hi"],
                     m["std"], m["min"], m["max"], PAPER_65K.get(v)])
    table = md_table(["FFN", "kind", "hidden", "params", "bits/byte mean", "95% lo", "95% hi", "std", "min", "max",
                      "paper log-ppl (65k steps)"], rows, digits=4)
    sections = [f"## Held-out bits per byte over seeds {list(s.seeds)}\n\n{table}"]
    beta_rows = []
    for v in s.variants:
        for seed, r in zip(s.seeds, results[v]):
            if r["betas"]:
                beta_rows.append([LABELS[v], seed, ", ".join(f"{b:.3f}" for b in r["betas"])])
    if beta_rows:
        sections.append("## Learned Swish betas (initialised to 1; one per layer)\n\n"
                        + md_table(["FFN", "seed", "beta per layer"], beta_rows))
    plot_ok = _plot(ctx.out, s, summary, results)
    intro = (f"Backbone: {s.arch}, width {s.width}, depth {s.depth}; ungated FFN hidden "
             f"{round(s.ungated_expansion * s.width)}, gated hidden 2/3 of that (equal parameters). Each variant "
             f"trained {s.steps} steps of {s.batch_size} x {s.seq_len} tokens of `{s.data}` (lr {s.lr}) for each "
             f"seed; bits per byte on {s.eval_sequences or 'all'} held-out sequences. The paper column is Shazeer "
             f"(2020)'s held-out log-perplexity of T5-base on C4 (recalled), for the ranking only.")
    data = {"settings": settings_dict(s), "summary": summary, "results": results}
    write_report(ctx.out, NAME, "GLU variants", ctx.command, intro, sections, _verdicts(s, summary, results), data,
                 plot_ok)
    return data


def _verdicts(s: GluVariantsSettings, summary: dict[str, dict], results: dict[str, list[dict]]) -> list[str]:
    out = []
    for gated, plain in PAIRS:
        if gated in summary and plain in summary:
            # Seeds are shared (same initialisation seed and data order), so compare seed by seed.
            gap = paired_interval([p["bits_per_byte"] for p in results[plain]],
                                  [g["bits_per_byte"] for g in results[gated]])
            out.append(f"{LABELS[gated]} {summary[gated]['mean']:.4f} vs {LABELS[plain]} {summary[plain]['mean']:.4f} "
                       f"bits/byte: the gated variant is better by {gap.mean:+.4f} (paired over {gap.n} seeds, 95% "
                       f"t interval [{gap.lo:+.4f}, {gap.hi:+.4f}]). Paper: gated better: **{verdict(gap)}**.")
    base = [v for v in s.variants if v in PAPER_65K]

    def bpb(v: str) -> list[float]:
        return [r["bits_per_byte"] for r in results[v]]

    if len(base) >= 3:
        ranked = sorted(base, key=lambda v: summary[v]["mean"])
        claim = [v for v in ("geglu", "swiglu") if v in base]
        others = [v for v in base if v not in claim]
        # the claim holds when each of GEGLU and SwiGLU beats every other variant, seed by seed
        gaps = [paired_interval(bpb(o), bpb(c)) for c in claim for o in others]
        if len(claim) == 2 and gaps and all(g.lo > 0 for g in gaps):
            call = "agrees"
        elif any(g.hi < 0 for g in gaps):
            call = "disagrees"
        else:
            call = "unresolved"
        closest = min(gaps, key=lambda g: g.lo) if gaps else None
        out.append(f"Best two of the paper's eight by mean: {LABELS[ranked[0]]}, {LABELS[ranked[1]]}. Paper: GEGLU "
                   f"and SwiGLU best: **{call}**" + (f" (the weakest of their paired gaps to the others: {closest})"
                                                     if closest else "") + ". Full ranking by mean (best first): "
                   + ", ".join(LABELS[v] for v in ranked) + ".")
        gated = [v for v in base if v in GATED_ACTIVATIONS]
        plain = [v for v in base if v not in GATED_ACTIVATIONS]
        if gated and plain:
            per_seed = [(statistics.fmean(x[i] for x in map(bpb, plain)) - statistics.fmean(x[i] for x in map(bpb, gated)))
                        for i in range(len(results[base[0]]))]
            gap = mean_interval(per_seed)
            out.append(f"Mean over gated variants {statistics.fmean(summary[v]['mean'] for v in gated):.4f} vs ungated "
                       f"{statistics.fmean(summary[v]['mean'] for v in plain):.4f} bits/byte (gated better by {gap}): "
                       f"gating helps on average: **{verdict(gap)}**.")
    for v in s.variants:
        if v.endswith(LEARNED):
            betas = [b for r in results[v] for b in r["betas"]]
            fixed = v.removesuffix(LEARNED)
            if betas:
                cmp = ""
                if fixed in summary:
                    cmp = (f"; {summary[v]['mean']:.4f} bits/byte vs {summary[fixed]['mean']:.4f} with beta "
                           f"fixed at 1")
                out.append(f"{LABELS[v]}: learned betas range {min(betas):.3f} to {max(betas):.3f} "
                           f"(mean {statistics.fmean(betas):.3f}, from 1.0){cmp}.")
    return out


def _plot(out: str, s: GluVariantsSettings, summary: dict[str, dict], results: dict[str, list[dict]]) -> bool:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(s.variants)), 4.5))
    xs = range(len(s.variants))
    colors = ["tab:orange" if v.removesuffix(LEARNED) in GATED_ACTIVATIONS else "tab:blue" for v in s.variants]
    # error bars: the 95% t intervals of the mean (none with a single seed)
    half = [summary[v]["hi"] - summary[v]["mean"] if math.isfinite(summary[v]["hi"]) else 0.0 for v in s.variants]
    ax.bar(xs, [summary[v]["mean"] for v in s.variants], yerr=half, color=colors, alpha=0.6, capsize=3)
    for i, v in enumerate(s.variants):
        ax.plot([i] * len(results[v]), [r["bits_per_byte"] for r in results[v]], "k.", ms=4)
    lo = min(summary[v]["min"] for v in s.variants)
    hi = max(summary[v]["max"] for v in s.variants)
    pad = max(hi - lo, 1e-3) * 0.3
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(list(xs), [LABELS[v].replace("FFN_", "").replace(" (learned beta)", "\n(learned β)")
                             for v in s.variants], fontsize=8)
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(f"GLU variants at equal parameters ({s.arch} backbone; blue ungated, orange gated; dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{out}/{NAME}.png", dpi=120)
    plt.close(fig)
    return True
