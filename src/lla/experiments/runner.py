"""``lla run EXPERIMENT`` and ``lla demo``: run, then write summary.json, metrics.jsonl, summary.md, PNGs."""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import replace

import torch

from lla.experiments.mixers import MIXERS

from . import report
from .model import CausalModel, ModelConfig
from .presets import DEFAULT_MIXERS, EXPERIMENTS, get_preset
from .tasks import ttr
from .train import TrainConfig, dist_info, setup_distributed, train


def _check_mixers(experiment: str, mixers) -> list[str]:
    allowed = ttr.TTR_MIXERS if experiment == "ttr" else MIXERS
    # the defaults name every mixer the experiment compares; those not registered here are skipped
    mixers = list(mixers) if mixers else [m for m in DEFAULT_MIXERS[experiment] if m in allowed]
    bad = [m for m in mixers if m not in allowed]
    if bad:
        raise ValueError(f"mixers {bad} not available for {experiment}; choose from {sorted(allowed)}")
    return mixers


def _trained_runs(experiment: str, cfg: dict):
    """Yield ``(run_key, task)`` for every task setting of a trained experiment."""
    if experiment == "mqar":
        from .tasks.mqar import MQARTask

        yield {}, MQARTask(cfg)
    elif experiment == "icr":
        from .tasks.icr import ICRTask

        for seg_len in cfg["seg_lens"]:
            yield {"seg_len": seg_len}, ICRTask(cfg, seg_len)
    elif experiment == "state":
        from .tasks.state import StateTask

        for group in cfg["groups"]:
            yield {"group": group}, StateTask(cfg, group)
    elif experiment == "lm":
        from .tasks.lm import LMTask

        yield {}, LMTask(cfg)


def _mixer_kwargs(cfg: dict, mixer: str) -> dict:
    """``{"mixer_kwargs": ...}`` for ``ModelConfig`` when the config sets options of this mixer
    (``cfg["mixer_kwargs"][mixer]``, e.g. the sliding window's ``window``), else nothing."""
    kw = (cfg.get("mixer_kwargs") or {}).get(mixer)
    return {"mixer_kwargs": dict(kw)} if kw else {}


#: how a trained experiment's validation rows pick the best learning rate: (metric, "max" | "min")
SELECT = {"mqar": ("accuracy", "max"), "icr": ("mse", "min"), "state": ("accuracy", "max"), "lm": ("bpb", "min")}


def _score(experiment: str, vrows: list[dict]) -> float:
    """The selection metric averaged over the task's validation rows (model rows only)."""
    metric, mode = SELECT[experiment]
    vals = [r["value"] for r in vrows if r["metric"] == metric and r.get("predictor", "model") == "model"]
    v = sum(vals) / len(vals)
    if not math.isfinite(v):
        return -math.inf
    return v if mode == "max" else -v


def _steps_to_target(curve: list[dict], target: dict) -> list[dict]:
    """For every validation row of ``target["metric"]``: the first logged step whose value is at least
    ``target["at_least"]`` (None when never reached)."""
    first = {}
    for rec in curve:  # in step order
        for r in rec["rows"]:
            if r["metric"] != target["metric"] or r.get("predictor", "model") != "model":
                continue
            k = tuple((a, b) for a, b in r.items() if a not in ("metric", "value"))
            first.setdefault(k, None)
            if first[k] is None and r["value"] >= target["at_least"]:
                first[k] = rec["step"]
    return [{**dict(k), "metric": "steps_to_target", "target": target["at_least"], "value": v} for k, v in first.items()]


def _run_trained(experiment, cfg, mixers, out_dir, log, device, progress, stop_after, context_parallel=1,
                 seeds=(0,), lrs=None, restart=False, eval_log=None, train_seconds=None):
    """Train every (task setting, mixer): a learning-rate sweep on ``seeds[0]`` (validation streams)
    when ``lrs`` has several values, then every seed at the mixer's best rate (test streams).

    Returns ``(rows, curves, eval_curves)``; rows carry ``kind`` (``sweep`` | ``chosen`` | ``seed``).
    """
    rows, curves, eval_curves = [], [], []
    base = TrainConfig(**cfg["train"])
    lrs = list(lrs) if lrs else [base.lr]
    target = cfg.get("target")
    eval_every = int(cfg.get("eval_every", 0)) if context_parallel == 1 else 0
    seen = eval_log if eval_log is not None else {}  # (name, seed, lr) -> [{"step", "rows"}], from earlier invocations too
    finished = True
    written = set()  # checkpoints of this invocation (``restart`` applies to older ones only)

    def one(task, key, mixer, seed, lr):
        """Train one run (or resume it); returns its ``last`` dict and model, or None when interrupted."""
        nonlocal finished
        tcfg = replace(base, seed=seed, lr=lr)
        name = "_".join([experiment, mixer] + [f"{k}{v}" for k, v in key.items()])
        torch.manual_seed(tcfg.seed)  # same initial weights on every rank
        mcfg = ModelConfig(mixer=mixer, **cfg["model"], **task.model_kwargs(), **_mixer_kwargs(cfg, mixer))
        model = CausalModel(mcfg)
        ck = os.path.join(out_dir, f"seed{seed}", "ckpt", f"{name}_lr{lr:g}.pt") if out_dir else None
        ident = (name, seed, lr)

        def on_eval(m, step, seconds=None):
            vrows, _ = task.evaluate(m, device, seed, split="val")
            runs = seen.setdefault(ident, [])
            runs[:] = [r for r in runs if r["step"] != step]  # a resumed run re-evaluates the steps it re-runs
            runs.append({"step": step, "rows": vrows, "seconds": seconds})
            runs.sort(key=lambda r: r["step"])
            log({"kind": "eval", "run": name, "mixer": mixer, **key, "seed": seed, "lr": lr, "step": step, "seconds": seconds,
                 "rows": vrows})

        t0 = time.time()
        last = train(model, task, tcfg, device=device, log=log, desc=f"{name} seed{seed} lr{lr:g}", progress=progress,
                     stop_after=stop_after, context_parallel=context_parallel, restart=restart and ck not in written,
                     eval_fn=on_eval if eval_every else None, eval_every=eval_every,
                     meta={"model": mcfg.to_dict(), "task": cfg, **(task.meta() if hasattr(task, "meta") else {})}, ckpt_path=ck)
        written.add(ck)
        if stop_after is not None and last["step"] < tcfg.steps:
            finished = False
            return None  # interrupted on purpose: evaluate when resumed
        n_params = sum(p.numel() for p in model.parameters())
        if train_seconds is not None:  # each training once (the best rate's first seed is the sweep's run)
            train_seconds[(name, seed, lr)] = last.get("train_seconds")
        log({"kind": "run", "run": name, "mixer": mixer, **key, "seed": seed, "lr": lr, "seconds": time.time() - t0,
             "train_seconds": last.get("train_seconds"),
             "params": n_params, "final_loss": last["loss"], "model": mcfg.to_dict(), "train": tcfg.to_dict()})
        return last, model, name, ident

    for key, task in _trained_runs(experiment, cfg):
        for mixer in mixers:
            best = lrs[0]
            if len(lrs) > 1:
                scores = {}
                for lr in lrs:
                    res = one(task, key, mixer, seeds[0], lr)
                    if res is None:
                        continue
                    vrows, _ = task.evaluate(res[1], device, seeds[0], split="val")
                    scores[lr] = _score(experiment, vrows)
                    metric, mode = SELECT[experiment]
                    rows.append({"experiment": experiment, "mixer": mixer, **key, "kind": "sweep", "seed": seeds[0], "lr": lr,
                                 "metric": f"val_{metric}", "value": scores[lr] if mode == "max" else -scores[lr]})
                if len(scores) < len(lrs):
                    continue
                best = max(lrs, key=lambda lr: scores[lr])  # ties: the first (smallest) rate
            rows.append({"experiment": experiment, "mixer": mixer, **key, "kind": "chosen", "metric": "chosen_lr", "value": best})
            for seed in seeds:
                res = one(task, key, mixer, seed, best)
                if res is None:
                    continue
                last, model, name, ident = res
                erows, ecurves = task.evaluate(model, device, seed)
                tag = {"kind": "seed", "seed": seed, "lr": best}
                for r in erows:
                    r = {"experiment": experiment, "mixer": mixer, **key, **tag, **r}
                    if "predictor" in r:  # ICR: classical baselines are rows of their own, named by predictor
                        pred = r.pop("predictor")
                        if pred != "model":
                            if mixer != mixers[0]:
                                continue
                            r["mixer"], r["lr"] = pred, None
                    rows.append(r)
                rows.append({"experiment": experiment, "mixer": mixer, **key, **tag, "metric": "final_train_loss", "value": last["loss"]})
                if target and seen.get(ident):
                    for r in _steps_to_target(seen[ident], target):
                        rows.append({"experiment": experiment, "mixer": mixer, **key, **tag, **r})
                for rec in seen.get(ident, []):
                    eval_curves.append({"mixer": mixer, **key, "seed": seed, "step": rec["step"], "rows": rec["rows"],
                                        "seconds": rec.get("seconds")})
                for c in ecurves:
                    pred = c.pop("predictor", "model")
                    if pred != "model" and mixer != mixers[0]:
                        continue
                    curves.append({**key, **c, "mixer": mixer if pred == "model" else pred, "seed": seed})
                    log({"kind": "curve", "run": name, **curves[-1]})  # the figures' data, to redraw or tabulate
    return rows, curves, eval_curves, finished


def _plots(experiment, out_dir, curves, rows, eval_curves=()):
    paths = []
    if experiment == "ttr":
        paths += report.plot_curves(out_dir, curves, ["dim", "seg_len", "shift"], "position", "MSE (log)", "ttr_mse",
                                    boundaries_key="seg_len", logy=True)
        paths += _plot_vs(out_dir, [r for r in rows if r.get("kind") == "aggregate" and r["metric"] == "mse"], "dim",
                          ["seg_len", "shift"], "d", "mean MSE (log)", "ttr_mse_vs_d", logx=True, logy=True)
    elif experiment == "icr":
        # the segment-aware least-squares oracle reaches ~1e-14: clip the axis to where the models are
        paths += report.plot_curves(out_dir, curves, ["seg_len"], "pair index", "MSE / d (log)", "icr_mse",
                                    boundaries_key="seg_len", logy=True, ylim=(1e-2, None))
    elif experiment == "state":
        paths += report.plot_curves(out_dir, curves, ["group"], "length (position)", "accuracy", "state_accuracy")
    elif experiment == "mqar":
        agg = [r for r in rows if r.get("kind") == "aggregate" and r["metric"] == "accuracy"]
        agg = [{**r, "config": f"{r['seq_len']}/{r['num_kv']}"} for r in agg]
        paths += _plot_vs(out_dir, agg, "config", ["positions"], "sequence length / kv pairs", "accuracy", "mqar_accuracy", ylim=(-0.02, 1.02))
    elif experiment == "lm":
        paths += report.plot_curves(out_dir, curves, [], "position in the context (bytes)", "test loss (bits per byte)",
                                    "lm_loss_by_position")
        paths += _plot_lm_wallclock(out_dir, eval_curves)
    if eval_curves:  # validation metric against training steps (mean over the task's settings of one run)
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
        paths += report.plot_curves(out_dir, cs, groups, "training step", ylabel, f"{experiment}_val_vs_steps",
                                    logy=experiment == "icr", ylim=(-0.02, 1.02) if key == "accuracy" else None)
    return paths


def _plot_lm_wallclock(out_dir, eval_curves) -> list[str]:
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
    plt = report._plt()
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


def _plot_vs(out_dir, agg, xkey, group_keys, xlabel, ylabel, prefix, logx=False, logy=False, ylim=None):
    """One PNG per group: aggregated rows' mean against ``xkey``, one line per mixer, error bars = std."""
    plt = report._plt()
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


def _data_record(experiment: str, cfg: dict) -> dict | None:
    """The corpus record of a language-modelling run (path, split, sizes, SHA-256s, Python version)."""
    if experiment != "lm":
        return None
    from .tasks.lm import load_corpus

    return load_corpus(cfg.get("corpus"), cfg["context"] + 1)["record"]


def _load_evals(path: str) -> dict:
    """Validation curves already logged in ``metrics.jsonl`` (a resumed run reuses them), latest per step."""
    seen = defaultdict(dict)
    for rec in report.read_jsonl(path):
        if rec.get("kind") == "eval":
            seen[(rec["run"], rec["seed"], rec["lr"])][rec["step"]] = {"step": rec["step"], "rows": rec["rows"],
                                                                       "seconds": rec.get("seconds")}
    return {k: [v[s] for s in sorted(v)] for k, v in seen.items()}


def run_experiment(experiment: str, preset: str = "quick", mixers=None, out_dir: str | None = None,
                   progress: bool = True, stop_after: int | None = None, cfg: dict | None = None,
                   context_parallel: int = 1, seeds=None, lrs=None, restart: bool = False,
                   command: str | None = None, resume: bool = False) -> list[dict]:
    """Run one experiment over seeds; rank 0 writes the outputs into ``out_dir`` (default ``runs/<experiment>-<preset>``).

    ``seeds`` (default: the preset's ``seeds``, else its single seed): every seed is a full run with
    its own data, initial weights and test streams; ``out_dir/seed<S>/`` holds that seed's
    summary and checkpoints, ``out_dir`` the summary over seeds, ``metrics.jsonl``, figures and
    ``run.json`` (command, seeds, learning rates, wall time).
    ``lrs`` (trained experiments; default: the preset's ``lrs``, else ``train.lr``): with several
    values, every mixer is trained at each on the first seed and scored on validation streams
    (distinct from the test streams); the seeds then run at each mixer's best rate.  TTR tunes each
    method's own hyperparameters (``cfg["hparams"]``) on a held-out stream instead.
    ``restart``: start over from existing checkpoints made under another configuration (else
    ``CheckpointMismatchError``).  Every run continues from its checkpoint in ``out_dir`` when there
    is one (same configuration); ``resume=True`` only insists that there is something to continue
    (ValueError when ``out_dir`` holds no checkpoint).  ``context_parallel`` > 1 (under ``torchrun``): shard each training
    sequence over groups of that many ranks (mqar and state); see ``lla.experiments.train.train``.

    Returns the summary rows ``{"experiment", "mixer", "metric", "value", "kind", ...config keys}``:
    ``kind`` is ``seed`` (one seed's test value, with ``seed``), ``aggregate`` (``value`` = ``mean``,
    ``std``, ``n_seeds``, ``ci95``), ``sweep`` (a validation score per swept value) or ``chosen``.
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {list(EXPERIMENTS)}, got {experiment!r}")
    cfg = get_preset(experiment, preset) if cfg is None else cfg
    mixers = _check_mixers(experiment, mixers)
    if isinstance(context_parallel, bool) or not isinstance(context_parallel, int) or context_parallel < 1:
        raise ValueError(f"context_parallel must be a positive int, got {context_parallel!r}")
    if context_parallel > 1 and experiment not in ("mqar", "state", "lm"):
        raise ValueError(f"context_parallel applies to mqar and state, and lm (per-token labels), not {experiment}")
    seed0 = cfg["seed"] if experiment == "ttr" else cfg["train"]["seed"]
    seeds = list(seeds) if seeds is not None else list(cfg.get("seeds", [seed0]))
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct non-negative ints, got {seeds!r}")
    if experiment == "ttr" and lrs:
        raise ValueError("lrs applies to trained experiments (icr, mqar, state); ttr tunes cfg['hparams'] instead")
    lrs = list(lrs) if lrs is not None else (list(cfg.get("lrs", [])) if experiment != "ttr" else [])
    if any(not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 for lr in lrs):
        raise ValueError(f"lrs must be positive numbers, got {lrs!r}")
    out_dir = out_dir or os.path.join("runs", f"{experiment}-{preset}")
    if resume and restart:
        raise ValueError("resume and restart exclude each other")
    if resume and not glob.glob(os.path.join(out_dir, "seed*", "ckpt", "*.pt")):
        raise ValueError(f"resume: nothing to resume in {out_dir!r} (no checkpoint under {out_dir}/seed*/ckpt/)")
    device = setup_distributed()
    rank, world = dist_info()
    is_main = rank == 0
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    eval_log = _load_evals(metrics) if not restart else {}
    log = report.JsonlLogger(metrics if is_main else None)
    log({"kind": "config", "experiment": experiment, "preset": preset, "mixers": mixers, "seeds": seeds, "lrs": lrs,
         "world_size": world, "context_parallel": context_parallel,
         "device": str(device), "torch": torch.__version__, "config": cfg, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    t0 = time.time()
    eval_curves, finished, train_seconds = [], True, {}
    if experiment == "ttr":
        curves = []

        def ttr_log(rec):
            log(rec)
            curves.append({k: v for k, v in rec.items() if k not in ("kind", "mse")} | {"y": rec["mse"]})

        rows = ttr.run(cfg, mixers, ttr_log, seeds=seeds) if is_main else []
    else:
        with _flush_denormal():
            rows, curves, eval_curves, finished = _run_trained(
                experiment, cfg, mixers, out_dir, log, device, progress, stop_after, context_parallel,
                seeds=seeds, lrs=lrs, restart=restart, eval_log=eval_log, train_seconds=train_seconds)
    if is_main and rows and finished:
        seconds = time.time() - t0
        log({"kind": "done", "seconds": seconds})
        rows = rows + report.aggregate(rows)
        data = _data_record(experiment, cfg)
        if data is not None:  # what the run was trained on (summary.json's "data" row, run.json's "data")
            rows.append({"experiment": experiment, "mixer": "-", "kind": "data", "metric": "corpus_sha256",
                         "value": data["sha256"], "data": data})
        title = f"{experiment} ({preset} preset)"
        for seed in seeds:
            report.write_summary(os.path.join(out_dir, f"seed{seed}"), [r for r in rows if r.get("seed") == seed],
                                 f"{title}, seed {seed}")
        md = report.write_summary(out_dir, rows, title)
        chosen = defaultdict(dict)
        for r in rows:
            if r.get("kind") == "chosen":
                setting = ",".join(f"{k}={r[k]}" for k in ("seg_len", "dim", "shift", "group") if k in r) or "all"
                chosen[r["mixer"]][f"{setting}:{r['metric']}"] = r["value"]
        cmd = command or ("lla " + " ".join(sys.argv[1:]) if os.path.basename(sys.argv[0]) in ("lla", "__main__.py") else None)
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump({"experiment": experiment, "preset": preset, "command": cmd, "mixers": mixers, "seeds": seeds, "lrs": lrs,
                       "chosen": chosen, "seconds": seconds, "world_size": world, "device": str(device),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": cfg,
                       **({"data": data} if data is not None else {}),
                       # the training steps' wall-clock of every run, summed over resumed invocations (the run's own
                       # "seconds" counts only this invocation, e.g. the final evaluations of a resumed grid)
                       **({"train_seconds": sum(v for v in train_seconds.values() if v is not None),
                           "trainings": len(train_seconds)} if train_seconds else {})}, f, indent=1)
        _plots(experiment, out_dir, curves, rows, eval_curves)
        print(md)
        print(f"\nwrote {out_dir}/summary.json, summary.md, run.json, metrics.jsonl, seed*/ and figures ({seconds:.0f} s)")
    return rows


def estimate(experiment: str, preset: str = "quick", mixers=None, cfg: dict | None = None, seeds=None, lrs=None,
             steps: int = 16, device=None) -> dict:
    """Estimate a full run's wall time from a timed short run: per (task setting, mixer), ``steps``
    training steps (after one untimed step) and one validation evaluation, scaled to the run's
    ``(len(lrs) + len(seeds) - 1)`` trainings (the first seed's run at the best rate is the sweep's)
    of ``train.steps`` steps with an evaluation every ``eval_every`` steps, plus the test evaluations.
    TTR (no training) is timed whole on one seed and scaled by its seeds.  Returns
    ``{"seconds", "per_mixer": {mixer: seconds}, "trainings"}``; run on the machine in question
    (the numbers are as noisy as the machine is busy).
    """
    cfg = get_preset(experiment, preset) if cfg is None else copy.deepcopy(cfg)
    mixers = _check_mixers(experiment, mixers)
    seed0 = cfg["seed"] if experiment == "ttr" else cfg["train"]["seed"]
    seeds = list(seeds) if seeds is not None else list(cfg.get("seeds", [seed0]))
    device = device or torch.device("cpu")
    per = defaultdict(float)
    if experiment == "ttr":
        for mixer in mixers:
            t0 = time.time()
            ttr.run(cfg, [mixer], lambda rec: None, seeds=seeds[:1])
            grid = len(ttr.hparam_grid(cfg, mixer))
            per[mixer] = (time.time() - t0) * (grid + len(seeds)) / (grid + 1) if grid > 1 else (time.time() - t0) * len(seeds)
        return {"seconds": sum(per.values()), "per_mixer": dict(per), "trainings": 0}
    lrs = list(lrs) if lrs is not None else list(cfg.get("lrs", [])) or [cfg["train"]["lr"]]
    n_train = (len(lrs) + len(seeds) - 1) if len(lrs) > 1 else len(seeds)
    total_steps = cfg["train"]["steps"]
    eval_every = int(cfg.get("eval_every", 0))
    n_evals = (total_steps // eval_every + (total_steps % eval_every > 0)) if eval_every else 0
    with _flush_denormal():
        for key, task in _trained_runs(experiment, cfg):
            for mixer in mixers:
                torch.manual_seed(0)
                model = CausalModel(ModelConfig(mixer=mixer, **cfg["model"], **task.model_kwargs(), **_mixer_kwargs(cfg, mixer)))
                tcfg = replace(TrainConfig(**cfg["train"]), steps=1)
                train(model, task, tcfg, device=device, progress=False)
                t0 = time.time()
                train(model, task, replace(tcfg, steps=steps), device=device, progress=False)
                t_step = (time.time() - t0) / steps
                t0 = time.time()
                task.evaluate(model, device, 0, split="val")
                t_val = time.time() - t0
                t0 = time.time()
                task.evaluate(model, device, 0)
                t_test = time.time() - t0
                per[mixer] += n_train * (total_steps * t_step + n_evals * t_val) + (len(lrs) if len(lrs) > 1 else 0) * t_val \
                    + len(seeds) * t_test
    return {"seconds": sum(per.values()), "per_mixer": dict(per), "trainings": n_train}


class _flush_denormal:
    """Flush subnormal floats to zero on the CPU while training (subnormal Gram entries made the
    per-position solves of ``mesa`` 4x slower in ICR); restored to the default afterwards."""

    def __enter__(self):
        torch.set_flush_denormal(True)

    def __exit__(self, *exc):
        torch.set_flush_denormal(False)


def demo(out_dir: str = "lla-demo") -> list[dict]:
    """The test-time regression comparison of lla, softmax, mesa and linear (about a minute on 2 cores)."""
    print("Test-time regression on a non-stationary stream (T=1024, D=8, a new linear map every 128 steps).")
    print("The attention op itself is the regressor: keys = inputs, values = targets, query = next input.")
    print("shift=2.0: each segment also moves the input distribution; shift=0.0: shared distribution.\n")
    rows = run_experiment("ttr", "demo", mixers=["lla", "softmax", "mesa", "linear"], out_dir=out_dir)
    best = {}
    for r in rows:
        if r["metric"] == "mse" and r.get("kind") == "aggregate":
            best.setdefault(r["shift"], []).append((r["value"], r["mixer"]))
    for shift, vals in best.items():
        print(f"shift={shift}: mean MSE, best first: " + ", ".join(f"{m} {v:.3f}" for v, m in sorted(vals)))
    return rows
