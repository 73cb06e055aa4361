"""Run records: metrics JSONL, optional TensorBoard, a tqdm progress bar, and the loss-curve PNG."""
from __future__ import annotations

import json
import os
import sys
from typing import Any


class MetricsLog:
    """Appends one JSON object per line to `path`; mirrors scalars to TensorBoard when available.

    On resume, `truncate_after(step)` drops records past the checkpoint, so the file reads as one
    uninterrupted run.
    """

    def __init__(self, path: str, tensorboard_dir: str | None = None):
        self.path = path
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(tensorboard_dir)
            except ImportError:  # TensorBoard is optional
                self._tb = None
        self._file = open(path, "a")

    def truncate_after(self, step: int) -> None:
        self._file.close()
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics JSONL file; a torn last line (killed run) is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def progress_bar(total: int, initial: int, enabled: bool, *, unit: str = "step", desc: str | None = None,
                 leave: bool = True):
    """A tqdm bar (over optimizer steps by default), or a no-op stand-in when disabled or tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, initial=initial, unit=unit, desc=desc, leave=leave, dynamic_ncols=True,
                        file=sys.stderr)
        except ImportError:
            print("tqdm is not installed (pip install 'griffinlm[train]'); no progress bar", file=sys.stderr)

    class _Silent:
        def update(self, n: int = 1) -> None: ...
        def set_postfix(self, *a, **k) -> None: ...
        def write(self, s: str) -> None: print(s, file=sys.stderr)
        def close(self) -> None: ...
    return _Silent()


def plot_loss_curve(metrics_path: str, png_path: str) -> str | None:
    """Train and held-out bits per byte against tokens seen. Returns the path, or None without
    matplotlib (the metrics JSONL has everything anyway)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'griffinlm[train]'); no loss curve", file=sys.stderr)
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        x, y = [r["tokens"] for r in train], [r["bits_per_byte"] for r in train]
        ax.plot(x, y, lw=0.6, alpha=0.35, color="C0", label="train (per step)")
        smooth, ema = [], y[0]
        for v in y:  # bias is negligible: the first value seeds the average
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(x, smooth, lw=1.5, color="C0", label="train (moving average)")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["bits_per_byte"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
