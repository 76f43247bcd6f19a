"""Run outputs: summary.json, metrics.jsonl, a markdown table and PNG figures."""

from __future__ import annotations

import json
import os
from collections import defaultdict

_FIXED = ("experiment", "mixer", "metric", "value")


class JsonlLogger:
    """Appends one JSON object per call to ``path`` (no-op when ``path`` is None, e.g. rank > 0)."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def __call__(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """One line per (metric, config), one column per mixer."""
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    cfg_keys = list(dict.fromkeys(k for r in rows for k in r if k not in _FIXED))
    table = defaultdict(dict)
    for r in rows:
        key = (r["metric"],) + tuple(r.get(k, "") for k in cfg_keys)
        table[key][r["mixer"]] = r["value"]
    head = ["metric", *cfg_keys, *mixers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, vals in table.items():
        lines.append("| " + " | ".join([_fmt(x) for x in key] + [_fmt(vals.get(m, "")) for m in mixers]) + " |")
    return "\n".join(lines)


def write_summary(out_dir: str, rows: list[dict], title: str) -> str:
    """Write ``summary.json`` and ``summary.md``; return the markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    md = markdown_table(rows)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(f"# {title}\n\n{md}\n")
    return md


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(out_dir: str, curves: list[dict], group_keys, xlabel: str, ylabel: str, prefix: str,
                boundaries_key: str | None = None, logy: bool = False, ylim=None) -> list[str]:
    """One PNG per group (distinct values of ``group_keys``), one line per mixer.

    ``curves``: records with ``mixer``, ``x``, ``y`` and the group keys; ``boundaries_key`` names a
    key holding the segment length, drawn as dotted vertical lines; ``ylim`` = (bottom, top), either
    None to leave it automatic.
    """
    plt = _plt()
    groups = defaultdict(list)
    for c in curves:
        groups[tuple(c.get(k) for k in group_keys)].append(c)
    paths = []
    for gkey, cs in groups.items():
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for c in cs:
            ax.plot(c["x"], c["y"], label=c["mixer"], lw=1.2)
        if boundaries_key is not None:
            seg = cs[0][boundaries_key]
            xmax = max(cs[0]["x"])
            for b in range(seg, xmax + 1, seg):
                ax.axvline(b, color="grey", ls=":", lw=0.8)
        if logy:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(group_keys, gkey)))
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = prefix + "_" + "_".join(f"{k}{v}" for k, v in zip(group_keys, gkey)) + ".png"
        path = os.path.join(out_dir, name.replace(" ", ""))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
