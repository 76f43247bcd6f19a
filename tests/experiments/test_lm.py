"""Language modelling on bytes (``lla run lm``): corpus loading and splits, bits per byte, the
smoke pipeline over every mixer, exact resume after SIGKILL, configuration mismatch, DDP, bf16."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from lla.experiments.model import CausalModel, ModelConfig
from lla.experiments.presets import get_preset
from lla.experiments.runner import run_experiment
from lla.experiments.tasks import lm
from lla.experiments.tasks.lm import LMTask, corpus_files, load_corpus
from lla.experiments.train import CheckpointMismatchError, TrainConfig, train
from lla.experiments.mixers import MIXERS

from conftest import SRC


def _text(n_bytes: int, seed: int = 0) -> str:
    """Deterministic code-like text of about ``n_bytes`` (identifiers defined, then reused)."""
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "value", "count", "index", "total", "item", "name"]
    lines = []
    size = 0
    while size < n_bytes:
        a, b, c = (words[int(i)] for i in torch.randint(len(words), (3,), generator=g))
        k = int(torch.randint(100, (1,), generator=g))
        line = f"def {a}_{k}({b}, {c}):\n    return {b} + {c} * {k}\n\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(_text(40_000))
    return str(p)


def _cfg(corpus: str, **over) -> dict:
    cfg = get_preset("lm", "smoke")
    cfg["corpus"] = corpus
    cfg["context"] = 32
    for k, v in over.items():
        if k in ("steps", "batch_size", "ckpt_every", "log_every", "dtype", "warmup"):
            cfg["train"][k] = v
        else:
            cfg[k] = v
    return cfg


# ---- corpus and splits ----------------------------------------------------------------------------


def test_single_file_corpus_splits_by_bytes_90_5_5(corpus_file):
    data = load_corpus(corpus_file, 33)
    raw = open(corpus_file, "rb").read()
    n = len(raw)
    a, b = int(0.9 * n), int(0.95 * n)
    assert bytes(data["train"].tolist()) == raw[:a]
    assert bytes(data["val"].tolist()) == raw[a:b]
    assert bytes(data["test"].tolist()) == raw[b:]
    rec = data["record"]
    import hashlib

    assert rec["sha256"] == hashlib.sha256(raw).hexdigest() and rec["bytes"] == n
    assert rec["splits"]["test"]["sha256"] == hashlib.sha256(raw[b:]).hexdigest()
    assert rec["python"] == sys.version.split()[0] and rec["files"] == 1


def test_folder_corpus_splits_by_file_in_sorted_order(tmp_path):
    root = tmp_path / "c"
    for i in range(45):
        d = root / ("sub" if i % 2 else "") / f"f{i:02d}.txt"
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_text(f"file {i}\n" * 20)
    files = corpus_files(str(root))
    rels = [r for r, _ in files]
    assert rels == sorted(rels) and len(rels) == 45
    data = load_corpus(str(root), 33)
    texts = [open(full, "rb").read() for _, full in files]
    sep = bytes([lm.SEP])
    expect = {"test": sep.join(t for i, t in enumerate(texts) if i % 20 == 0),
              "val": sep.join(t for i, t in enumerate(texts) if i % 20 == 1),
              "train": sep.join(t for i, t in enumerate(texts) if i % 20 > 1)}
    for s in ("train", "val", "test"):
        assert bytes(data[s].tolist()) == expect[s], s
    assert data["record"]["splits"]["test"]["files"] == 3 and data["record"]["splits"]["val"]["files"] == 3 and data["record"]["splits"]["train"]["files"] == 39
    assert data["record"]["bytes"] == len(sep.join(texts))


def test_default_corpus_rule_excludes_tests_and_site_packages(tmp_path):
    root = tmp_path / "stdlib"
    for rel in ["os.py", "json/__init__.py", "test/test_os.py", "idlelib/idle_test/x.py", "unittest/test/y.py",
                "site-packages/pkg/z.py", "lib2to3/tests/data.py", "notes.txt", "json/tool.py"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x = 1\n")
    got = [r for r, _ in corpus_files(str(root), default=True)]
    assert got == ["json/__init__.py", "json/tool.py", "os.py"]
    # the real default: this interpreter's stdlib, without test folders
    default = [r for r, _ in corpus_files(lm.default_corpus(), default=True)]
    assert len(default) > 100 and "os.py" in default
    assert not any(p.startswith("test") for r in default for p in r.split(os.sep))


def test_bad_corpora_fail_before_training_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"), 33)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no files"):
        load_corpus(str(empty), 33)
    (empty / "a.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(empty), 33)
    short = tmp_path / "short.txt"
    short.write_text("x" * 200)
    with pytest.raises(ValueError, match="fewer than one window"):
        load_corpus(str(short), 33)  # 200 bytes: the 5% splits hold 10
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "ok.txt").write_text("hello\n" * 100)
    (binary / "blob.bin").write_bytes(b"abc\x00def" * 10)
    with pytest.raises(ValueError, match=r"blob\.bin.*NUL"):
        load_corpus(str(binary), 33)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=r"latin\.txt.*not UTF-8"):
        load_corpus(str(latin), 33)
    # through the runner: the error comes before any training (nothing written but the config line)
    with pytest.raises(ValueError, match="fewer than one window"):
        run_experiment("lm", "smoke", mixers=["softmax"], out_dir=str(tmp_path / "o"), progress=False, cfg=_cfg(str(short)))
    assert not (tmp_path / "o" / "seed0").exists()


# ---- batches, metric ------------------------------------------------------------------------------


def test_batches_are_windows_of_the_train_split_and_bpb_is_nats_over_ln2(corpus_file):
    task = LMTask(_cfg(corpus_file))
    g = torch.Generator().manual_seed(3)
    x, y = task.sample(5, g)
    assert x.shape == y.shape == (5, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    train_bytes = bytes(task.data["train"].tolist())
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert bytes(row_x + row_y[-1:]) in train_bytes
    # evaluation windows are fixed: evenly spaced, whatever the seed
    starts = task.eval_starts("test")
    assert starts[0] == 0 and starts[-1] == len(task.data["test"]) - 33 and len(starts) == task.cfg["test_windows"]
    torch.manual_seed(0)
    model = CausalModel(ModelConfig(mixer="softmax", d_model=16, num_heads=2, n_layers=1, **task.model_kwargs())).eval()
    rows0, curves0 = task.evaluate(model, torch.device("cpu"), 0)
    rows1, curves1 = task.evaluate(model, torch.device("cpu"), 5)
    assert rows0 == rows1 and curves0 == curves1
    xt, yt = task.windows("test", starts)
    with torch.no_grad():
        nats = F.cross_entropy(model(xt).double().flatten(0, 1), yt.flatten()).item()
    bpb = {r["metric"]: r["value"] for r in rows0}
    assert bpb["test_bpb"] == pytest.approx(nats / math.log(2), rel=1e-6)
    assert len(curves0[0]["y"]) == 32 and sum(curves0[0]["y"]) / 32 == pytest.approx(bpb["test_bpb"], rel=1e-9)
    assert bpb["test_bpb_pos0-7"] == pytest.approx(sum(curves0[0]["y"][:8]) / 8, rel=1e-9)
    vrows, _ = task.evaluate(model, torch.device("cpu"), 0, split="val")
    assert [r["metric"] for r in vrows] == ["bpb"]


# ---- the pipeline ---------------------------------------------------------------------------------


def test_every_mixer_trains_and_the_run_writes_summary_data_and_figures(corpus_file, tmp_path):
    mixers = ["lla", "parallax", "softmax", "gated_deltanet", "mesa", "linear", "sliding_window"]
    assert set(mixers) == set(MIXERS)  # every registered mixer
    out = tmp_path / "run"
    cfg = _cfg(corpus_file, steps=4, batch_size=4, warmup=1, ckpt_every=2, eval_every=2, log_every=2,
               eval_windows=4, test_windows=8)
    rows = run_experiment("lm", "smoke", mixers=mixers, out_dir=str(out), progress=False, cfg=cfg, lrs=[1e-3, 3e-3])
    summary = json.load(open(out / "summary.json"))
    assert summary == rows
    seeds = {r["mixer"]: r for r in rows if r.get("kind") == "seed" and r["metric"] == "test_bpb"}
    assert set(seeds) == set(mixers)
    assert all(0 < r["value"] < 10 and math.isfinite(r["value"]) for r in seeds.values())
    assert {r["mixer"] for r in rows if r.get("kind") == "sweep" and r["metric"] == "val_bpb"} == set(mixers)
    assert {r["mixer"] for r in rows if r.get("kind") == "chosen"} == set(mixers)
    data = [r for r in rows if r.get("kind") == "data"]
    assert len(data) == 1 and data[0]["data"]["corpus"] == os.path.abspath(corpus_file)
    run = json.load(open(out / "run.json"))
    assert run["data"]["sha256"] == data[0]["value"] and run["data"]["python"] == sys.version.split()[0]
    assert run["trainings"] == 2 * len(mixers) and run["train_seconds"] > 0  # 2 rates on seed 0, each trained once
    for png in ("lm_val_vs_steps_.png", "lm_val_vs_seconds.png", "lm_loss_by_position_.png"):
        assert (out / png).stat().st_size > 1000, png
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    tr = [r for r in logged if r["kind"] == "train"]
    assert tr and all(r["tokens_per_s"] > 0 and r["train_seconds"] > 0 for r in tr)
    ev = [r for r in logged if r["kind"] == "eval"]
    assert ev and all(r["seconds"] > 0 and r["rows"][0]["metric"] == "bpb" for r in ev)
    # lla report includes the run
    from lla.experiments.report import results_page

    (tmp_path / "res").mkdir()
    os.symlink(out, tmp_path / "res" / "lm")
    page = open(results_page(str(tmp_path / "res"))).read()
    assert "## lm" in page and "test_bpb" in page and data[0]["value"] in page


def test_bf16_training_is_finite_and_differs_from_fp32(corpus_file):
    task = LMTask(_cfg(corpus_file))
    losses = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = CausalModel(ModelConfig(mixer="lla", d_model=16, num_heads=2, n_layers=1, rope=True, tie_embeddings=True,
                                        **task.model_kwargs()))
        log = []
        train(model, task, TrainConfig(steps=4, batch_size=4, warmup=1, lr=3e-3, log_every=1, dtype=dtype),
              device=torch.device("cpu"), progress=False, log=log.append)
        losses[dtype] = [r["loss"] for r in log if r["kind"] == "train"]
        assert all(math.isfinite(v) for v in losses[dtype]) and all(math.isfinite(r["grad_norm"]) for r in log)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses["fp32"] != losses["bf16"]  # autocast did run in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    with pytest.raises(ValueError, match="dtype"):
        train(model, task, TrainConfig(steps=1, dtype="fp16"), device=torch.device("cpu"), progress=False)


# ---- exact resume after SIGKILL, configuration mismatch ---------------------------------------------


def _lla_cmd(corpus, out, *extra):
    return [sys.executable, "-m", "lla", "run", "lm", "--preset", "smoke", "--corpus", corpus, "--mixers", "lla", "softmax",
            "--steps", "24", "--log-every", "1", "--out", str(out), "--no-progress", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": SRC}


def _train_losses(out) -> dict:
    """``{(run, step): loss}`` from metrics.jsonl, the last record of every step."""
    got = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        r = json.loads(line)
        if r["kind"] == "train":
            got[(r["run"], r["step"])] = r["loss"]
    return got


def test_sigkill_then_resume_gives_the_uninterrupted_losses_bitwise(corpus_file, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    ref = subprocess.run(_lla_cmd(corpus_file, full), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # kill the same run with SIGKILL once lla has logged step 13 (checkpoints every 10 steps)
    proc = subprocess.Popen(_lla_cmd(corpus_file, cut), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        metrics = cut / "metrics.jsonl"
        if metrics.exists():
            steps = [json.loads(line).get("step", 0) for line in open(metrics) if '"kind": "train"' in line]
            if steps and max(steps) >= 13:
                proc.send_signal(signal.SIGKILL)
                killed_at = max(steps)
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert killed_at < 24 and not (cut / "summary.json").exists()
    before = _train_losses(cut)
    res = subprocess.run(_lla_cmd(corpus_file, cut, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = _train_losses(full), _train_losses(cut)
    assert len(want) == 48 and set(got) == set(want)
    assert got == want  # bitwise: floats from JSON, compared exactly
    assert any(k in before for k in want)  # part of it came from before the kill
    s_full = {(r["mixer"], r["metric"]): r["value"] for r in json.load(open(full / "summary.json")) if r.get("kind") == "seed"}
    s_cut = {(r["mixer"], r["metric"]): r["value"] for r in json.load(open(cut / "summary.json")) if r.get("kind") == "seed"}
    assert s_full == s_cut
    # a checkpoint from another configuration is refused, naming the fields
    bad = subprocess.run(_lla_cmd(corpus_file, cut, "--resume", "--dtype", "bf16"), env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "lla run:" in bad.stderr
    assert re.search(r"differs in: [^)]*\btrain\.dtype", bad.stderr), bad.stderr[-2000:]
    # nothing to resume
    none = subprocess.run(_lla_cmd(corpus_file, tmp_path / "fresh", "--resume"), env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert none.returncode != 0 and "nothing to resume" in none.stderr


def test_lm_checkpoint_mismatch_names_the_fields(corpus_file, tmp_path):
    cfg = _cfg(corpus_file, steps=2, batch_size=4, warmup=1, eval_every=0)
    run_experiment("lm", "smoke", mixers=["softmax"], out_dir=str(tmp_path), progress=False, cfg=cfg)
    other = _cfg(corpus_file, steps=2, batch_size=4, warmup=1, eval_every=0, context=16)
    with pytest.raises(CheckpointMismatchError, match=r"differs in: task\.context"):
        run_experiment("lm", "smoke", mixers=["softmax"], out_dir=str(tmp_path), progress=False, cfg=other)
    # another corpus with the same path: the data hash differs
    with open(corpus_file, "a") as f:
        f.write("# more\n")
    lm._CACHE.clear()
    with pytest.raises(CheckpointMismatchError, match=r"data_sha256"):
        run_experiment("lm", "smoke", mixers=["softmax"], out_dir=str(tmp_path), progress=False, cfg=cfg)
    lm._CACHE.clear()


# ---- DDP -------------------------------------------------------------------------------------------


def test_two_gloo_processes_give_the_single_process_losses(corpus_file, tmp_path):
    """``torchrun --nproc_per_node=2``: data parallel (each rank half the batch) and context parallel
    (each sequence sharded over the 2 ranks, rotary positions global) log the single process's loss
    at every step (float32 rounding), for lla with rope and tied embeddings."""
    base = [sys.executable, "-m", "lla", "run", "lm", "--preset", "smoke", "--corpus", corpus_file, "--mixers", "lla",
            "--steps", "4", "--log-every", "1", "--no-progress"]
    one = subprocess.run(base + ["--out", str(tmp_path / "one")], env=_env(), capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    a = _train_losses(tmp_path / "one")
    assert len(a) == 4
    for name, extra in (("ddp", []), ("cp", ["--context-parallel", "2"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *base[1:],
               "--out", str(tmp_path / name), *extra]
        two = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
        assert two.returncode == 0, two.stderr[-3000:]
        config = json.loads(open(tmp_path / name / "metrics.jsonl").readline())
        assert config["world_size"] == 2 and config["context_parallel"] == (2 if extra else 1)
        b = _train_losses(tmp_path / name)
        assert set(a) == set(b), name
        assert max(abs(b[k] - a[k]) / abs(a[k]) for k in a) <= 1e-5, (name, a, b)


def test_wallclock_table_interpolates_val_bpb_at_the_reference_time(tmp_path):
    from lla.experiments.report import lm_wallclock_table

    chosen = [{"experiment": "lm", "mixer": m, "kind": "chosen", "metric": "chosen_lr", "value": 0.01} for m in ("softmax", "lla")]
    (tmp_path / "summary.json").write_text(json.dumps(chosen))
    recs = []
    for seed, scale in ((0, 1.0), (1, 2.0)):
        # softmax: 2 evals, ends at 10 s * scale; lla: slower, 3 evals up to 30 s * scale
        for step, sec, bpb in ((50, 5.0, 4.0), (100, 10.0, 3.0)):
            recs.append({"kind": "eval", "mixer": "softmax", "seed": seed, "lr": 0.01, "step": step, "seconds": sec * scale,
                         "rows": [{"metric": "bpb", "value": bpb}]})
        for step, sec, bpb in ((50, 8.0, 5.0), (100, 16.0, 3.5), (150, 30.0, 2.5)):
            recs.append({"kind": "eval", "mixer": "lla", "seed": seed, "lr": 0.01, "step": step, "seconds": sec * scale,
                         "rows": [{"metric": "bpb", "value": bpb}]})
        recs.append({"kind": "eval", "mixer": "lla", "seed": seed, "lr": 0.001, "step": 150, "seconds": 1.0,  # not chosen
                     "rows": [{"metric": "bpb", "value": 0.0}]})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    table = lm_wallclock_table(str(tmp_path))
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in table.splitlines()[2:]}
    # lla at softmax's 10 s (seed 0): between (8, 5.0) and (16, 3.5): 5.0 - 1.5 * 2 / 8 = 4.625; seed 1 the same
    assert lines["lla"] == ["45 ± 21", "2.5 ± 0", "4.625 ± 0"]
    assert lines["softmax"] == ["15 ± 7.1", "3 ± 0", "3 ± 0"]


def test_checkpoint_holds_and_restores_every_rng_and_the_loader_state(corpus_file, tmp_path):
    import random

    import numpy as np

    task = LMTask(_cfg(corpus_file))
    ck = str(tmp_path / "c.pt")

    def run(stop_after):
        torch.manual_seed(0)
        model = CausalModel(ModelConfig(mixer="softmax", d_model=16, num_heads=2, n_layers=1, **task.model_kwargs()))
        return train(model, task, TrainConfig(steps=4, batch_size=2, warmup=1), device=torch.device("cpu"), progress=False,
                     ckpt_path=ck, stop_after=stop_after)

    run(2)
    state = torch.load(ck, weights_only=False)
    assert state["step"] == 2 and state["loader"] == {"seed": 0, "step": 2} and state["train_seconds"] > 0
    assert {"torch", "python", "numpy"} <= set(state["rng"])
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # noqa: B018
    run(2)  # resumes at step 2, runs nothing: the RNGs are the checkpoint's again
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    assert random.getstate() == state["rng"]["python"]
    assert np.array_equal(np.random.get_state()[1], state["rng"]["numpy"][1])
    assert not os.path.exists(ck + ".tmp")  # written to a temporary file, then renamed
