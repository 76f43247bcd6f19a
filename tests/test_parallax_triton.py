"""Parallax Triton kernels, checked on CPU under the Triton interpreter (cases in
``tests/parallax_triton_cases.py``, run in ONE subprocess since the interpreter must be switched on
before triton is imported), plus dispatch rules that need no kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lla import parallax_attention
from test_parallax import make_qrkv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = [
    "causal_gqa_d16",
    "noncausal_s_ne_t_d48_padded",
    "s_lt_t_empty_rows_d80",
    "t1_decode_shape",
    "windows",
    "varlen",
    "long_t100",
    "half_precision",
    "half_rk_offset",
    "rk_offset_centring",
    "huge_invisible_key",
]


@pytest.fixture(scope="module")
def interp_report():
    pytest.importorskip("triton")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "parallax_triton_cases.py"), *CASES],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
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
    src = open(os.path.join(HERE, "parallax_triton_cases.py")).read()
    defined = {line[len("def case_"):].split("(")[0] for line in src.splitlines() if line.startswith("def case_")}
    assert defined == set(CASES)


def test_triton_backend_needs_cuda_or_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter on in this process")
    x = make_qrkv(T=4, H=2, D=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        parallax_attention(*x, backend="triton")


def test_dot_precision_choices():
    """The measured choices (docs/parallax.md): exact fp32 dots for fp32; TF32 for the raw-input dots
    of half inputs; tf32x3 wherever plain TF32 raised the emulated error (the query-gradient kernel
    always, every kernel for fp16)."""
    pytest.importorskip("triton")
    from lla.ops.parallax.triton_backend import block_config

    fp32 = block_config(64, 64, torch.float32)
    assert fp32["PREC_QK"] == "ieee" and set(fp32["PREC"].values()) == {"ieee"}
    for dtype, fwd_bwd_k in ((torch.float16, "tf32x3"), (torch.bfloat16, "tf32")):
        cfg = block_config(48, 20, dtype)
        assert cfg["PREC_QK"] == "tf32"
        assert cfg["PREC"] == dict(fwd=fwd_bwd_k, bwd_q="tf32x3", bwd_k=fwd_bwd_k)
