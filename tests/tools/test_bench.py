"""``lla bench`` harness: tiny runs in subprocesses, checking the outputs' structure (no timing asserts).
(The multi-tile checks of the tuned PyTorch backend paths are in ``tests/lla/test_core.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SRC

from lla import bench


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_cpu.py"), *args, "--out", str(tmp_path), "--threads", "1"]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert cp.returncode == 0, cp.stderr[-2000:]
    return cp.stdout


def test_bench_tiny_grid_outputs(tmp_path):
    out = _run(["--T", "48", "--D", "16", "--ridge", "0.5", "--modes", "fwdbwd", "--providers", "lla-cg", "lla-mixed",
                "sdpa", "--repeats", "1"], tmp_path)
    assert "targets" in out and "T1" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    res = data["results"]
    assert {(r["provider"], r["mode"]) for r in res} == {("lla-cg", "fwdbwd"), ("lla-mixed", "fwdbwd"), ("sdpa", "fwdbwd")}
    for r in res:
        assert not r.get("error"), r
        assert r["ms"] > 0 and r["gflops"] > 0 and r["T"] == 48 and r["D"] == 16 and r["H"] == 8
        assert r["peak_mib"] is None or r["peak_mib"] >= 0
        if r["provider"] == "sdpa":
            assert r["rel_err"] is None
        else:
            assert r["ratio"] > 0 and r["sdpa_ms"] > 0
            assert r["iters"] >= 1 and r["solver"] == "cg"
            assert 0 <= r["rel_err"] < 1e-4 and r["err_rows"] >= 2  # computed against the float64 reference
            assert r["work"] > 0  # the solves' matvec work, counted by the backend (forward and adjoint)
    assert next(r for r in res if r["provider"] == "lla-mixed")["precision"].startswith("mixed")
    assert {t["target"] for t in data["targets"]} == {"T1", "T2", "T3", "T4", "T5"}
    md = (tmp_path / "bench.md").read_text()
    assert "| provider | mode |" in md and "FLOP formulas" in md and "| precision |" in md
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_run_point_batch_and_heads():
    """--batch / --heads reach the point: shapes recorded, FLOPs scale with B * H, error still checked."""
    one = bench.run_point("sdpa", "fwdbwd", 16, 8, 1.0, repeats=1, threads=1)
    many = bench.run_point("sdpa", "fwdbwd", 16, 8, 1.0, repeats=1, threads=1, B=3, heads=2)
    assert (one["B"], one["H"], many["B"], many["H"]) == (1, 8, 3, 2)
    assert many["flops"] == pytest.approx(one["flops"] * 3 * 2 / 8)
    r = bench.run_point("lla-cg", "fwdbwd", 16, 8, 1.0, repeats=1, threads=1, B=3, heads=2)
    assert r["B"] == 3 and 0 <= r["rel_err"] < 1e-4


def test_flops_count_the_work_the_solves_ran():
    """GFLOP/s from the row-key products the backend counted, not from the slowest row's iterations."""
    r = bench.run_point("lla-cg", "fwd", 64, 8, 1.0, repeats=1, threads=1, heads=2)
    P = 2 * 64 * 65 / 2
    assert r["work"] > 0 and r["flops"] == pytest.approx(P * 8 * 8 + 4 * 8 * r["work"])
    # plain fp32 CG: the work is what the tile's rows ran, at most rows x keys per iteration of the slowest
    f = bench.run_point("lla-fp32", "fwd", 256, 8, 1.0, repeats=0, threads=1, heads=1)
    assert f["precision"] == "fp32" and 0 < f["work"] <= f["iters"] * 256 * 256
    assert f["work"] < 0.9 * f["iters"] * 256 * 256  # rows that converge early drop out


@pytest.mark.parametrize("provider", ["ref", "lla-direct", "lla-cg"])
def test_run_point_in_process(provider):
    """Forward points in process: errors against the float64 reference, iterations, FLOPs."""
    r = bench.run_point(provider, "fwd", 24, 8, 1.0, repeats=1, threads=1)
    assert 0 <= r["rel_err"] < 1e-5 and r["ms"] > 0 and r["flops"] > 0
    assert (r["iters"] >= 1) == (provider == "lla-cg")


def test_targets_summary_logic():
    rec = lambda **kw: dict(dict(provider="lla-auto", D=64, rel_err=1e-5, iters=8, solver="cg", peak_mib=100.0), **kw)
    res = [
        dict(provider="sdpa", mode="fwd", T=4096, D=64, ms=100.0),
        rec(mode="fwd", T=4096, ridge=1.0, ms=790.0),
        rec(mode="fwd", T=4096, ridge=0.01, ms=1250.0),
        rec(mode="fwd", T=2048, ridge=1.0, ms=100.0),
        rec(mode="fwd", T=16384, ridge=1.0, ms=100.0 * 70, peak_mib=300.0),
    ]
    bench._add_ratios(res)
    got = {t["target"]: t["met"] for t in bench.targets_summary(res)}
    assert got == {"T1": True, "T2": None, "T3": False, "T4": None, "T5": False}
