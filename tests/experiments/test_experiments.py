"""Experiments: task generators, the model, the training loop (resume, DDP under torchrun), the
runner's outputs and the CLI, all at smoke sizes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from lla.cli import main as cli_main
from lla.experiments import PRESETS, get_preset
from lla.experiments.model import CausalModel, ModelConfig
from lla.experiments.runner import run_experiment
from lla.experiments.tasks import ttr
from lla.experiments.tasks.icr import baselines as icr_baselines
from lla.experiments.tasks.icr import make_icr
from lla.experiments.tasks.mqar import make_mqar
from lla.experiments.tasks.state import StateTask, alphabet, group_table, make_word_problem
from lla.experiments.train import CheckpointMismatchError, TrainConfig, train

from conftest import SRC, rel_err

# ---- test-time regression ---------------------------------------------------------------------


def test_ttr_stream_is_piecewise_linear():
    g = torch.Generator().manual_seed(0)
    x, y = ttr.make_stream(2, 40, 3, 10, shift=2.0, noise=0.0, generator=g)
    assert x.shape == y.shape == (2, 40, 3)
    for s in range(4):  # each segment is fitted exactly by one linear map
        X, Y = x[0, 10 * s : 10 * s + 10], y[0, 10 * s : 10 * s + 10]
        A = torch.linalg.lstsq(X, Y).solution
        assert rel_err(X @ A, Y) < 1e-10


@pytest.mark.parametrize("mixer", sorted(ttr.TTR_MIXERS))
def test_ttr_prediction_is_strictly_causal(mixer):
    g = torch.Generator().manual_seed(1)
    x, y = ttr.make_stream(2, 24, 3, 8, shift=2.0, noise=0.1, generator=g)
    pred = ttr.ttr_predict(mixer, x, y, ridge=0.1)  # pred[:, i] predicts y[:, i + 1]
    t = 10
    y2 = y.clone()
    y2[:, t] += 5.0  # the target at position t may only change predictions of positions > t
    x2 = x.clone()
    x2[:, t + 1 :, :] += 1.0  # inputs after position t may only change predictions of positions > t
    pred2 = ttr.ttr_predict(mixer, x, y2, ridge=0.1)
    pred3 = ttr.ttr_predict(mixer, x2, y, ridge=0.1)
    # float32 compute: the op may centre keys with batch-wide statistics, so rounding may differ
    assert rel_err(pred2[:, :t], pred[:, :t]) < 1e-5 and rel_err(pred3[:, :t], pred[:, :t]) < 1e-5
    assert rel_err(pred2[:, t:], pred[:, t:]) > 1e-2
    if mixer in ("lla", "softmax", "linear"):  # one visible pair: the prediction is its target
        assert rel_err(pred[:, 0], y[:, 0], atol=1e-6) < 1e-5


def test_ttr_lla_beats_softmax_and_mesa_on_shifted_segments():
    """The paper's finding at a small size (float64-seeded data, deterministic)."""
    g = torch.Generator().manual_seed(0)
    x, y = ttr.make_stream(8, 256, 4, 64, shift=2.0, noise=0.1, generator=g)
    mse = {m: ttr.ttr_mse(m, x, y, ridge=0.1) for m in ("lla", "softmax", "mesa")}
    later = {m: v[64:].mean().item() for m, v in mse.items()}
    assert later["lla"] < 0.6 * later["softmax"] and later["lla"] < 0.6 * later["mesa"], later
    assert mse["mesa"][:63].mean() < mse["lla"][:63].mean()  # the first segment is globally linear: mesa wins there


# ---- generators ---------------------------------------------------------------------------------


def test_mqar_generator():
    g = torch.Generator().manual_seed(0)
    V, N, T = 64, 6, 40
    tokens, labels = make_mqar(5, T, N, V, g)
    assert tokens.shape == labels.shape == (5, T)
    for b in range(5):
        keys, values = tokens[b, 0 : 2 * N : 2], tokens[b, 1 : 2 * N : 2]
        assert ((keys >= 1) & (keys < V // 2)).all() and len(set(keys.tolist())) == N
        assert ((values >= V // 2) & (values < V)).all()
        pairs = dict(zip(keys.tolist(), values.tolist()))
        asked = (labels[b] != -100).nonzero().flatten()
        assert len(asked) == N and (asked >= 2 * N).all()
        assert sorted(tokens[b, asked].tolist()) == sorted(keys.tolist())  # each key asked once
        for p in asked.tolist():
            assert labels[b, p].item() == pairs[tokens[b, p].item()]
        rest = torch.ones(T, dtype=torch.bool)
        rest[: 2 * N] = False
        rest[asked] = False
        assert (tokens[b, rest] == 0).all()
    with pytest.raises(ValueError, match="seq_len"):
        make_mqar(1, 10, 4, V, g)


@pytest.mark.parametrize("name,order,abelian", [("S5", 120, False), ("A5", 60, False), ("Z60", 60, True),
                                                ("S3-swap", 6, False), ("S4-swap", 24, False)])
def test_group_tables(name, order, abelian):
    table = group_table(name)
    assert table.shape == (order, order)
    assert all(sorted(row.tolist()) == list(range(order)) for row in table)  # Latin square: a group's table
    idx = torch.randint(order, (200, 3), generator=torch.Generator().manual_seed(0))
    a, b, c = idx.unbind(1)
    assert torch.equal(table[table[a, b], c], table[a, table[b, c]])  # associative
    assert torch.equal(table, table.T) == abelian


@pytest.mark.parametrize("n", [3, 4, 5])
def test_swap_task_tracks_the_arrangement(n):
    """S<n>-swap words are transpositions; the target is the arrangement after applying them."""
    perms = list(itertools.permutations(range(n)))
    letters = alphabet(f"S{n}-swap")
    assert len(letters) == n * (n - 1) // 2
    tokens, targets = make_word_problem(4, 10, f"S{n}-swap", torch.Generator().manual_seed(n))
    for b in range(4):
        state = list(range(n))
        for t in range(10):
            swap = perms[int(tokens[b, t])]
            moved = [i for i in range(n) if swap[i] != i]
            assert len(moved) == 2  # a transposition
            i, j = moved
            state[i], state[j] = state[j], state[i]  # swap the contents of positions i and j
            assert perms[int(targets[b, t])] == tuple(state)
    with pytest.raises(ValueError, match="group must be one of"):
        group_table("S9-swap")


def test_word_problem_is_the_running_product():
    perms = list(itertools.permutations(range(5)))
    g = torch.Generator().manual_seed(0)
    tokens, targets = make_word_problem(3, 12, "S5", g)
    for b in range(3):
        acc = perms[tokens[b, 0]]
        for t in range(12):
            if t:
                nxt = perms[tokens[b, t]]
                acc = tuple(acc[nxt[i]] for i in range(5))
            assert perms[targets[b, t]] == acc


def test_icr_tokens_and_baselines():
    g = torch.Generator().manual_seed(0)
    tokens, x, y = make_icr(4, 24, 3, 8, shift=0.0, noise=0.0, generator=g)
    assert tokens.shape == (4, 48, 6)
    assert torch.equal(tokens[:, 0::2, :3], x) and torch.equal(tokens[:, 1::2, 3:], y)
    assert (tokens[:, 0::2, 3:] == 0).all() and (tokens[:, 1::2, :3] == 0).all()
    mse = icr_baselines(x, y, seg_len=8)
    in_seg = torch.arange(24) % 8
    assert mse["segment_ls"][in_seg >= 4].max() < 1e-8  # noise-free: exact after d + 1 pairs of a segment
    assert mse["least_squares"][in_seg >= 4][2:].mean() > 0.05  # global LS mixes segments


# ---- model, training ------------------------------------------------------------------------------


def test_model_config_checks():
    with pytest.raises(ValueError, match="vocab_size"):
        CausalModel(ModelConfig(mixer="softmax", output_dim=3))
    with pytest.raises(ValueError, match="output_dim"):
        CausalModel(ModelConfig(mixer="softmax", vocab_size=5))
    m = CausalModel(ModelConfig(mixer="lla", d_model=16, num_heads=2, vocab_size=7, output_dim=7, max_len=9))
    assert m(torch.randint(7, (2, 9))).shape == (2, 9, 7)


def _tiny_state_run(ckpt, stop_after=None, steps=4, restart=False):
    cfg = get_preset("state", "smoke")
    task = StateTask(cfg, "A5")
    torch.manual_seed(0)
    model = CausalModel(ModelConfig(mixer="lla", d_model=16, num_heads=2, n_layers=1, **task.model_kwargs()))
    tcfg = TrainConfig(steps=steps, batch_size=4, warmup=1, lr=3e-3, ckpt_every=1)
    last = train(model, task, tcfg, device=torch.device("cpu"), ckpt_path=ckpt, stop_after=stop_after, progress=False,
                 restart=restart)
    return model, last


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full, last_full = _tiny_state_run(str(tmp_path / "a.pt"))
    part, last_part = _tiny_state_run(str(tmp_path / "b.pt"), stop_after=2)
    assert last_part["step"] == 2
    resumed, last_res = _tiny_state_run(str(tmp_path / "b.pt"))
    assert last_res["step"] == 4 and last_res["loss"] == last_full["loss"]
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert not all(torch.equal(p, q) for p, q in zip(full.parameters(), part.parameters()))
    # a finished run started again resumes at its end: no step, and it reports its last loss
    again, last_again = _tiny_state_run(str(tmp_path / "b.pt"))
    assert last_again == last_res and all(torch.equal(p, q) for p, q in zip(again.parameters(), resumed.parameters()))
    # a checkpoint made under another configuration is refused (never a silent restart) ...
    with pytest.raises(CheckpointMismatchError, match=r"differs in: train\.steps.*restart"):
        _tiny_state_run(str(tmp_path / "b.pt"), steps=5)
    # ... unless the restart is asked for: training starts over, from step 0, and overwrites it
    fresh, last_other = _tiny_state_run(str(tmp_path / "b.pt"), steps=5, restart=True)
    assert last_other["step"] == 5
    assert torch.load(str(tmp_path / "b.pt"), weights_only=False)["meta"]["train"]["steps"] == 5


# ---- runner, CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["ttr", "mqar", "icr", "state"])
def test_smoke_presets_write_outputs(experiment, tmp_path):
    mixers = None if experiment == "ttr" else ["lla", "softmax"]
    rows = run_experiment(experiment, "smoke", mixers=mixers, out_dir=str(tmp_path), progress=False)
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary == rows and len(rows) > 0
    for r in rows:
        assert {"experiment", "mixer", "metric", "value"} <= set(r) and r["experiment"] == experiment
    assert {"lla", "softmax"} <= {r["mixer"] for r in rows}
    assert (tmp_path / "summary.md").read_text().count("|") > 10
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())
    kinds = [json.loads(line)["kind"] for line in open(tmp_path / "metrics.jsonl")]
    assert kinds[0] == "config" and kinds[-1] == "done"
    if experiment != "ttr":
        assert "train" in kinds and "run" in kinds
    if experiment in ("icr", "state"):  # the figures' data are in metrics.jsonl too
        logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
        curves = [r for r in logged if r["kind"] == "curve"]
        assert {"lla", "softmax"} <= {c["mixer"] for c in curves}
        assert all(len(c["x"]) == len(c["y"]) > 0 for c in curves)
    if experiment == "icr":
        assert {"least_squares", "segment_ls", "knn", "averaging"} <= {r["mixer"] for r in rows}


def test_runner_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="experiment"):
        run_experiment("nope", "smoke", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="preset"):
        run_experiment("ttr", "huge", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="mixers"):
        run_experiment("ttr", "smoke", mixers=["sliding_window"], out_dir=str(tmp_path))


def test_cli_run_and_demo(tmp_path, monkeypatch, capsys):
    assert cli_main(["run", "state", "--preset", "smoke", "--mixers", "softmax", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert (tmp_path / "s" / "summary.json").exists()
    assert cli_main(["run", "state", "--preset", "smoke", "--mixers", "softmax", "--steps", "2", "--out", str(tmp_path / "s2"), "--no-progress"]) == 0
    losses = [json.loads(line) for line in open(tmp_path / "s2" / "metrics.jsonl")]
    assert [r["step"] for r in losses if r["kind"] == "train"][-1] == 2
    # --seed reaches the config that is logged and changes the run (data and initial weights)
    assert cli_main(["run", "state", "--preset", "smoke", "--mixers", "softmax", "--steps", "2", "--seed", "7",
                     "--out", str(tmp_path / "s3"), "--no-progress"]) == 0
    seeded = [json.loads(line) for line in open(tmp_path / "s3" / "metrics.jsonl")]
    assert seeded[0]["config"]["train"]["seed"] == 7 and losses[0]["config"]["train"]["seed"] == 0
    loss = lambda rs: [r["loss"] for r in rs if r["kind"] == "train"]
    assert loss(seeded) != loss(losses)
    assert cli_main(["run", "ttr", "--preset", "smoke", "--seed", "3", "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert json.loads(open(tmp_path / "t" / "metrics.jsonl").readline())["config"]["seed"] == 3
    monkeypatch.setitem(PRESETS["ttr"], "demo", get_preset("ttr", "smoke") | {"shifts": [2.0, 0.0]})
    assert cli_main(["demo", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "| lla | softmax | mesa | linear |" in out and "shift=0.0" in out
    assert any(p.suffix == ".png" for p in (tmp_path / "d").iterdir())
    with pytest.raises(SystemExit):
        cli_main(["run", "nope"])


_TORCH_ONLY = """
import sys, warnings
class Block:  # a fresh environment with torch alone: the experiments extra is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("numpy", "matplotlib", "tqdm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's own, without numpy
import torch, lla
from lla.cli import main
q = torch.randn(1, 6, 2, 8)
assert lla.local_linear_attention(q, q, q, ridge=0.5).shape == (1, 6, 2, 8)
assert lla.nn.LocalLinearAttention(16, 2)(torch.randn(1, 5, 16)).shape == (1, 5, 16)
for argv in (["--help"], ["demo", "--out", "unused"]):
    try:
        main(argv)
    except SystemExit as e:
        print("exit", e.code)
"""


def test_core_needs_torch_alone():
    """``import lla``, the op and the layers work with numpy, matplotlib and tqdm unimportable;
    ``lla --help`` too, and ``lla demo`` says which extra to install."""
    env = {**os.environ, "PYTHONPATH": SRC}
    res = subprocess.run([sys.executable, "-c", _TORCH_ONLY], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage: lla" in res.stdout and "exit 0" in res.stdout
    assert 'lla demo needs the experiments extra (numpy, matplotlib, tqdm missing): pip install -e ".[experiments]"' in res.stdout


def test_cli_bench_dispatch(capsys):
    try:
        import lla.bench  # noqa: F401
    except ImportError:
        assert cli_main(["bench"]) == 2
        assert "lla.bench" in capsys.readouterr().err
    else:  # dispatched with the remaining arguments
        with pytest.raises(SystemExit) as e:
            cli_main(["bench", "--help"])
        assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_torchrun_two_processes(tmp_path):
    """DDP with gloo on CPU: 2 ranks train one tiny run; rank 0 writes the outputs once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lla", "run", "state",
           "--preset", "smoke", "--mixers", "lla", "--out", str(tmp_path), "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert lines[0]["world_size"] == 2
    assert sum(1 for r in lines if r["kind"] == "config") == 1  # only rank 0 logs
    rows = json.load(open(tmp_path / "summary.json"))
    assert any(r["metric"] == "accuracy" and r["mixer"] == "lla" for r in rows)


def test_training_logs_numerical_warnings_with_their_step():
    """An LLAConvergenceWarning raised inside a training step lands in the log with run and step
    (and is still issued)."""
    import warnings as _w

    import lla
    from lla.experiments import train as tr

    calls = {"n": 0}

    class Task:
        def sample(self, batch, g):
            return torch.randn(batch, 4, generator=g), torch.randn(batch, 1, generator=g)

        def loss(self, out, y):
            calls["n"] += 1
            if calls["n"] == 2:
                _w.warn("solve missed", lla.LLAConvergenceWarning)
            return (out - y).pow(2).mean()

    rows = []
    model = torch.nn.Linear(4, 1)
    cfg = tr.TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup=0, log_every=1)
    with pytest.warns(lla.LLAConvergenceWarning, match="solve missed"):
        tr.train(model, Task(), cfg, device=torch.device("cpu"), log=rows.append, progress=False)
    warned = [r for r in rows if r["kind"] == "warning"]
    assert warned == [{"kind": "warning", "run": "train", "step": 2, "message": "solve missed"}]


def test_ttr_untrained_parallax_is_softmax_at_zero_gain_and_lla_shaped():
    """TTR's Parallax (no training: ``r_i = gain (m_i - q_i)``) is softmax attention at gain 0, and at
    a small ridge-like gain moves toward LLA (its isotropic approximation)."""
    from lla.experiments.tasks import ttr

    x, y = ttr.make_stream(2, 96, 4, 32, 2.0, 0.1, torch.Generator().manual_seed(0))
    p0 = ttr.ttr_predict("parallax", x, y, 0.1, torch.float64, gain=0.0)
    assert torch.allclose(p0, ttr.ttr_predict("softmax", x, y, 0.1, torch.float64), atol=1e-12)
    assert "parallax" in get_preset("ttr", "quick")["hparams"]
    mse = {g: ttr.ttr_mse("parallax", x, y, 0.1, torch.float64, gain=g).mean().item() for g in (0.0, 0.1)}
    assert mse[0.1] < mse[0.0]


def test_window_option_reaches_the_sliding_window_mixer(tmp_path):
    """``lla run ... --window W`` builds the sliding_window mixer with that window (at the quick
    presets' lengths the default 64 is plain softmax attention) and leaves other mixers alone."""
    from lla.experiments.runner import _mixer_kwargs

    out = tmp_path / "sw"
    assert cli_main(["run", "state", "--preset", "smoke", "--mixers", "sliding_window", "lla", "--window", "4",
                     "--out", str(out), "--no-progress"]) == 0
    cfgs = [json.loads(line) for line in open(out / "metrics.jsonl") if '"kind": "config"' in line]
    assert cfgs and cfgs[0]["config"]["mixer_kwargs"] == {"sliding_window": {"window": 4}}
    assert _mixer_kwargs(cfgs[0]["config"], "sliding_window") == {"mixer_kwargs": {"window": 4}}
    assert _mixer_kwargs(cfgs[0]["config"], "lla") == {}
    with pytest.raises(SystemExit):
        cli_main(["run", "ttr", "--preset", "smoke", "--window", "4", "--out", str(tmp_path / "t")])


# ---- seeds mean something: every family's data depends on the seed ------------------------------------


def _drawn_data(experiment: str, seeds: list[int], out_dir, monkeypatch, corpus=None) -> list[str]:
    """Fingerprints of the data a run draws, in order: the streams TTR evaluates on, or every training
    batch of a trained experiment (through the runner and the trainer, as ``lla run`` draws them)."""
    import hashlib

    drawn = []

    def fp(t):
        return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]

    cfg = get_preset(experiment, "smoke")
    if experiment == "ttr":
        orig = ttr.make_stream

        def recording(*a, **kw):
            x, y = orig(*a, **kw)
            drawn.append(fp(x))
            return x, y

        monkeypatch.setattr(ttr, "make_stream", recording)
        mixers = ["softmax"]
        cfg["hparams"] = {}
    else:
        from lla.experiments.tasks.icr import ICRTask
        from lla.experiments.tasks.lm import LMTask
        from lla.experiments.tasks.mqar import MQARTask

        cls = {"icr": ICRTask, "mqar": MQARTask, "state": StateTask, "lm": LMTask}[experiment]
        orig = cls.sample

        def recording(self, batch, generator):
            x, y = orig(self, batch, generator)
            drawn.append(fp(x) + fp(y))
            return x, y

        monkeypatch.setattr(cls, "sample", recording)
        mixers = ["softmax"]
        cfg["train"].update(steps=2, batch_size=4, warmup=1)
        cfg["eval_every"] = 0
        if experiment == "icr":
            cfg["baselines"] = False
        if experiment == "lm":
            cfg.update(corpus=corpus, context=16)
    try:
        run_experiment(experiment, "smoke", mixers=mixers, out_dir=str(out_dir), progress=False, cfg=cfg, seeds=seeds)
    finally:
        monkeypatch.undo()  # the next call wraps the original again
    return drawn


@pytest.mark.parametrize("experiment", ["ttr", "icr", "mqar", "state", "lm"])
def test_two_seeds_draw_different_data_and_one_seed_the_same(experiment, tmp_path, monkeypatch):
    corpus = None
    if experiment == "lm":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("".join(f"line {i}: value_{i % 7} = {i * 13 % 101}\n" for i in range(2000)))
        corpus = str(corpus)
    both = _drawn_data(experiment, [0, 1], tmp_path / "a", monkeypatch, corpus)
    only0 = _drawn_data(experiment, [0], tmp_path / "b", monkeypatch, corpus)
    only1 = _drawn_data(experiment, [1], tmp_path / "c", monkeypatch, corpus)
    if experiment == "ttr":  # the held-out tuning stream (drawn first, once per run) is the preset's, by design
        assert both[0] == only0[0] == only1[0]
        both, only0, only1 = both[1:], only0[1:], only1[1:]
    n = len(only0)
    assert n > 0 and len(only1) == n and both == only0 + only1  # seeds 0 then 1; the same seed draws the same
    assert not set(only0) & set(only1), "two seeds drew the same data"
