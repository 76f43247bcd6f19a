"""``lla run EXPERIMENT`` and ``lla demo``: run, then write summary.json, metrics.jsonl, summary.md, PNGs."""

from __future__ import annotations

import os
import time

import torch

from lla.nn.mixers import MIXERS

from . import report
from .model import CausalModel, ModelConfig
from .presets import DEFAULT_MIXERS, EXPERIMENTS, get_preset
from .tasks import ttr
from .train import TrainConfig, dist_info, setup_distributed, train


def _check_mixers(experiment: str, mixers) -> list[str]:
    mixers = list(mixers) if mixers else list(DEFAULT_MIXERS[experiment])
    allowed = ttr.TTR_MIXERS if experiment == "ttr" else MIXERS
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


def _run_trained(experiment, cfg, mixers, out_dir, log, device, progress, stop_after, context_parallel=1):
    rows, curves = [], []
    tcfg = TrainConfig(**cfg["train"])
    for key, task in _trained_runs(experiment, cfg):
        for mixer in mixers:
            name = "_".join([experiment, mixer] + [f"{k}{v}" for k, v in key.items()])
            torch.manual_seed(tcfg.seed)  # same initial weights on every rank
            mcfg = ModelConfig(mixer=mixer, **cfg["model"], **task.model_kwargs())
            model = CausalModel(mcfg)
            t0 = time.time()
            last = train(model, task, tcfg, device=device, log=log, desc=name, progress=progress, stop_after=stop_after,
                         context_parallel=context_parallel,
                         meta={"model": mcfg.to_dict(), "task": cfg}, ckpt_path=os.path.join(out_dir, "ckpt", name + ".pt") if out_dir else None)
            seconds = time.time() - t0
            if stop_after is not None and last["step"] < tcfg.steps:
                continue  # interrupted on purpose: evaluate when resumed
            erows, ecurves = task.evaluate(model, device, tcfg.seed)
            n_params = sum(p.numel() for p in model.parameters())
            for r in erows:
                r = {"experiment": experiment, "mixer": mixer, **key, **r}
                if "predictor" in r:  # ICR: classical baselines are rows of their own, named by predictor
                    pred = r.pop("predictor")
                    if pred != "model":
                        if mixer != mixers[0]:
                            continue
                        r["mixer"] = pred
                rows.append(r)
            rows.append({"experiment": experiment, "mixer": mixer, **key, "metric": "final_train_loss", "value": last["loss"]})
            log({"kind": "run", "run": name, "mixer": mixer, **key, "seconds": seconds, "params": n_params,
                 "final_loss": last["loss"], "model": mcfg.to_dict(), "train": tcfg.to_dict()})
            for c in ecurves:
                pred = c.pop("predictor", "model")
                if pred != "model" and mixer != mixers[0]:
                    continue
                curves.append({**key, **c, "mixer": mixer if pred == "model" else pred})
                log({"kind": "curve", "run": name, **curves[-1]})  # the figures' data, to redraw or tabulate
    return rows, curves


def _plots(experiment, out_dir, curves):
    if experiment == "ttr":
        return report.plot_curves(out_dir, curves, ["dim", "seg_len", "shift"], "position", "MSE (log)", "ttr_mse",
                                  boundaries_key="seg_len", logy=True)
    if experiment == "icr":
        # the segment-aware least-squares oracle reaches ~1e-14: clip the axis to where the models are
        return report.plot_curves(out_dir, curves, ["seg_len"], "pair index", "MSE / d (log)", "icr_mse",
                                  boundaries_key="seg_len", logy=True, ylim=(1e-2, None))
    if experiment == "state":
        return report.plot_curves(out_dir, curves, ["group"], "length (position)", "accuracy", "state_accuracy")
    if experiment == "mqar":
        return _plot_mqar(out_dir, curves)
    return []


def _plot_mqar(out_dir, rows):
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for mixer in dict.fromkeys(r["mixer"] for r in rows):
        rs = [r for r in rows if r["mixer"] == mixer]
        ax.plot([f"{r['seq_len']}/{r['num_kv']}" for r in rs], [r["value"] for r in rs], marker="o", label=mixer)
    ax.set_xlabel("sequence length / kv pairs")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "mqar_accuracy.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def run_experiment(experiment: str, preset: str = "quick", mixers=None, out_dir: str | None = None,
                   progress: bool = True, stop_after: int | None = None, cfg: dict | None = None,
                   context_parallel: int = 1) -> list[dict]:
    """Run one experiment; rank 0 writes the outputs into ``out_dir`` (default ``runs/<experiment>-<preset>``).

    ``context_parallel`` > 1 (under ``torchrun``): shard each training sequence over groups of that
    many ranks (mqar and state, whose labels are per token); see ``lla.experiments.train.train``.

    Returns the summary rows ``{"experiment", "mixer", "metric", "value", ...config keys}``.
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {list(EXPERIMENTS)}, got {experiment!r}")
    cfg = get_preset(experiment, preset) if cfg is None else cfg
    mixers = _check_mixers(experiment, mixers)
    if isinstance(context_parallel, bool) or not isinstance(context_parallel, int) or context_parallel < 1:
        raise ValueError(f"context_parallel must be a positive int, got {context_parallel!r}")
    if context_parallel > 1 and experiment not in ("mqar", "state"):
        raise ValueError(f"context_parallel applies to mqar and state (per-token labels), not {experiment}")
    out_dir = out_dir or os.path.join("runs", f"{experiment}-{preset}")
    device = setup_distributed()
    rank, world = dist_info()
    is_main = rank == 0
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
    log = report.JsonlLogger(os.path.join(out_dir, "metrics.jsonl") if is_main else None)
    log({"kind": "config", "experiment": experiment, "preset": preset, "mixers": mixers, "world_size": world,
         "context_parallel": context_parallel,
         "device": str(device), "torch": torch.__version__, "config": cfg, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    t0 = time.time()
    if experiment == "ttr":
        curves = []

        def ttr_log(rec):
            log(rec)
            curves.append({k: v for k, v in rec.items() if k not in ("kind", "mse")} | {"y": rec["mse"]})

        rows = ttr.run(cfg, mixers, ttr_log) if is_main else []
    else:
        rows, curves = _run_trained(experiment, cfg, mixers, out_dir, log, device, progress, stop_after, context_parallel)
        if experiment == "mqar":
            curves = [r for r in rows if r["metric"] == "accuracy"]
    if is_main and rows:
        log({"kind": "done", "seconds": time.time() - t0})
        md = report.write_summary(out_dir, rows, f"{experiment} ({preset} preset)")
        _plots(experiment, out_dir, curves)
        print(md)
        print(f"\nwrote {out_dir}/summary.json, summary.md, metrics.jsonl and figures ({time.time() - t0:.0f} s)")
    return rows


def demo(out_dir: str = "lla-demo") -> list[dict]:
    """The test-time regression comparison of lla, softmax, mesa and linear (about a minute on 2 cores)."""
    print("Test-time regression on a non-stationary stream (T=1024, D=8, a new linear map every 128 steps).")
    print("The attention op itself is the regressor: keys = inputs, values = targets, query = next input.")
    print("shift=2.0: each segment also moves the input distribution; shift=0.0: shared distribution.\n")
    rows = run_experiment("ttr", "demo", mixers=["lla", "softmax", "mesa", "linear"], out_dir=out_dir)
    best = {}
    for r in rows:
        if r["metric"] == "mse":
            best.setdefault(r["shift"], []).append((r["value"], r["mixer"]))
    for shift, vals in best.items():
        print(f"shift={shift}: mean MSE, best first: " + ", ".join(f"{m} {v:.3f}" for v, m in sorted(vals)))
    return rows
