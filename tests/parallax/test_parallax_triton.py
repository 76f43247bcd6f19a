"""Parallax Triton kernels, checked on CPU under the Triton interpreter (cases in
``tests/parallax/parallax_triton_cases.py``, run in ONE subprocess by ``conftest.interp_report`` since
the interpreter must be switched on before triton is imported), plus dispatch rules that need no kernel."""

from __future__ import annotations

import os

import pytest
import torch

from lla import parallax_attention
from conftest import case_names, check_interpreted_case, record_launches
from test_parallax import make_qrkv

HERE = os.path.dirname(os.path.abspath(__file__))
#: the interpreter harness (``conftest.interp_report``): one process, every case
INTERP_SCRIPT = os.path.join(HERE, "parallax_triton_cases.py")
INTERP_TIMEOUT = 600
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


@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernels(interp_report, case):
    check_interpreted_case(interp_report, case)


def test_case_list_is_complete():
    assert case_names(INTERP_SCRIPT) == set(CASES)


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


def test_parallax_launch_grids_fold_batch_and_heads_into_axis_0(monkeypatch):
    """B x H = 70000 (over CUDA's 65535 cap on grid axes 1 and 2): every Parallax launch has a legal 1-D
    grid (tiles x batch x heads on axis 0).  The kernels are replaced by recorders; nothing runs."""
    pytest.importorskip("triton")
    import triton

    from lla.ops.common.varlen import row_ranges
    from lla.ops.parallax import triton_backend as P

    grids = record_launches(monkeypatch, P, ("parallax_fwd_kernel", "parallax_bwd_query_kernel", "parallax_bwd_key_kernel"))
    B, T, H, D = 35000, 3, 2, 16
    q = torch.zeros(B, T, H, D)
    k, v = torch.zeros(B, T, 1, D), torch.zeros(B, T, 1, D)
    ranges = row_ranges(T, T, (-1, 0), None, "cpu")
    o, _lse, stat, ev, cv = P._forward(q, q, k, v, ranges, 0.25)
    P._backward(torch.zeros_like(o), q, q, k, v, stat, ev, cv, ranges, 0.25)
    assert len(grids) == 3
    for grid in grids:
        assert len(grid) == 1 and 1 <= grid[0] <= 2**31 - 1, grid
    bc = P.block_config(D, D, q.dtype)
    assert grids[0][0] == B * H * triton.cdiv(T, bc["fwd"][0])
    assert grids[2][0] == B * 1 * triton.cdiv(T, bc["bwd_k"][1])
