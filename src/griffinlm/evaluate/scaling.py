"""Study 4, scaling: a sweep over model sizes and token budgets per architecture and seed, with
loss = a * FLOPs^(-b) + c fitted to each architecture's compute-efficient frontier per seed (the
paper, Section 3.1: all three follow a power law in training FLOPs, Griffin lowest).

Every claim is called from a 95% Student-t interval over seeds (`intervals`): the exponent b and
R^2 per architecture, and the between-architecture gaps at the largest budget paired by seed (runs
of one seed share the initialisation seed and the data order)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..train.data import open_run_data
from ..train.loop import evaluate
from .archs import ARCH_LABELS, ARCHS, matched_archs, training_flops_per_token
from .intervals import Interval, mean_interval, paired_interval, verdict
from .powerlaw import fit_power_law, pareto_frontier, power_law
from .report import md_table, pyplot, write_report
from .study import StudyContext, resolve_settings, settings_dict
from .training import run_key, study_settings, train_model

NAME = "scaling"


@dataclass(frozen=True)
class ScalingSettings:
    """widths: model sizes (depth fixed; heads of head_dim channels); steps: token budgets, each a
    separate run with its own cosine schedule (tokens = steps x batch_size x seq_len)."""

    archs: tuple[str, ...] = ARCHS
    widths: tuple[int, ...] = (32, 48, 64, 96)
    steps: tuple[int, ...] = (100, 300)
    depth: int = 3
    head_dim: int = 32
    local_window: int = 64
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_sequences: int | None = 64
    data: str = "stdlib"


BUDGETS = {
    "micro": ScalingSettings(widths=(16, 32), steps=(2, 4), head_dim=16, local_window=8, seq_len=16,
                             batch_size=2, eval_sequences=4, seeds=(0, 1)),
    "small": ScalingSettings(),
    "medium": ScalingSettings(widths=(64, 128, 192, 256), steps=(500, 1500, 4000), head_dim=64,
                              local_window=128, seq_len=256, batch_size=16, eval_sequences=None),
    "large": ScalingSettings(widths=(256, 512, 768, 1024), depth=12, steps=(2000, 6000, 20000), head_dim=128,
                             local_window=1024, seq_len=2048, batch_size=32, lr=1e-3, eval_sequences=None),
}


def run_scaling(ctx: StudyContext, budget: str = "small", overrides: dict[str, Any] | None = None) -> dict:
    """Runs (or completes, from the run cache) the study and writes scaling.md/.png/.json."""
    s = resolve_settings(BUDGETS, budget, overrides)
    # points[seed][arch]: one record per (width, steps), in sweep order
    points: dict[int, dict[str, list[dict]]] = {seed: {a: [] for a in s.archs} for seed in s.seeds}
    for seed in s.seeds:
        for width in s.widths:
            heads = max(1, width // s.head_dim)
            configs = matched_archs(s.archs, width, s.depth, heads, s.local_window)
            for steps in s.steps:
                spec = study_settings(steps, s.batch_size, s.lr, seed)
                for arch in s.archs:
                    cfg = configs[arch]
                    key = {"study": NAME, "arch": arch, "model": cfg.to_dict(), "train": run_key(spec),
                           "data": s.data, "seq_len": s.seq_len, "eval_sequences": s.eval_sequences}

                    def compute(cfg=cfg, spec=spec, arch=arch, width=width) -> dict:
                        ctx.log(f"{NAME}: {arch} width {width} seed {spec.seed}: {spec.steps} steps of "
                                f"{s.batch_size} x {s.seq_len}")
                        data = open_run_data(s.data, "byte", "text", s.seq_len, s.batch_size, spec.seed,
                                             verbose=False)
                        model, info = train_model(cfg, data.sampler.next_batch, spec, ctx.device)
                        held = evaluate(model, data.held_out(s.eval_sequences), ctx.device)
                        tokens = spec.steps * s.batch_size * s.seq_len
                        return {"width": width, "steps": spec.steps, "params": info["params"], "tokens": tokens,
                                "flops": training_flops_per_token(cfg, s.seq_len) * tokens,
                                "bits_per_byte": held["bits_per_byte"], "train_seconds": info["train_seconds"]}
                    name = f"{NAME}-{arch}-w{width}-s{steps}-seed{seed}"
                    points[seed][arch].append(ctx.cache.run(name, key, compute))
    fits = {seed: {a: fit_frontier(points[seed][a]) for a in s.archs} for seed in s.seeds}
    return _write(ctx, s, points, fits)


def fit_frontier(points: list[dict]) -> dict[str, Any]:
    """loss = a * FLOPs^(-b) + c fitted to the compute-efficient frontier of one architecture's runs
    of one seed (to all runs when the frontier has fewer than 3)."""
    f = [p["flops"] for p in points]
    y = [p["bits_per_byte"] for p in points]
    front = pareto_frontier(f, y)
    used = front if len(front) >= 3 else list(range(len(f)))
    return {**fit_power_law([f[i] for i in used], [y[i] for i in used]), "frontier": front, "used": used}


def _ci(iv: Interval) -> list[float]:
    return [iv.mean, iv.lo, iv.hi]


def _summaries(s: ScalingSettings, points: dict[int, dict[str, list[dict]]], fits: dict[int, dict[str, dict]],
               top: float) -> dict[str, Any]:
    """Intervals over seeds: per architecture b, R^2, c and the fitted loss at `top` FLOPs; the
    largest run's held-out loss; and the paired gaps (other minus Griffin) at the largest budget."""
    largest = [i for i, p in enumerate(points[s.seeds[0]][s.archs[0]])
               if p["width"] == max(s.widths) and p["steps"] == max(s.steps)][0]
    per_arch = {}
    for a in s.archs:
        per_arch[a] = {"b": _ci(mean_interval([fits[x][a]["b"] for x in s.seeds])),
                       "r2": _ci(mean_interval([fits[x][a]["r2"] for x in s.seeds])),
                       "c": _ci(mean_interval([fits[x][a]["c"] for x in s.seeds])),
                       "fit_at_top": _ci(mean_interval([float(power_law(top, fits[x][a])) for x in s.seeds])),
                       "largest_run": _ci(mean_interval([points[x][a][largest]["bits_per_byte"] for x in s.seeds]))}
    gaps = {}
    if "griffin" in s.archs:
        for a in s.archs:
            if a == "griffin":
                continue
            run = paired_interval([points[x][a][largest]["bits_per_byte"] for x in s.seeds],
                                  [points[x]["griffin"][largest]["bits_per_byte"] for x in s.seeds])
            fit = paired_interval([float(power_law(top, fits[x][a])) for x in s.seeds],
                                  [float(power_law(top, fits[x]["griffin"])) for x in s.seeds])
            gaps[a] = {"largest_run": _ci(run), "fit_at_top": _ci(fit), "verdict": verdict(run),
                       "fit_verdict": verdict(fit)}
    return {"per_arch": per_arch, "griffin_gaps": gaps, "largest_index": largest}


def _iv(v: list[float], digits: int = 4) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def _write(ctx: StudyContext, s: ScalingSettings, points: dict[int, dict[str, list[dict]]],
           fits: dict[int, dict[str, dict]]) -> dict:
    first = s.seeds[0]
    rows = []
    for arch in s.archs:
        for i, p in enumerate(points[first][arch]):
            bpb = [points[x][arch][i]["bits_per_byte"] for x in s.seeds]
            ci = mean_interval(bpb)
            rows.append([ARCH_LABELS[arch], p["width"], p["params"], p["steps"], p["tokens"], p["flops"],
                         ci.mean, ci.lo, ci.hi, sum(i in fits[x][arch]["frontier"] for x in s.seeds)])
    t1 = md_table(["model", "width", "params", "steps", "tokens", "training FLOPs", "held-out bits/byte (mean)",
                   "95% lo", "95% hi", "seeds on frontier"], rows, digits=4)
    top = max(p["flops"] for x in s.seeds for a in s.archs for p in points[x][a])
    summary = _summaries(s, points, fits, top)
    rows2 = [[ARCH_LABELS[a], seed, fits[seed][a]["a"], fits[seed][a]["b"], fits[seed][a]["c"], fits[seed][a]["r2"],
              fits[seed][a]["points"], float(power_law(top, fits[seed][a]))] for a in s.archs for seed in s.seeds]
    t2 = md_table(["model", "seed", "a", "b", "c", "R^2", "points fitted", f"fit at {top:.2e} FLOPs"], rows2, digits=4)
    rows3 = [[ARCH_LABELS[a], _iv(summary["per_arch"][a]["b"]), _iv(summary["per_arch"][a]["r2"]),
              _iv(summary["per_arch"][a]["c"]), _iv(summary["per_arch"][a]["fit_at_top"])] for a in s.archs]
    t3 = md_table(["model", "exponent b", "R^2", "c (bits/byte)", f"fit at {top:.2e} FLOPs"], rows3)
    plot_ok = _plot(ctx.out, s, points, fits, summary)
    intro = (f"Widths {list(s.widths)} at depth {s.depth} (parameters matched across architectures through the "
             f"MLP width), each trained for {list(s.steps)} steps of {s.batch_size} x {s.seq_len} tokens of "
             f"`{s.data}` (lr {s.lr}, cosine schedule per run), for seeds {list(s.seeds)} (the seed sets the "
             f"initialisation and the data order; runs of one seed are paired across architectures). Loss is "
             f"held-out bits per byte; FLOPs = 6 x (non-embedding + output-layer parameters) x tokens + attention "
             f"products. The fit loss = a * FLOPs^(-b) + c uses each architecture's compute-efficient frontier "
             f"per seed (all points when it has fewer than 3). Intervals: 95% Student-t over the {len(s.seeds)} "
             f"seeds (n - 1 degrees of freedom). A trivial baseline: a uniform guess over the 259-token byte "
             f"vocabulary costs log2(259) = 8.02 bits per token.")
    sections = [f"## Runs (mean over seeds with its 95% interval)\n\n{t1}",
                f"## Power-law fits, 95% intervals over seeds\n\n{t3}",
                f"## Power-law fits per seed\n\n{t2}"]
    data = {"settings": settings_dict(s), "points": {str(x): points[x] for x in s.seeds},
            "fits": {str(x): fits[x] for x in s.seeds}, "summary": summary, "top_flops": top}
    write_report(ctx.out, NAME, "Scaling", ctx.command, intro, sections, _verdicts(s, points, summary, top), data,
                 plot_ok)
    return data


def _verdicts(s: ScalingSettings, points: dict[int, dict[str, list[dict]]], summary: dict[str, Any],
              top: float) -> list[str]:
    out = []
    n = len(s.seeds)
    for a in s.archs:
        m = summary["per_arch"][a]
        b = Interval(*m["b"], n)
        out.append(f"{ARCH_LABELS[a]}: exponent b {_iv(m['b'], 3)}, R^2 {_iv(m['r2'], 3)} over {n} seeds. Paper: "
                   f"loss falls as a power law of compute (tested here as b > 0; R^2 describes the fit, and a few "
                   f"frontier points cannot tell a power law from other decreasing curves): **{verdict(b)}**.")
    largest = points[s.seeds[0]][s.archs[0]][summary["largest_index"]]
    for a, g in summary["griffin_gaps"].items():
        out.append(f"Largest budget (width {largest['width']}, {largest['steps']} steps): {ARCH_LABELS[a]} minus "
                   f"Griffin held-out bits/byte {_iv(g['largest_run'])} (paired over {n} seeds; fitted at "
                   f"{top:.2e} FLOPs: {_iv(g['fit_at_top'])}, {g['fit_verdict']}). Paper: Griffin lower: "
                   f"**{g['verdict']}**.")
    return out


def _plot(out: str, s: ScalingSettings, points: dict[int, dict[str, list[dict]]], fits: dict[int, dict[str, dict]],
          summary: dict[str, Any]) -> bool:
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [2, 1]})
    markers = "osd^v<>p*h"
    all_f = [p["flops"] for x in s.seeds for a in s.archs for p in points[x][a]]
    grid = np.geomspace(min(all_f), max(all_f), 100)
    for k, a in enumerate(s.archs):
        color = f"C{k}"
        for i, p in enumerate(points[s.seeds[0]][a]):
            vals = [points[x][a][i]["bits_per_byte"] for x in s.seeds]
            ci = mean_interval(vals)
            half = ci.hi - ci.mean if np.isfinite(ci.hi) else 0.0
            m = markers[s.widths.index(p["width"]) % len(markers)] if p["width"] in s.widths else "o"
            ax.errorbar(p["flops"], ci.mean, yerr=half, color=color, marker=m, ms=5, capsize=2, lw=1)
        curves = np.stack([power_law(grid, fits[x][a]) for x in s.seeds])
        ax.plot(grid, curves.mean(0), color=color, ls="--", lw=1.3,
                label=f"{ARCH_LABELS[a]}: b = {_iv(summary['per_arch'][a]['b'], 3)}")
        bx.errorbar([k], [summary["per_arch"][a]["b"][0]], color=color, marker="o", capsize=4,
                    yerr=[[summary["per_arch"][a]["b"][0] - summary["per_arch"][a]["b"][1]],
                          [summary["per_arch"][a]["b"][2] - summary["per_arch"][a]["b"][0]]]
                    if np.isfinite(summary["per_arch"][a]["b"][1]) else None)
        bx.plot([k] * len(s.seeds), [fits[x][a]["b"] for x in s.seeds], "k.", ms=4)
    for w, m in zip(s.widths, markers):
        ax.scatter([], [], color="gray", marker=m, label=f"width {w}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out bits per byte (mean over seeds, 95% t interval)")
    ax.set_title("Scaling: runs and the seed-mean of the per-seed power-law fits")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    bx.axhline(0, color="gray", lw=1)
    bx.set_xticks(range(len(s.archs)), [ARCH_LABELS[a].split(" (")[0] for a in s.archs])
    bx.set_ylabel("fitted exponent b (dots: seeds; bars: 95% t interval)")
    bx.set_title("Power-law exponent per seed")
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(f"{out}/{NAME}.png", dpi=120)
    plt.close(fig)
    return True
