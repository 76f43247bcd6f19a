"""The Triton backend: kernels checked on CPU under the Triton interpreter, plus dispatch rules.

The kernel cases live in ``tests/triton_interp_cases.py`` and run in ONE subprocess (the
interpreter must be switched on before triton is imported); each case below reports its own line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lla
from lla.ops.api import _pick_backend
from lla.ops.reference import visible_mask

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = [
    "causal_d16",
    "noncausal_d64",
    "gqa_cross_d48_padded",
    "s_lt_t_empty_rows",
    "noncausal_t_lt_s_gqa_h4",
    "windows",
    "varlen",
    "d128_padded_dv",
    "long_t100_d32",
    "half_precision",
    "aux_and_solver_controls",
    "robustness",
    "outlier_key_locality",
]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def interp_report():
    """Run every interpreter case once; ``{case: (ok, text)}``."""
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_interp_cases.py"), *CASES],
        capture_output=True, text=True, timeout=900, env=_env(), cwd=ROOT,
    )
    report = {}
    for line in proc.stdout.splitlines():
        for tag, ok in (("OK ", True), ("FAIL ", False)):
            if line.startswith(tag):
                name = line[len(tag):].split()[0].rstrip(":")
                report[name] = (ok, line + ("" if ok else "\n" + proc.stderr[-4000:]))
    report["_raw"] = (proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:])
    return report


@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernels(interp_report, case):
    assert case in interp_report, f"case {case} did not report:\n{interp_report['_raw'][1]}"
    ok, text = interp_report[case]
    assert ok, text


def test_case_list_is_complete():
    src = open(os.path.join(HERE, "triton_interp_cases.py")).read()
    defined = {line[len("def case_"):].split("(")[0] for line in src.splitlines() if line.startswith("def case_")}
    assert defined == set(CASES)


# ---------------------------------------------------------------- dispatch (in-process, no interpreter)
def test_import_lla_does_not_import_triton():
    code = "import sys, lla; assert 'triton' not in sys.modules, 'lla imported triton'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_auto_backend_on_cpu_is_torch():
    q, k, v = (torch.randn(1, 12, 2, 16) for _ in range(3))
    assert _pick_backend("auto", q) == "torch"
    o_auto = lla.local_linear_attention(q, k, v, solver="cg")
    o_torch = lla.local_linear_attention(q, k, v, solver="cg", backend="torch")
    assert torch.equal(o_auto, o_torch)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        lla.local_linear_attention(q, k, v, backend="triton")


@pytest.mark.parametrize(
    "T, S, causal, window, cu",
    [
        (9, 9, True, (-1, -1), None),
        (9, 9, False, (-1, -1), None),
        (10, 4, True, (-1, -1), None),  # first 6 rows see nothing
        (4, 10, True, (-1, -1), None),
        (7, 12, False, (2, 3), None),
        (12, 7, False, (1, 0), None),
        (13, 13, True, (3, -1), None),
        (11, 11, False, (0, 5), None),
        (10, 10, True, (-1, -1), [0, 3, 4, 10]),
        (10, 10, False, (2, 1), [0, 6, 10]),
    ],
)
def test_row_ranges_match_visible_mask(T, S, causal, window, cu):
    pytest.importorskip("triton")
    from lla.ops.triton_backend.function import row_ranges

    cu_t = None if cu is None else torch.tensor(cu)
    mask = visible_mask(T, S, causal=causal, window_size=window, cu_seqlens=cu_t)  # [T, S]
    win = (window[0], 0 if causal else window[1])  # as the public op normalises it
    lo, hi, qlo, qhi = (t.long() for t in row_ranges(T, S, win, cu_t, "cpu"))
    j = torch.arange(S)[None, :]
    i = torch.arange(T)[:, None]
    assert torch.equal((j >= lo[:, None]) & (j <= hi[:, None]), mask)
    assert torch.equal((i >= qlo[None, :]) & (i <= qhi[None, :]), mask)


def test_block_config_pads_head_dims():
    pytest.importorskip("triton")
    from lla.ops.triton_backend.function import block_config

    for D, bd in [(8, 16), (16, 16), (48, 64), (64, 64), (100, 128), (256, 256)]:
        cfg = block_config(D, D, torch.bfloat16)
        assert cfg["BLOCK_D"] == bd and cfg["BLOCK_DV"] == bd and cfg["PREC"] == "tf32"
    assert block_config(32, 32, torch.float32)["PREC"] == "ieee"


def test_bench_gpu_dry_mode():
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--dry"],
        capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run ok" in proc.stdout
