"""``lla run EXPERIMENT`` and ``lla demo``: run, then write summary.json, metrics.jsonl, summary.md, PNGs."""

from __future__ import annotations

import copy
import functools
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


class _Trainings:
    """What the trainings of one ``_run_trained`` call share: the experiment's configuration, where a
    run logs and checkpoints, and the validation curves recorded so far (``seen``)."""

    def __init__(self, experiment, cfg, out_dir, log, device, progress, stop_after, context_parallel, restart,
                 eval_log, train_seconds):
        self.experiment, self.cfg, self.out_dir, self.log, self.device = experiment, cfg, out_dir, log, device
        self.progress, self.stop_after, self.context_parallel, self.restart = progress, stop_after, context_parallel, restart
        self.train_seconds = train_seconds
        self.base = TrainConfig(**cfg["train"])
        self.eval_every = int(cfg.get("eval_every", 0)) if context_parallel == 1 else 0
        self.seen = eval_log if eval_log is not None else {}  # (name, seed, lr) -> [{"step", "rows"}], from earlier invocations too
        self.finished = True  # False once a training stopped at ``stop_after``
        self.written = set()  # checkpoints of this invocation (``restart`` applies to older ones only)

    def train_one(self, task, key, mixer, seed, lr):
        """One seed's training at one rate, resumed from its checkpoint when there is one.
        -> ``(last, model, name, ident)`` (``last``: ``train``'s final record), or None when interrupted."""
        tcfg = replace(self.base, seed=seed, lr=lr)
        name = "_".join([self.experiment, mixer] + [f"{k}{v}" for k, v in key.items()])
        torch.manual_seed(tcfg.seed)  # same initial weights on every rank
        mcfg = ModelConfig(mixer=mixer, **self.cfg["model"], **task.model_kwargs(), **_mixer_kwargs(self.cfg, mixer))
        model = CausalModel(mcfg)
        ck = os.path.join(self.out_dir, f"seed{seed}", "ckpt", f"{name}_lr{lr:g}.pt") if self.out_dir else None
        ident = (name, seed, lr)
        on_eval = functools.partial(self._record_eval, task, name, mixer, key, seed, lr)
        t0 = time.time()
        last = train(model, task, tcfg, device=self.device, log=self.log, desc=f"{name} seed{seed} lr{lr:g}",
                     progress=self.progress, stop_after=self.stop_after, context_parallel=self.context_parallel,
                     restart=self.restart and ck not in self.written, eval_fn=on_eval if self.eval_every else None,
                     eval_every=self.eval_every, ckpt_path=ck,
                     meta={"model": mcfg.to_dict(), "task": self.cfg, **(task.meta() if hasattr(task, "meta") else {})})
        self.written.add(ck)
        if self.stop_after is not None and last["step"] < tcfg.steps:
            self.finished = False
            return None  # interrupted on purpose: evaluate when resumed
        n_params = sum(p.numel() for p in model.parameters())
        if self.train_seconds is not None:  # each training once (the best rate's first seed is the sweep's run)
            self.train_seconds[ident] = last.get("train_seconds")
        self.log({"kind": "run", "run": name, "mixer": mixer, **key, "seed": seed, "lr": lr, "seconds": time.time() - t0,
                  "train_seconds": last.get("train_seconds"),
                  "params": n_params, "final_loss": last["loss"], "model": mcfg.to_dict(), "train": tcfg.to_dict()})
        return last, model, name, ident

    def _record_eval(self, task, name, mixer, key, seed, lr, model, step, seconds=None):
        """``train``'s ``eval_fn``: a validation evaluation at ``step``, logged and kept in ``seen``."""
        vrows, _ = task.evaluate(model, self.device, seed, split="val")
        runs = self.seen.setdefault((name, seed, lr), [])
        runs[:] = [r for r in runs if r["step"] != step]  # a resumed run re-evaluates the steps it re-runs
        runs.append({"step": step, "rows": vrows, "seconds": seconds})
        runs.sort(key=lambda r: r["step"])
        self.log({"kind": "eval", "run": name, "mixer": mixer, **key, "seed": seed, "lr": lr, "step": step, "seconds": seconds,
                  "rows": vrows})


def _sweep_lr(trainings, task, key, mixer, lrs, seed, rows):
    """The learning-rate sweep: with several ``lrs``, train at each on ``seed`` and score it on the
    validation streams (a ``sweep`` row each, appended to ``rows``).  -> the best rate (ties: the
    first, smallest; the only one when ``lrs`` has one), or None when a sweep training was interrupted."""
    if len(lrs) == 1:
        return lrs[0]
    experiment = trainings.experiment
    scores = {}
    for lr in lrs:
        res = trainings.train_one(task, key, mixer, seed, lr)
        if res is None:
            continue
        vrows, _ = task.evaluate(res[1], trainings.device, seed, split="val")
        scores[lr] = _score(experiment, vrows)
        metric, mode = SELECT[experiment]
        rows.append({"experiment": experiment, "mixer": mixer, **key, "kind": "sweep", "seed": seed, "lr": lr,
                     "metric": f"val_{metric}", "value": scores[lr] if mode == "max" else -scores[lr]})
    if len(scores) < len(lrs):
        return None
    return max(lrs, key=lambda lr: scores[lr])


def _seed_rows(trainings, key, mixer, mixers, seed, lr, last, ident, erows) -> list[dict]:
    """The summary rows of one seed's finished training: its test rows ``erows`` (the classical
    predictors' once, with the first mixer), its final training loss and its steps to the target."""
    experiment, target = trainings.experiment, trainings.cfg.get("target")
    tag = {"kind": "seed", "seed": seed, "lr": lr}
    rows = []
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
    if target and trainings.seen.get(ident):
        for r in _steps_to_target(trainings.seen[ident], target):
            rows.append({"experiment": experiment, "mixer": mixer, **key, **tag, **r})
    return rows


def _collect_seed(trainings, task, key, mixer, mixers, seed, lr, res, rows, curves, eval_curves):
    """Collecting one seed's results: evaluate its model on the test streams, append its summary rows,
    its validation curve (``eval_curves``) and its test curves (``curves``, also logged)."""
    last, model, name, ident = res
    erows, ecurves = task.evaluate(model, trainings.device, seed)
    rows.extend(_seed_rows(trainings, key, mixer, mixers, seed, lr, last, ident, erows))
    for rec in trainings.seen.get(ident, []):
        eval_curves.append({"mixer": mixer, **key, "seed": seed, "step": rec["step"], "rows": rec["rows"],
                            "seconds": rec.get("seconds")})
    for c in ecurves:
        pred = c.pop("predictor", "model")
        if pred != "model" and mixer != mixers[0]:
            continue
        curves.append({**key, **c, "mixer": mixer if pred == "model" else pred, "seed": seed})
        trainings.log({"kind": "curve", "run": name, **curves[-1]})  # the figures' data, to redraw or tabulate


def _run_trained(experiment, cfg, mixers, out_dir, log, device, progress, stop_after, context_parallel=1,
                 seeds=(0,), lrs=None, restart=False, eval_log=None, train_seconds=None):
    """Train every (task setting, mixer): a learning-rate sweep on ``seeds[0]`` (validation streams)
    when ``lrs`` has several values, then every seed at the mixer's best rate (test streams).

    Returns ``(rows, curves, eval_curves, finished)``: rows carry ``kind`` (``sweep`` | ``chosen`` |
    ``seed``); ``finished`` is False when ``stop_after`` interrupted a training (a mixer whose sweep
    was interrupted gets no ``chosen`` row and no seeds yet; an interrupted seed no rows).
    """
    trainings = _Trainings(experiment, cfg, out_dir, log, device, progress, stop_after, context_parallel, restart,
                           eval_log, train_seconds)
    lrs = list(lrs) if lrs else [trainings.base.lr]
    rows, curves, eval_curves = [], [], []
    for key, task in _trained_runs(experiment, cfg):
        for mixer in mixers:
            best = _sweep_lr(trainings, task, key, mixer, lrs, seeds[0], rows)
            if best is None:
                continue
            rows.append({"experiment": experiment, "mixer": mixer, **key, "kind": "chosen", "metric": "chosen_lr", "value": best})
            for seed in seeds:
                res = trainings.train_one(task, key, mixer, seed, best)
                if res is not None:
                    _collect_seed(trainings, task, key, mixer, mixers, seed, best, res, rows, curves, eval_curves)
    return rows, curves, eval_curves, trainings.finished


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
    cfg, mixers, seeds, lrs, out_dir = _check_run(experiment, preset, mixers, out_dir, cfg, context_parallel, seeds,
                                                  lrs, restart, resume)
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
        run = {"experiment": experiment, "preset": preset, "command": command, "mixers": mixers, "seeds": seeds,
               "lrs": lrs, "seconds": seconds, "world_size": world, "device": str(device), "config": cfg, "data": data,
               "train_seconds": train_seconds}
        md = _write_outputs(out_dir, rows, run)
        report.plot_experiment(experiment, out_dir, curves, rows, eval_curves)
        print(md)
        print(f"\nwrote {out_dir}/summary.json, summary.md, run.json, metrics.jsonl, seed*/ and figures ({seconds:.0f} s)")
    return rows


def _check_run(experiment, preset, mixers, out_dir, cfg, context_parallel, seeds, lrs, restart, resume):
    """``run_experiment``'s arguments checked and defaulted from the preset.
    -> (cfg, mixers, seeds, lrs, out_dir)"""
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
    return cfg, mixers, seeds, lrs, out_dir


def _write_outputs(out_dir: str, rows: list[dict], run: dict) -> str:
    """A finished run's files: ``seed<S>/summary.*`` per seed, ``summary.*`` over seeds and ``run.json``
    (command, seeds, learning rates, the chosen hyperparameters, wall time, data, training seconds).
    ``run``: the run's record (``train_seconds``: ``{training: seconds}``).  -> the summary's Markdown."""
    title = f"{run['experiment']} ({run['preset']} preset)"
    for seed in run["seeds"]:
        report.write_summary(os.path.join(out_dir, f"seed{seed}"), [r for r in rows if r.get("seed") == seed],
                             f"{title}, seed {seed}")
    md = report.write_summary(out_dir, rows, title)
    chosen = defaultdict(dict)
    for r in rows:
        if r.get("kind") == "chosen":
            setting = ",".join(f"{k}={r[k]}" for k in ("seg_len", "dim", "shift", "group") if k in r) or "all"
            chosen[r["mixer"]][f"{setting}:{r['metric']}"] = r["value"]
    cmd = run["command"] or ("lla " + " ".join(sys.argv[1:]) if os.path.basename(sys.argv[0]) in ("lla", "__main__.py") else None)
    data, train_seconds = run["data"], run["train_seconds"]
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump({"experiment": run["experiment"], "preset": run["preset"], "command": cmd, "mixers": run["mixers"],
                   "seeds": run["seeds"], "lrs": run["lrs"], "chosen": chosen, "seconds": run["seconds"],
                   "world_size": run["world_size"], "device": run["device"],
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": run["config"],
                   **({"data": data} if data is not None else {}),
                   # the training steps' wall-clock of every run, summed over resumed invocations (the run's own
                   # "seconds" counts only this invocation, e.g. the final evaluations of a resumed grid)
                   **({"train_seconds": sum(v for v in train_seconds.values() if v is not None),
                       "trainings": len(train_seconds)} if train_seconds else {})}, f, indent=1)
    return md


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
