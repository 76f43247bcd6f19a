"""Run outputs: summary.json, metrics.jsonl, a markdown table and PNG figures."""

from __future__ import annotations

import glob
import json
import math
import os
from collections import defaultdict

_FIXED = ("experiment", "mixer", "metric", "value")
#: fields that are not part of a row's identity when seeds are aggregated
_STAT = ("kind", "seed", "value", "mean", "std", "n_seeds", "ci95", "n_runs")
#: two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (beyond: 1.96 + ...)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def mean_std_ci(values) -> dict:
    """``{"mean", "std" (sample, ddof 1; 0 for one value), "n_seeds", "ci95" ([lo, hi] t-based, n >= 2)}``.

    None / non-finite values are left out (e.g. "steps to target" never reached); ``n_seeds`` counts
    the values used.
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n_seeds": 0}
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    out = {"mean": mean, "std": std, "n_seeds": n}
    if n > 1:
        h = t975(n - 1) * std / math.sqrt(n)
        out["ci95"] = [mean - h, mean + h]
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """One ``kind="aggregate"`` row per distinct (row without seed/value) over the ``kind="seed"`` rows:
    ``value`` = ``mean``, ``std``, ``n_seeds``, ``ci95`` (n >= 2), ``n_runs`` (seeds run)."""
    groups = {}
    for r in rows:
        if r.get("kind") != "seed":
            continue
        ident = {k: v for k, v in r.items() if k not in _STAT}
        groups.setdefault(json.dumps(ident, sort_keys=True, default=str), (ident, []))[1].append(r.get("value"))
    out = []
    for ident, vals in groups.values():
        st = mean_std_ci(vals)
        out.append({**ident, "kind": "aggregate", "value": st["mean"], **st, "n_runs": len(vals)})
    return out


def _pm(r: dict) -> str:
    if r.get("mean") is None:
        return "never"
    s = _fmt(r["mean"])
    if r.get("n_seeds", 1) > 1:
        s += f" ± {r['std']:.2g}"
    if r.get("n_runs", r.get("n_seeds", 1)) != r.get("n_seeds", 1):
        s += f" ({r['n_seeds']}/{r['n_runs']})"
    return s


def pivot_table(rows: list[dict], cell, skip=("lr", "hparams", "target")) -> str:
    """One line per (metric, config), one column per mixer; ``cell(row) -> str``."""
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    cfg_keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in _FIXED + _STAT + tuple(skip)]
    table = defaultdict(dict)
    for r in rows:
        key = (r["metric"],) + tuple(r.get(k, "") for k in cfg_keys)
        table[key][r["mixer"]] = cell(r)
    head = ["metric", *cfg_keys, *mixers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, vals in table.items():
        lines.append("| " + " | ".join([_fmt(x) for x in key] + [vals.get(m, "") for m in mixers]) + " |")
    return "\n".join(lines)


def summary_markdown(rows: list[dict], title: str) -> str:
    """The run's summary.md: mean ± std over seeds, chosen hyperparameters, the sweep (sensitivity)."""
    agg = [r for r in rows if r.get("kind") == "aggregate"]
    parts = [f"# {title}\n"]
    n = max((r.get("n_runs", 1) for r in agg), default=1)
    parts.append(f"Mean ± sample std over {n} seed(s) (`summary.json` holds every seed's value and the 95% t-interval).\n")
    parts.append(pivot_table(agg, _pm))
    chosen = [r for r in rows if r.get("kind") == "chosen"]
    if chosen:
        parts.append("\n## Chosen hyperparameters (best on the validation stream)\n")
        parts.append(pivot_table(chosen, lambda r: _fmt(r["value"])))
    sweep = [r for r in rows if r.get("kind") == "sweep"]
    if sweep:
        parts.append("\n## Sensitivity (validation stream, first seed): every mixer at every swept value\n")
        sw = [{**r, "metric": f"{r['metric']} @ {('lr=' + _fmt(r['lr'])) if 'lr' in r else r.get('hparams', '')}"} for r in sweep]
        parts.append(pivot_table(sw, lambda r: _fmt(r["value"])))
    return "\n".join(parts) + "\n"


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
    """Write ``summary.json`` and ``summary.md``; return the markdown.

    Rows with ``kind`` (the runner's): the markdown is ``summary_markdown``; plain rows: one table.
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if any("kind" in r for r in rows):
        md = summary_markdown(rows, title)
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(md)
        return md
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

    Several curves of one mixer in a group (seeds) are drawn as their mean with a band of
    ± one sample standard deviation.

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
        by_mixer = defaultdict(list)
        for c in cs:
            by_mixer[c["mixer"]].append(c)
        for mixer, ms in by_mixer.items():
            xs = ms[0]["x"]
            ys = [[float("nan") if v is None else v for v in m["y"]] for m in ms if len(m["y"]) == len(xs)]
            mean = [sum(col) / len(col) for col in zip(*ys)]
            (line,) = ax.plot(xs, mean, label=mixer + (f" ({len(ys)} seeds)" if len(ys) > 1 else ""), lw=1.2)
            if len(ys) > 1:
                sd = [math.sqrt(sum((v - m) ** 2 for v in col) / (len(col) - 1)) for col, m in zip(zip(*ys), mean)]
                lo = [m - d for m, d in zip(mean, sd)]
                if logy:
                    lo = [max(v, m * 0.05) for v, m in zip(lo, mean)]
                ax.fill_between(xs, lo, [m + d for m, d in zip(mean, sd)], color=line.get_color(), alpha=0.2, lw=0)
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


def plot_experiment(experiment: str, out_dir: str, curves: list[dict], rows: list[dict], eval_curves=()) -> list[str]:
    """An experiment's figures (``lla run`` writes them): its test curves, its aggregated rows where it
    has a sweep axis (ttr, mqar), the validation metric against training steps (``eval_curves``) and, for
    lm, validation bpb against wall-clock.  -> the PNG paths."""
    paths = []
    if experiment == "ttr":
        paths += plot_curves(out_dir, curves, ["dim", "seg_len", "shift"], "position", "MSE (log)", "ttr_mse",
                             boundaries_key="seg_len", logy=True)
        paths += plot_vs(out_dir, [r for r in rows if r.get("kind") == "aggregate" and r["metric"] == "mse"], "dim",
                         ["seg_len", "shift"], "d", "mean MSE (log)", "ttr_mse_vs_d", logx=True, logy=True)
    elif experiment == "icr":
        # the segment-aware least-squares oracle reaches ~1e-14: clip the axis to where the models are
        paths += plot_curves(out_dir, curves, ["seg_len"], "pair index", "MSE / d (log)", "icr_mse",
                             boundaries_key="seg_len", logy=True, ylim=(1e-2, None))
    elif experiment == "state":
        paths += plot_curves(out_dir, curves, ["group"], "length (position)", "accuracy", "state_accuracy")
    elif experiment == "mqar":
        agg = [r for r in rows if r.get("kind") == "aggregate" and r["metric"] == "accuracy"]
        agg = [{**r, "config": f"{r['seq_len']}/{r['num_kv']}"} for r in agg]
        paths += plot_vs(out_dir, agg, "config", ["positions"], "sequence length / kv pairs", "accuracy", "mqar_accuracy",
                         ylim=(-0.02, 1.02))
    elif experiment == "lm":
        paths += plot_curves(out_dir, curves, [], "position in the context (bytes)", "test loss (bits per byte)",
                             "lm_loss_by_position")
        paths += plot_lm_wallclock(out_dir, eval_curves)
    if eval_curves:
        paths += _plot_val_vs_steps(experiment, out_dir, eval_curves)
    return paths


def _plot_val_vs_steps(experiment: str, out_dir: str, eval_curves) -> list[str]:
    """The validation metric against training steps (mean over the task's settings of one run)."""
    ylabel, key = {"mqar": ("val accuracy (mean over eval configs)", "accuracy"), "state": ("val accuracy", "accuracy"),
                   "icr": ("val MSE / d (log)", "mse"), "lm": ("val bits per byte", "bpb")}[experiment]
    groups = [k for k in ("seg_len", "group") if any(k in c for c in eval_curves)]
    runs = defaultdict(list)
    for c in eval_curves:
        vals = [r["value"] for r in c["rows"] if r["metric"] == key and r.get("predictor", "model") == "model"]
        runs[(c["mixer"], c["seed"], *(c.get(g) for g in groups))].append((c["step"], sum(vals) / len(vals)))
    cs = []
    for (mixer, seed, *gv), pts in runs.items():
        pts = sorted(dict(pts).items())
        cs.append({"mixer": mixer, "seed": seed, **dict(zip(groups, gv)), "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
    return plot_curves(out_dir, cs, groups, "training step", ylabel, f"{experiment}_val_vs_steps",
                       logy=experiment == "icr", ylim=(-0.02, 1.02) if key == "accuracy" else None)


def plot_lm_wallclock(out_dir, eval_curves) -> list[str]:
    """Validation bpb against training wall-clock seconds: per mixer, the mean over seeds of both the
    seconds and the bpb at each evaluated step (runs without recorded seconds are left out)."""
    runs = defaultdict(dict)
    for c in eval_curves:
        if c.get("seconds") is None:
            continue
        vals = [r["value"] for r in c["rows"] if r["metric"] == "bpb"]
        runs[(c["mixer"], c["seed"])][c["step"]] = (c["seconds"], sum(vals) / len(vals))
    if not runs:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for mixer in dict.fromkeys(m for m, _ in runs):
        seeds = [pts for (m, _), pts in runs.items() if m == mixer]
        steps = sorted(set.intersection(*(set(p) for p in seeds)))
        xs = [sum(p[s][0] for p in seeds) / len(seeds) for s in steps]
        ys = [sum(p[s][1] for p in seeds) / len(seeds) for s in steps]
        ax.plot(xs, ys, marker="o", ms=2, lw=1.2, label=mixer + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""))
    ax.set_xlabel("training wall-clock (s; mean over seeds)")
    ax.set_ylabel("val bits per byte")
    ax.set_title("validation bpb vs training wall-clock")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "lm_val_vs_seconds.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_vs(out_dir, agg, xkey, group_keys, xlabel, ylabel, prefix, logx=False, logy=False, ylim=None):
    """One PNG per group: aggregated rows' mean against ``xkey``, one line per mixer, error bars = std."""
    plt = _plt()
    groups = defaultdict(list)
    for r in agg:
        groups[tuple(r.get(k) for k in group_keys)].append(r)
    paths = []
    for gkey, rs in groups.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for mixer in dict.fromkeys(r["mixer"] for r in rs):
            ms = [r for r in rs if r["mixer"] == mixer and r["mean"] is not None]
            ax.errorbar([r[xkey] for r in ms], [r["mean"] for r in ms], yerr=[r["std"] for r in ms], marker="o", ms=3,
                        capsize=2, label=mixer, lw=1.2)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel + " (mean ± std over seeds)")
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(group_keys, gkey)))
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = prefix + "".join(f"_{k}{v}" for k, v in zip(group_keys, gkey)) + ".png"
        path = os.path.join(out_dir, name.replace(" ", ""))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def lm_wallclock_table(run_dir: str, reference: str = "softmax") -> str:
    """Markdown: per mixer (at its chosen rate, mean ± std over seeds), the training wall-clock of the
    whole run, the final validation bpb, and the validation bpb at the ``reference`` mixer's training
    wall-clock of the same seed (linear interpolation on the run's (seconds, val bpb) evaluations;
    a mixer that finished sooner has no value there: "finished first").  Empty when ``run_dir`` holds
    no evaluations with seconds (``lla run lm``).  The seconds are as noisy as the machine was busy."""
    summary = os.path.join(run_dir, "summary.json")
    if not os.path.exists(summary):
        return ""
    with open(summary) as f:
        chosen = {r["mixer"]: r["value"] for r in json.load(f) if r.get("kind") == "chosen" and r["metric"] == "chosen_lr"}
    curves = defaultdict(dict)  # (mixer, seed) -> step -> (seconds, bpb)
    for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if r.get("kind") != "eval" or r.get("seconds") is None or r["mixer"] not in chosen or r["lr"] != chosen[r["mixer"]]:
            continue
        vals = [x["value"] for x in r["rows"] if x["metric"] == "bpb"]
        if vals:
            curves[(r["mixer"], r["seed"])][r["step"]] = (r["seconds"], sum(vals) / len(vals))
    if not curves:
        return ""

    def at(pts, t):
        """val bpb at training seconds ``t`` (None past the run's end)."""
        pts = sorted(pts.values())
        if t > pts[-1][0]:
            return None
        prev = (0.0, None)
        for sec, v in pts:
            if sec >= t:
                if prev[1] is None:
                    return v
                return prev[1] + (v - prev[1]) * (t - prev[0]) / (sec - prev[0])
            prev = (sec, v)
        return pts[-1][1]

    def pm(vals):
        st = mean_std_ci(vals)
        return _pm({**st, "n_runs": len(vals)}) if st["n_seeds"] else "finished first"

    mixers = list(dict.fromkeys(m for m, _ in curves))
    lines = [f"| mixer | training seconds | val bpb, last step | val bpb at {reference}'s training seconds |", "|---|---|---|---|"]
    for m in mixers:
        seeds = sorted(s for mm, s in curves if mm == m)
        secs = [max(curves[(m, s)].values())[0] for s in seeds]
        final = [curves[(m, s)][max(curves[(m, s)])][1] for s in seeds]
        same = []
        for s in seeds:
            ref = curves.get((reference, s))
            same.append(at(curves[(m, s)], max(ref.values())[0]) if ref else None)
        lines.append(f"| {m} | {pm(secs)} | {pm(final)} | {pm(same) if ref is not None else '?'} |")
    return "\n".join(lines)


_ORDER = ("ttr", "icr", "mqar", "state", "lm")


def _run_sort_key(name: str):
    base = name.split("-")[0]
    return (_ORDER.index(base) if base in _ORDER else len(_ORDER), name)


def results_page(results_dir: str = "results", out: str | None = None, max_figures: int = 8) -> str:
    """Write ``results_dir/README.md`` (or ``out``) from every ``results_dir/<run>/summary.json``.

    Per run folder: the command (``run.json``, else a ``COMMAND`` file), seeds, wall time, the table
    of mean ± std over seeds, the chosen hyperparameters, and its figures (the first ``max_figures``
    embedded, the others linked).  Summaries written before seeds were built in (rows without
    ``kind``) are shown as they are, marked as single runs.  Returns the page's path.
    """
    out = out or os.path.join(results_dir, "README.md")
    page_dir = os.path.dirname(os.path.abspath(out))
    runs = sorted((os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(results_dir, "*", "summary.json"))),
                  key=_run_sort_key)
    lines = ["# Results", "",
             "Generated by `lla report results` from every `results/<run>/summary.json`; do not edit by hand.",
             "Tables show the mean ± sample standard deviation over seeds (`summary.json` has every seed's value",
             "and the 95% t-interval); `(k/n)` marks a statistic over the k of n seeds that reached it.", ""]
    lines += ["| run | command | seeds | wall time |", "|---|---|---|---|"]
    body = []
    for name in runs:
        d = os.path.join(results_dir, name)
        with open(os.path.join(d, "summary.json")) as f:
            rows = json.load(f)
        meta = {}
        if os.path.exists(os.path.join(d, "run.json")):
            with open(os.path.join(d, "run.json")) as f:
                meta = json.load(f)
        cmd = meta.get("command")
        if not cmd and os.path.exists(os.path.join(d, "COMMAND")):
            cmd = open(os.path.join(d, "COMMAND")).read().strip().splitlines()[-1]
        seeds = meta.get("seeds")
        secs = meta.get("seconds")
        if secs is None:
            done = [r for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if r.get("kind") == "done"]
            secs = done[-1]["seconds"] if done else None
        wall = f"{secs / 60:.1f} min" if secs is not None else "?"
        if meta.get("train_seconds") is not None:  # a grid resumed from checkpoints: its trainings' own time
            wall += f"; training {meta['train_seconds'] / 60:.1f} min over {meta.get('trainings')} trainings"
        lines.append(f"| [{name}](#{name}) | `{cmd or '?'}` | {', '.join(map(str, seeds)) if seeds else '1 (legacy run)'} | {wall} |")
        body += ["", f"## {name}", "", f"Command: `{cmd or '?'}`" + (f" ({wall})" if secs is not None else ""), ""]
        data = meta.get("data")
        if data:  # what a language-modelling run was trained on
            sp = data.get("splits", {})
            body += [f"Data: `{data.get('corpus')}` (Python {data.get('python')}), {data.get('bytes')} bytes in "
                     f"{data.get('files')} file(s), SHA-256 `{data.get('sha256')}`; split {data.get('split')}: "
                     + ", ".join(f"{k} {v.get('bytes')} bytes" for k, v in sp.items()) + ".", ""]
        if any("kind" in r for r in rows):
            agg = [r for r in rows if r.get("kind") == "aggregate"]
            body.append(pivot_table(agg, _pm))
            if meta.get("lrs"):
                body += ["", f"Learning rates swept on seed {seeds[0]}: {', '.join(_fmt(x) for x in meta['lrs'])}."]
            chosen = [r for r in rows if r.get("kind") == "chosen"]
            if chosen:
                body += ["", "Chosen on the validation stream:", "", pivot_table(chosen, lambda r: _fmt(r["value"]))]
            if any(r.get("kind") == "sweep" for r in rows):
                body += ["", f"Sensitivity table (every mixer at every swept value): [{name}/summary.md]({name}/summary.md)."]
            wall_table = lm_wallclock_table(d)
            if wall_table:
                body += ["", "Equal steps vs equal training wall-clock (chosen rates; seconds measured on a shared machine):",
                         "", wall_table]
        else:
            body += ["Single run (written before seeds were built in):", "", markdown_table(rows)]
        figs = sorted(glob.glob(os.path.join(d, "*.png")))
        figs.sort(key=lambda p: ("_vs_" not in os.path.basename(p) and "accuracy" not in os.path.basename(p), p))
        rel = [os.path.relpath(p, page_dir) for p in figs]
        if rel:
            body.append("")
            body += [f"![{os.path.basename(p)}]({p})" for p in rel[:max_figures]]
            if len(rel) > max_figures:
                body += ["", "More figures: " + ", ".join(f"[{os.path.basename(p)}]({p})" for p in rel[max_figures:])]
    with open(out, "w") as f:
        f.write("\n".join(lines + body) + "\n")
    return out
