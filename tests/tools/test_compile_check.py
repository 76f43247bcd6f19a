"""The Triton kernels compile for the GPUs, as the launchers launch them, and fit (issue 25).

``benchmarks/compile_check.py --subset ci`` drives the LLA and Parallax launchers on CPU tensors with
the kernel launches intercepted, compiles every launch ahead of time for sm_90 and sm_80 with
Triton's bundled ptxas (no GPU needed) and fails on a compile error, on a kernel that needs more
shared memory than its arch has, on ptxas's low-register spill mode, and on more than 1 KB of spill
stores per thread at D <= 128 on sm_90 (``--strict``).  The subset: D 64 and 128, fp32 and bf16
inputs, sm_90 and sm_80, both mechanisms; LLA's two precisions for fp32 inputs and ``mixed`` (the
default) for bf16: 60 kernel compiles (the full table is in docs/triton.md).
It compiles in two processes, from a clean cache (as CI starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SRC

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled for a GPU target, not interpreted
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def ci_rows(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("cc") / "rows.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--subset", "ci",
                           "--jobs", "2", "--no-cache", "--strict", "--json", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=900, cwd=ROOT)
    rows = json.loads(out.read_text()) if out.exists() else []
    return proc, rows


def test_ci_subset_compiles_and_fits(ci_rows):
    proc, rows = ci_rows
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert rows, "no rows"
    import compile_check as cc

    # every configuration of the subset is there: three kernels each, or the stated fallback
    seen = {(r["mech"], r["arch"], r["D"], r["dtype"], r["precision"]) for r in rows}
    want = {(j[0], j[5], j[1], j[3], j[4]) for j in cc.jobs_for(list(cc.MECHS), *[cc.CI_SUBSET[k] for k in
                                                                               ("D", "dtypes", "archs")], (),
                                                                  cc.CI_SUBSET["precisions"])}
    assert len(want) == 20 and len(rows) == 60
    assert seen == want
    for r in rows:
        if r["status"] == "fallback":
            continue
        assert r["status"] in ("ok", "spill"), r
        assert r["smem"] <= cc.smem_limit(r["arch"]), r
        assert r["regs"] > 32 or r["spill_st"] == 0, r  # not ptxas's low-register spill mode
        if r["arch"] == 90:
            assert r["spill_st"] <= cc.MAX_SPILL, r
    # the tensor-core precisions really use tensor cores (bf16 inputs: every dot)
    for r in rows:
        if r["status"] != "fallback" and r["dtype"] == "bf16":
            assert r["mma"] + r["wgmma"] > 0, r


def test_capture_reproduces_real_specialisation():
    """The binder sees the launch's real argument types and divisibility: bf16 pointers typed bf16 and
    the 16-aligned ones flagged (what the old script got wrong)."""
    pytest.importorskip("triton")
    code = (
        "import sys, torch; sys.path.insert(0, 'benchmarks'); import compile_check as cc\n"
        "L = cc._lla_launches(64, 64, torch.bfloat16, 'mixed', 90)\n"
        "fn, a, kw = L[0]\n"
        "t, src, o = cc._specialise(fn, a, kw, 90)\n"
        "print(src.signature['Q'], src.signature['K'], src.signature['X'], src.signature['T'],"
        " sum(1 for v in src.attrs.values() if v), o.num_warps, len(L))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    q, k, x, t, n_attrs, warps, n = proc.stdout.split()
    assert (q, k, x, t) == ("*bf16", "*bf16", "*fp32", "i32")
    assert int(n_attrs) > 10  # pointers and T, S, D, ... divisible by 16
    assert int(n) == 3  # fwd, bwd_q, bwd_k
