"""Context parallelism (``lla.distributed``) and data parallelism, with gloo on CPU.

Multi-process checks spawn ``P`` processes (``tests/integrations/dist_worker.py`` or ``torchrun -m lla``) on a
free port, each bounded by a timeout so that a hang fails instead of blocking CI.  Every figure is
the relative-RMS error against the single-process op on the unsharded sequence.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch

import lla
from conftest import ROOT, SRC, rel_err
from lla.distributed import context_parallel_attention, shard, shard_positions, shard_ranges, unshard

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC, **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, case: str, out, timeout: float = 90.0) -> list[dict]:
    """Run ``dist_worker.py CASE`` on ``world`` gloo ranks; return every rank's JSON result."""
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, WORKER, case, str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port)))
        for r in range(world)
    ]
    logs, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{case} on {world} ranks did not finish within {timeout} s (hang?)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def _assert_checks(results):
    for r, res in enumerate(results):
        assert res["checks"], "no checks ran"
        bad = [f"{c['name']}: {c['err']:.3g} > {c['tol']:g}" for c in res["checks"] if not c["err"] <= c["tol"]]
        assert not bad, f"rank {r}: " + "; ".join(bad)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_equals_single_process(world, tmp_path):
    """Output and dq, dk, dv, dridge of the sharded op equal the unsharded op (fp64 <= 1e-10,
    fp32 <= 1e-5): zigzag and contiguous, causal and not, GQA, windows, per-position and per-head
    ridges, T = 21 (padded), both solvers; and a rank whose solve misses its tolerance warns."""
    results = _launch(world, "attention", tmp_path)
    _assert_checks(results)
    worst = {}
    for c in (c for res in results for c in res["checks"]):
        kind = "model/layer" if c["name"].startswith(("model/", "layer/")) else ("fp32" if "fp32" in c["name"] else "fp64")
        worst[kind] = max(worst.get(kind, 0.0), c["err"])
    print(f"\n{world} ranks, worst relative error: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(worst.items())))
    names = {c["name"] for c in results[0]["checks"]}
    assert any("T=21" in n for n in names) and any("gqa" in n for n in names) and any("contiguous" in n for n in names)
    for r, res in enumerate(results):
        assert res["warning"]["n"] >= 1 and res["warning"]["names_rank"], f"rank {r}: {res['warning']}"


def test_context_parallel_parallax_equals_single_process(tmp_path):
    """mechanism='parallax': output and dq, dr, dk, dv equal the single-process op (2 ranks)."""
    _assert_checks(_launch(2, "parallax", tmp_path))


# ------------------------------------------------------------------------- single process (P = 1)
def test_layouts():
    assert shard_ranges(4, 0, 2, "zigzag") == [(0, 2), (6, 8)]
    assert shard_ranges(4, 1, 2, "zigzag") == [(2, 4), (4, 6)]
    assert shard_ranges(4, 1, 2, "contiguous") == [(4, 8)]
    assert shard_positions(6).tolist() == list(range(6))  # no process group: this process holds it all
    x = torch.arange(10.0).view(1, 10)
    assert torch.equal(unshard(shard(x)), x)
    assert shard(torch.ones(1, 3), pad=True, pad_value=-1).tolist() == [[1, 1, 1, -1]]


def test_single_process_matches_the_op():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 10, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    o = context_parallel_attention(q, k, v, ridge=0.5, window_size=(3, 0))
    assert rel_err(o, lla.local_linear_attention(q, k, v, ridge=0.5, window_size=(3, 0))) <= 1e-12
    o, aux = context_parallel_attention(q, k, v, causal=False, return_aux=True)
    assert aux.lse.shape == (1, 10, 2) and aux.solver == "direct"


def test_bad_arguments():
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="sharding"):
        context_parallel_attention(q, q, q, sharding="ring")
    with pytest.raises(ValueError, match="mechanism"):
        context_parallel_attention(q, q, q, mechanism="softmax")
    with pytest.raises(ValueError, match="same positions"):
        context_parallel_attention(q, q[:, :4], q[:, :4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        context_parallel_attention(q, q, q, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="seqlen"):
        context_parallel_attention(q, q, q, seqlen=7)
    with pytest.raises(ValueError, match="takes no r"):
        context_parallel_attention(q, q, q, r=q)
    with pytest.raises(ValueError, match="pad=True"):
        shard(torch.ones(1, 5))
    with pytest.raises(ValueError, match="even"):
        shard_ranges(5, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="no ridge"):
        context_parallel_attention(q, q, q, r=q, ridge=1.0, mechanism="parallax")


def test_parallax_dispatch_reaches_the_parallax_op_and_unknown_mechanisms_are_refused():
    # one process: the context-parallel call is the op on the whole sequence (merged per chunk, so to rounding)
    q, r, k, v = (torch.randn(1, 12, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(4))
    got = context_parallel_attention(q, k, v, r=r, mechanism="parallax")
    torch.testing.assert_close(got, lla.parallax_attention(q, r, k, v), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, lla.local_linear_attention(q, k, v), rtol=1e-3, atol=1e-3)  # not LLA
    with pytest.raises(ValueError, match="mechanism must be one of"):
        context_parallel_attention(q, k, v, mechanism="softmax")


def test_warnings_are_reissued_with_the_rank():
    q, k, v = (torch.randn(1, 32, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        context_parallel_attention(q, k, v, ridge=1e-2, solver="cg", max_iters=1)
    msgs = [str(w.message) for w in caught if issubclass(w.category, lla.LLAConvergenceWarning)]
    assert msgs and all("context parallel rank 0/1" in m for m in msgs)


# ------------------------------------------------------------------------- the training runner
def _lla_run(out, *extra, world: int = 1, timeout: float = 120.0):
    """``lla run mqar --preset smoke`` (lla mixer, 4 steps, a loss logged every step)."""
    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={world}"]
    cmd = launcher + ["-m", "lla", "run", "mqar", "--preset", "smoke", "--mixers", "lla", "--steps", "4", "--log-every", "1",
                      "--no-progress", "--out", str(out), *extra]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=str(out.parent))
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "train"]
    ckpts = sorted(out.glob("seed*/ckpt/mqar_lla*.pt"))  # one seed, one learning rate: one checkpoint
    assert len(ckpts) == 1, ckpts
    state = torch.load(ckpts[0], weights_only=False)["model"]
    return losses, state


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    return _lla_run(tmp_path_factory.mktemp("single") / "out")


def _initial_state():
    from lla.experiments.model import CausalModel, ModelConfig
    from lla.experiments.presets import get_preset
    from lla.experiments.tasks.mqar import MQARTask

    cfg = get_preset("mqar", "smoke")
    torch.manual_seed(cfg["train"]["seed"])  # what the runner does before building each model
    return CausalModel(ModelConfig(mixer="lla", **cfg["model"], **MQARTask(cfg).model_kwargs())).state_dict()


def test_ddp_two_processes_match_one_process(single_run, tmp_path):
    """2-process DDP (gloo) at the same global batch ends with the parameters of one process:
    every tensor and the total update within float32 rounding (the update is far from zero)."""
    losses1, p1 = single_run
    losses2, p2 = _lla_run(tmp_path / "out", world=2)
    assert len(losses2) == len(losses1) == 4
    assert max(abs(a - b) / abs(b) for a, b in zip(losses2, losses1)) <= 1e-5
    init = _initial_state()
    u1 = torch.cat([(p1[k] - init[k]).flatten() for k in p1])
    u2 = torch.cat([(p2[k] - init[k]).flatten() for k in p1])
    assert u1.norm() > 0.1
    assert rel_err(u2, u1) <= 1e-5
    assert max(rel_err(p2[k], p1[k]) for k in p1) <= 1e-5


def test_cli_context_parallel_matches_one_process(single_run, tmp_path):
    """``torchrun --nproc_per_node=2 -m lla run mqar --preset smoke --context-parallel 2``: the loss
    of every step equals the single-process run's (float32 rounding)."""
    losses1, _ = single_run
    losses2, _ = _lla_run(tmp_path / "out", "--context-parallel", "2", world=2)
    assert len(losses2) == len(losses1) == 4
    assert max(abs(a - b) / abs(b) for a, b in zip(losses2, losses1)) <= 1e-5
    config = json.loads(open(tmp_path / "out" / "metrics.jsonl").readline())
    assert config["world_size"] == 2 and config["context_parallel"] == 2


def test_runner_context_parallel_arguments(tmp_path):
    from lla.experiments.runner import run_experiment

    with pytest.raises(ValueError, match="mqar and state"):
        run_experiment("icr", "smoke", out_dir=str(tmp_path), context_parallel=2)
    with pytest.raises(ValueError, match="divisor of the world size"):
        run_experiment("mqar", "smoke", mixers=["lla"], out_dir=str(tmp_path), context_parallel=2, progress=False)
