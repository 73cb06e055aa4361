"""Writing a study's outputs: a Markdown report (tables, the plot, the command, the verdicts), the
PNG plot, and a JSON file of the same numbers for programs."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to `digits` decimals, ints with thousands separators, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}f}"
    return str(value)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned."""
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"table row has {len(r)} cells for {len(headers)} headers: {r}")

    def align(col: int) -> str:
        numeric = all(isinstance(r[col], (int, float)) and not isinstance(r[col], bool) for r in rows if r[col] is not None)
        return "---:" if rows and numeric else ":---"
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align(i) for i in range(len(headers))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in r) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend; a clear error without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the studies draw their plots with matplotlib: pip install 'griffinlm[train]'") from e
    return plt


def write_report(out_dir: str, name: str, title: str, command: str, intro: str, sections: Sequence[str],
                 verdicts: Sequence[str], data: dict[str, Any], plot_written: bool = True) -> str:
    """Writes `{out_dir}/{name}.md` (and `{name}.json` holding `data`); returns the Markdown path.

    sections: Markdown blocks (tables with their headings). verdicts: sentences comparing the
    miniature with the paper's claims, listed under their own heading."""
    os.makedirs(out_dir, exist_ok=True)
    parts = [f"# {title}", "", intro.strip(), "", f"Command:\n\n```\n{command}\n```", ""]
    if plot_written:
        parts += [f"![{name}]({name}.png)", ""]
    for block in sections:
        parts += [block.strip(), ""]
    parts += ["## Miniature vs paper", ""]
    parts += [f"- {v}" for v in verdicts]
    parts.append("")
    path = os.path.join(out_dir, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1, default=float)
    return path


def parse_md_tables(text: str) -> list[list[list[str]]]:
    """The tables of a Markdown document as lists of rows of cell strings (header row first, the
    alignment row dropped); used by tests and by anyone post-processing a report."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set(":-") and c for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables
