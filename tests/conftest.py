"""Shared fixtures: random inputs, the error metric and the tolerances every test uses, the repository's
paths, and the Triton-interpreter subprocess harness.

The tests are grouped by subject: ``lla/`` and ``parallax/`` (one folder per mechanism), ``common/`` (the
shared floor: varlen), ``nn/`` (the layers), ``numerics/``, ``integrations/`` (transformers,
torch.compile, distributed), ``experiments/`` (tasks, LM, generation, science, baselines) and ``tools/``
(the benchmark scripts).  Test files import these helpers with ``from conftest import ...`` (pytest puts
this folder on ``sys.path``; the interpreter case scripts add it themselves).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

#: ``tests/``, the repository root, and ``src/`` (put first on a subprocess's ``PYTHONPATH``)
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SRC = os.path.join(ROOT, "src")

# Keep CI (2 cores) predictable: tests are small, threads only add noise.
torch.set_num_threads(int(os.environ.get("LLA_TEST_THREADS", "2")))

#: relative-RMS tolerances against the float64 reference, per compute dtype
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> float:
    """Relative RMS error ``||a - b|| / ||b||`` in float64 (``fla``'s metric).

    ``atol`` is an absolute floor on the denominator, for quantities that are exactly zero in exact
    arithmetic (then the reference itself is rounding noise).
    """
    a, b = a.detach().double(), b.detach().double()
    den = max(b.norm().item(), atol)
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def make_qkv(B=1, T=16, H=2, D=16, S=None, Hk=None, Dv=None, dtype=torch.float64, seed=0, requires_grad=False, device="cpu"):
    """Random ``q [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` (float64 draw, then cast)."""
    S = T if S is None else S
    Hk = H if Hk is None else Hk
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    k = torch.randn(B, S, Hk, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    v = torch.randn(B, S, Hk, Dv, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


@pytest.fixture
def qkv():
    return make_qkv


def record_launches(monkeypatch, module, names):
    """Replace the Triton kernels ``names`` of ``module`` by recorders of their launch grids (nothing runs)
    -> the list the grids are appended to, in launch order."""
    grids = []

    class _Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *a, **kw: None

    for name in names:
        monkeypatch.setattr(module, name, _Recorder())
    return grids


# ------------------------------------------------------------------ Triton-interpreter subprocess harness
def subprocess_env(*paths, **extra):
    """``os.environ`` with ``src/`` (then ``paths``) first on ``PYTHONPATH``, plus ``extra`` variables."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, *paths, env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def case_names(script):
    """The cases a case script defines (its ``def case_<name>(`` functions)."""
    with open(script) as f:
        return {line[len("def case_"):].split("(")[0] for line in f if line.startswith("def case_")}


def run_interpreter_cases(script, cases, workers=1, timeout=900, **extra_env):
    """Run ``python SCRIPT CASE ...`` in ``workers`` fresh processes sharing ``cases`` (the script switches
    ``TRITON_INTERPRET=1`` on before it imports triton, which is why a fresh process is needed) ->
    ``{case: (ok, text)}`` from its ``OK <case> ...`` / ``FAIL <case> ...`` lines, plus ``"_raw"``:
    (every process exited 0, the tail of its output).  A case missing from the report did not run."""
    pytest.importorskip("triton")
    groups = [cases[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, script, *g], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(**extra_env), cwd=ROOT) for g in groups if g]
    report, raw, ok_all = {}, "", True
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        for line in out.splitlines():
            for tag, ok in (("OK ", True), ("FAIL ", False)):
                if line.startswith(tag):
                    name = line[len(tag):].split()[0].rstrip(":")
                    report[name] = (ok, line + ("" if ok else "\n" + err[-4000:]))
        raw += out[-2000:] + err[-4000:]
        ok_all &= proc.returncode == 0
    report["_raw"] = (ok_all, raw)
    return report


@pytest.fixture(scope="module")
def interp_report(request):
    """The interpreter cases of the requesting test module, run once per module: the module names its case
    script (``INTERP_SCRIPT``, a path), its cases (``CASES``) and optionally ``INTERP_WORKERS`` (processes,
    one thread each: the interpreter is single-threaded numpy) and ``INTERP_TIMEOUT`` (seconds)."""
    mod = request.module
    workers = getattr(mod, "INTERP_WORKERS", 1)
    extra = {"LLA_TEST_THREADS": "1"} if workers > 1 else {}
    return run_interpreter_cases(mod.INTERP_SCRIPT, list(mod.CASES), workers=workers,
                                 timeout=getattr(mod, "INTERP_TIMEOUT", 900), **extra)


def check_interpreted_case(report, case):
    """Assert that ``case`` reported, and reported OK (the shared body of ``test_interpreted_kernels``)."""
    assert case in report, f"case {case} did not report:\n{report['_raw'][1]}"
    ok, text = report[case]
    assert ok, text
