"""Science machinery at smoke sizes: seeds with spread, learning-rate sweeps on validation streams,
TTR hyperparameters tuned on a held-out stream, steps to a target, MQAR positions, the results page,
and refusing a checkpoint made under another configuration."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from lla.cli import main as cli_main
from lla.experiments import get_preset
from lla.experiments.report import mean_std_ci, results_page, t975
from lla.experiments.runner import _steps_to_target, run_experiment
from lla.experiments.tasks import ttr
from lla.experiments.tasks.mqar import MQARTask, eval_seed


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_mean_std_ci():
    vals = [0.2, 0.5, 0.9]
    st = mean_std_ci(vals)
    assert st["n_seeds"] == 3 and math.isclose(st["mean"], statistics.mean(vals))
    assert math.isclose(st["std"], statistics.stdev(vals))
    h = 4.303 * statistics.stdev(vals) / math.sqrt(3)  # t_{0.975, 2}
    assert math.isclose(st["ci95"][0], st["mean"] - h) and math.isclose(st["ci95"][1], st["mean"] + h)
    one = mean_std_ci([0.7, None, float("nan")])  # missing values (a target never reached) are left out
    assert one == {"mean": 0.7, "std": 0.0, "n_seeds": 1}
    assert mean_std_ci([None])["mean"] is None
    assert t975(1) == 12.706 and 1.96 < t975(100) < 1.99


def test_seeds_write_per_seed_folders_and_aggregates(tmp_path):
    rows = run_experiment("state", "smoke", mixers=["softmax", "lla"], out_dir=str(tmp_path), progress=False, seeds=[0, 1])
    assert _load(tmp_path / "summary.json") == rows
    per = [r for r in rows if r["kind"] == "seed"]
    agg = [r for r in rows if r["kind"] == "aggregate"]
    assert {r["seed"] for r in per} == {0, 1}
    for seed in (0, 1):
        mine = _load(tmp_path / f"seed{seed}" / "summary.json")
        assert mine and all(r["seed"] == seed for r in mine)
        assert (tmp_path / f"seed{seed}" / "summary.md").exists()
    acc = [r for r in agg if r["metric"] == "accuracy"]
    assert {r["mixer"] for r in acc} == {"softmax", "lla"}
    for a in acc:
        vals = [r["value"] for r in per if r["metric"] == "accuracy" and r["mixer"] == a["mixer"]]
        assert len(vals) == 2 and a["n_seeds"] == 2 and a["value"] == a["mean"]
        assert math.isclose(a["mean"], statistics.mean(vals)) and math.isclose(a["std"], statistics.stdev(vals), abs_tol=1e-15)
        assert a["ci95"][0] <= a["mean"] <= a["ci95"][1]
    # the two seeds are different runs (data, weights, test streams)
    losses = {r["seed"]: r["value"] for r in per if r["metric"] == "final_train_loss" and r["mixer"] == "lla"}
    assert losses[0] != losses[1]
    md = (tmp_path / "summary.md").read_text()
    assert "±" in md and "| softmax | lla |" in md
    meta = _load(tmp_path / "run.json")
    assert meta["seeds"] == [0, 1] and meta["seconds"] > 0
    assert any(p.name.startswith("state_accuracy") for p in tmp_path.iterdir())


def test_lr_sweep_picks_the_validation_best_and_reuses_the_sweep_run(tmp_path):
    rows = run_experiment("mqar", "smoke", mixers=["softmax", "linear"], out_dir=str(tmp_path), progress=False,
                          seeds=[0, 1], lrs=[1e-4, 3e-2])
    for mixer in ("softmax", "linear"):
        sweep = {r["lr"]: r["value"] for r in rows if r["kind"] == "sweep" and r["mixer"] == mixer}
        assert set(sweep) == {1e-4, 3e-2} and all(r["seed"] == 0 for r in rows if r["kind"] == "sweep")
        (chosen,) = [r["value"] for r in rows if r["kind"] == "chosen" and r["mixer"] == mixer]
        assert sweep[chosen] == max(sweep.values())
        assert {r["lr"] for r in rows if r["kind"] == "seed" and r["mixer"] == mixer} == {chosen}
        assert {r["positions"] for r in rows if r["kind"] == "seed" and r["metric"] == "accuracy"} == {"learned"}
    # seed 0 at the chosen rate is the sweep's run (resumed at its end), not trained again
    assert len(list((tmp_path / "seed0" / "ckpt").iterdir())) == 4 and len(list((tmp_path / "seed1" / "ckpt").iterdir())) == 2
    runs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"kind": "run"' in line]
    assert len(runs) == 4 + 2 + 2  # sweep, then seed 0 (resumed: no step) and seed 1 per mixer
    # validation curves: one evaluation per step (eval_every 1), on streams that are not the test streams
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"kind": "eval"' in line]
    assert sorted({e["step"] for e in evals}) == [1, 2, 3]
    steps = [r for r in rows if r["metric"] == "steps_to_target" and r["kind"] == "seed"]
    assert len(steps) == 4 and all(r["target"] == 0.99 for r in steps)
    assert any(p.name.startswith("mqar_val_vs_steps") for p in tmp_path.iterdir())
    md = (tmp_path / "summary.md").read_text()
    assert "Sensitivity" in md and "val_accuracy @ lr=0.0001" in md and "chosen_lr" in md
    assert eval_seed(0, "val") != eval_seed(0, "test") and eval_seed(2, "test") not in {eval_seed(s, "val") for s in range(3)}


def test_steps_to_target_reads_the_first_step_at_target():
    curve = [{"step": s, "rows": [{"seq_len": 8, "metric": "accuracy", "value": v}, {"seq_len": 16, "metric": "accuracy", "value": 0.1}]}
             for s, v in ((10, 0.5), (20, 0.995), (30, 0.98), (40, 1.0))]
    got = {r["seq_len"]: r["value"] for r in _steps_to_target(curve, {"metric": "accuracy", "at_least": 0.99})}
    assert got == {8: 20, 16: None}


def test_ttr_tunes_each_method_on_a_held_out_stream(tmp_path):
    cfg = get_preset("ttr", "smoke") | {"hparams": {"lla": {"ridge": [1e-2, 10.0]}, "softmax": {"scale": [0.5, 4.0]}}}
    rows = run_experiment("ttr", "smoke", mixers=["lla", "softmax", "linear"], cfg=cfg, out_dir=str(tmp_path),
                          progress=False, seeds=[0, 1])
    for mixer, name in (("lla", "ridge"), ("softmax", "scale")):
        sweep = [r for r in rows if r["kind"] == "sweep" and r["mixer"] == mixer]
        assert len(sweep) == 2
        (chosen,) = [r for r in rows if r["kind"] == "chosen" and r["mixer"] == mixer]
        assert chosen["metric"] == f"chosen_{name}"
        best = min(sweep, key=lambda r: r["value"])
        assert best["hparams"] == f"{name}={chosen['value']}"
        # the held-out score is the MSE on the validation stream, recomputed here
        g = torch.Generator().manual_seed(ttr.VAL_SEED_OFFSET + cfg["seed"])
        xv, yv = ttr.make_stream(cfg["batch"], cfg["seq_len"], 4, 32, 2.0, cfg["noise"], g)
        kw = {name: chosen["value"]}
        ridge = kw.pop("ridge", cfg["ridge"])
        assert math.isclose(ttr.ttr_mse(mixer, xv, yv, ridge, torch.float64, **kw).mean().item(), best["value"], rel_tol=1e-9)
        # and each seed's test value is the chosen setting on that seed's fresh stream
        g = torch.Generator().manual_seed(1)
        x, y = ttr.make_stream(cfg["batch"], cfg["seq_len"], 4, 32, 2.0, cfg["noise"], g)
        (test,) = [r for r in rows if r["kind"] == "seed" and r["mixer"] == mixer and r["seed"] == 1 and r["metric"] == "mse"]
        assert math.isclose(ttr.ttr_mse(mixer, x, y, ridge, torch.float64, **kw).mean().item(), test["value"], rel_tol=1e-9)
    assert not [r for r in rows if r["kind"] in ("sweep", "chosen") and r["mixer"] == "linear"]  # no grid: defaults
    assert any(p.name.startswith("ttr_mse_vs_d") for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="lrs"):
        run_experiment("ttr", "smoke", out_dir=str(tmp_path / "x"), lrs=[1e-3])


def test_ttr_gated_deltanet_is_normalised_delta_rule():
    g = torch.Generator().manual_seed(0)
    x, y = ttr.make_stream(2, 40, 3, 40, shift=0.0, noise=0.0, generator=g)
    mse = ttr.ttr_mse("gated_deltanet", x, y, 0.1, torch.float64, beta=1.0, alpha=1.0)
    assert mse[-10:].mean() < 0.05 * mse[:3].mean()  # NLMS converges on one linear map


def test_mqar_positions():
    cfg = get_preset("mqar", "smoke")
    assert MQARTask(cfg).model_kwargs()["max_len"] == 32
    assert MQARTask(cfg | {"positions": "none"}).model_kwargs()["max_len"] == 0
    with pytest.raises(ValueError, match="positions"):
        MQARTask(cfg | {"positions": "rotary"})
    with pytest.raises(ValueError, match="split"):
        eval_seed(0, "train")


def test_cli_seeds_positions_restart_and_results_page(tmp_path, capsys):
    res = tmp_path / "results"
    base = ["--preset", "smoke", "--no-progress"]
    assert cli_main(["run", "mqar", *base, "--mixers", "softmax", "--seeds", "0", "1", "--positions", "none",
                     "--lrs", "1e-3", "1e-2", "--out", str(res / "mqar")]) == 0
    rows = _load(res / "mqar" / "summary.json")
    assert {r["positions"] for r in rows if r["metric"] == "accuracy"} == {"none"}
    assert _load(res / "mqar" / "run.json")["command"].startswith("lla run mqar")
    # the same folder under another configuration: refused, then restarted on request
    with pytest.raises(SystemExit, match="another configuration.*restart"):
        cli_main(["run", "mqar", *base, "--mixers", "softmax", "--seeds", "0", "--steps", "2", "--out", str(res / "mqar")])
    assert cli_main(["run", "mqar", *base, "--mixers", "softmax", "--seeds", "0", "1", "--positions", "none",
                     "--lrs", "1e-3", "1e-2", "--steps", "2", "--restart", "--out", str(res / "mqar")]) == 0
    assert cli_main(["run", "ttr", *base, "--mixers", "lla", "softmax", "--seeds", "0", "1", "--out", str(res / "ttr")]) == 0
    (res / "legacy").mkdir()  # a summary written before seeds were built in
    (res / "legacy" / "summary.json").write_text(json.dumps([{"experiment": "icr", "mixer": "lla", "metric": "mse", "value": 0.5}]))
    (res / "legacy" / "COMMAND").write_text("lla run icr --preset quick\n")
    with pytest.raises(SystemExit):
        cli_main(["run", "ttr", *base, "--lrs", "1e-3"])
    capsys.readouterr()
    assert cli_main(["report", str(res)]) == 0
    page = (res / "README.md").read_text()
    assert page.index("## ttr") < page.index("## mqar") < page.index("## legacy")
    assert "`lla run mqar --preset smoke" in page and "lla run icr --preset quick" in page
    assert "±" in page and "chosen_lr" in page and "chosen_ridge" in page
    for link in [line.split("](")[1].rstrip(")") for line in page.splitlines() if line.startswith("![")]:
        assert (res / link).exists(), link
