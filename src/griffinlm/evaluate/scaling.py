"""Study 4, scaling: a sweep over model sizes and token budgets per architecture, with
loss = a * FLOPs^(-b) + c fitted to each architecture's compute-efficient frontier (the paper,
Section 3.1: all three follow a power law in training FLOPs, Griffin lowest)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..train.data import open_run_data
from ..train.loop import evaluate
from .archs import ARCH_LABELS, ARCHS, matched_archs, training_flops_per_token
from .powerlaw import fit_power_law, pareto_frontier, power_law
from .intervals import one_run_verdict
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
    seed: int = 0
    eval_sequences: int | None = 64
    data: str = "stdlib"


BUDGETS = {
    "micro": ScalingSettings(widths=(16, 32), steps=(2, 4), head_dim=16, local_window=8, seq_len=16,
                             batch_size=2, eval_sequences=4),
    "small": ScalingSettings(),
    "medium": ScalingSettings(widths=(64, 128, 192, 256), steps=(500, 1500, 4000), head_dim=64,
                              local_window=128, seq_len=256, batch_size=16, eval_sequences=None),
    "large": ScalingSettings(widths=(256, 512, 768, 1024), depth=12, steps=(2000, 6000, 20000), head_dim=128,
                             local_window=1024, seq_len=2048, batch_size=32, lr=1e-3, eval_sequences=None),
}


def run_scaling(ctx: StudyContext, budget: str = "small", overrides: dict[str, Any] | None = None) -> dict:
    """Runs (or completes, from the run cache) the study and writes scaling.md/.png/.json."""
    s = resolve_settings(BUDGETS, budget, overrides)
    points: dict[str, list[dict]] = {a: [] for a in s.archs}
    for width in s.widths:
        heads = max(1, width // s.head_dim)
        configs = matched_archs(s.archs, width, s.depth, heads, s.local_window)
        for steps in s.steps:
            spec = study_settings(steps, s.batch_size, s.lr, s.seed)
            for arch in s.archs:
                cfg = configs[arch]
                key = {"study": NAME, "arch": arch, "model": cfg.to_dict(), "train": run_key(spec), "data": s.data,
                       "seq_len": s.seq_len, "eval_sequences": s.eval_sequences}

                def compute(cfg=cfg, spec=spec, arch=arch, width=width) -> dict:
                    ctx.log(f"{NAME}: {arch} width {width}: {spec.steps} steps of {s.batch_size} x {s.seq_len}")
                    data = open_run_data(s.data, "byte", "text", s.seq_len, s.batch_size, s.seed, verbose=False)
                    model, info = train_model(cfg, data.sampler.next_batch, spec, ctx.device)
                    held = evaluate(model, data.held_out(s.eval_sequences), ctx.device)
                    tokens = spec.steps * s.batch_size * s.seq_len
                    return {"width": width, "steps": spec.steps, "params": info["params"], "tokens": tokens,
                            "flops": training_flops_per_token(cfg, s.seq_len) * tokens,
                            "bits_per_byte": held["bits_per_byte"], "train_seconds": info["train_seconds"]}
                points[arch].append(ctx.cache.run(f"{NAME}-{arch}-w{width}-s{steps}", key, compute))
    fits = {}
    for arch in s.archs:
        f = [p["flops"] for p in points[arch]]
        y = [p["bits_per_byte"] for p in points[arch]]
        front = pareto_frontier(f, y)
        used = front if len(front) >= 3 else list(range(len(f)))
        fits[arch] = {**fit_power_law([f[i] for i in used], [y[i] for i in used]), "frontier": front, "used": used}
    return _write(ctx, s, points, fits)


def _write(ctx: StudyContext, s: ScalingSettings, points: dict[str, list[dict]], fits: dict[str, dict]) -> dict:
    rows = []
    for arch in s.archs:
        for i, p in enumerate(points[arch]):
            rows.append([ARCH_LABELS[arch], p["width"], p["params"], p["steps"], p["tokens"], p["flops"],
                         p["bits_per_byte"], i in fits[arch]["frontier"]])
    t1 = md_table(["model", "width", "params", "steps", "tokens", "training FLOPs", "held-out bits/byte",
                   "on frontier"], rows, digits=4)
    top = max(p["flops"] for a in s.archs for p in points[a])
    rows2 = [[ARCH_LABELS[a], fits[a]["a"], fits[a]["b"], fits[a]["c"], fits[a]["r2"], fits[a]["points"],
              float(power_law(top, fits[a]))] for a in s.archs]
    t2 = md_table(["model", "a", "b", "c", "R^2", "points fitted", f"fit at {top:.2e} FLOPs"], rows2, digits=4)
    plot_ok = _plot(ctx.out, s, points, fits)
    intro = (f"Widths {list(s.widths)} at depth {s.depth} (parameters matched across architectures through the "
             f"MLP width), each trained for {list(s.steps)} steps of {s.batch_size} x {s.seq_len} tokens of "
             f"`{s.data}` (lr {s.lr}, cosine schedule per run). Loss is held-out bits per byte; FLOPs = 6 x "
             f"(non-embedding + output-layer parameters) x tokens + attention products. The fit "
             f"loss = a * FLOPs^(-b) + c uses each architecture's compute-efficient frontier (all points when "
             f"it has fewer than 3).")
    sections = [f"## Runs\n\n{t1}", f"## Power-law fits\n\n{t2}"]
    data = {"settings": settings_dict(s), "points": points, "fits": fits}
    write_report(ctx.out, NAME, "Scaling", ctx.command, intro, sections, _verdicts(s, points, fits, top), data,
                 plot_ok)
    return data


def _verdicts(s: ScalingSettings, points: dict[str, list[dict]], fits: dict[str, dict], top: float) -> list[str]:
    out = []
    for a in s.archs:
        f = fits[a]
        ok = f["b"] > 0 and f["r2"] >= 0.9
        out.append(f"{ARCH_LABELS[a]}: loss = {f['a']:.3g} * FLOPs^(-{f['b']:.3f}) + {f['c']:.3f} "
                   f"(R^2 {f['r2']:.3f} on {f['points']} points): "
                   f"{'consistent with' if ok else 'not a clean'} power law (R^2 >= 0.9 taken as consistent). "
                   f"Paper: power law: {one_run_verdict(ok)}.")
    at_top = {a: float(power_law(top, fits[a])) for a in s.archs}
    best_run = {a: min(p["bits_per_byte"] for p in points[a]) for a in s.archs}
    lowest_fit = min(at_top, key=at_top.get)
    lowest_run = min(best_run, key=best_run.get)
    out.append(f"Lowest fitted loss at the largest budget ({top:.2e} FLOPs): {ARCH_LABELS[lowest_fit]} ("
               + ", ".join(f"{ARCH_LABELS[a]} {at_top[a]:.4f}" for a in s.archs) + "); lowest single run: "
               f"{ARCH_LABELS[lowest_run]} {best_run[lowest_run]:.4f}. Paper: Griffin lowest: "
               f"{one_run_verdict(lowest_fit == 'griffin')}.")
    return out


def _plot(out: str, s: ScalingSettings, points: dict[str, list[dict]], fits: dict[str, dict]) -> bool:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = "osd^v<>p*h"
    all_f = [p["flops"] for a in s.archs for p in points[a]]
    grid = np.geomspace(min(all_f), max(all_f), 100)
    for k, a in enumerate(s.archs):
        color = f"C{k}"
        for i, p in enumerate(points[a]):
            m = markers[s.widths.index(p["width"]) % len(markers)] if p["width"] in s.widths else "o"
            on = i in fits[a]["frontier"]
            ax.scatter(p["flops"], p["bits_per_byte"], color=color, marker=m, s=36 if on else 18,
                       alpha=1.0 if on else 0.45)
        f = fits[a]
        ax.plot(grid, power_law(grid, f), color=color, ls="--", lw=1.3,
                label=f"{ARCH_LABELS[a]}: {f['a']:.3g} C^-{f['b']:.3f} + {f['c']:.3f}")
    for w, m in zip(s.widths, markers):
        ax.scatter([], [], color="gray", marker=m, label=f"width {w}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("Scaling: points (large: on the frontier) and power-law fits")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/{NAME}.png", dpi=120)
    plt.close(fig)
    return True
