"""The Triton backend: kernels checked on CPU under the Triton interpreter, plus dispatch rules.

The kernel cases live in ``tests/lla/triton_interp_cases.py`` and run in two worker subprocesses
(``conftest.interp_report``: the interpreter must be switched on before triton is imported); each case
below reports its own line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lla
from lla.ops.common.policy import pick_backend
from lla.ops.common.masks import visible_mask
from conftest import ROOT, case_names, check_interpreted_case, record_launches, subprocess_env

HERE = os.path.dirname(os.path.abspath(__file__))
#: the interpreter harness (``conftest.interp_report``): two workers share the cases, so that both CI
#: cores work (the interpreter is single-threaded numpy)
INTERP_SCRIPT = os.path.join(HERE, "triton_interp_cases.py")
INTERP_WORKERS = 2
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
    "awkward_t1_t63_d80",
    "half_precision",
    "aux_and_solver_controls",
    "robustness",
    "outlier_key_locality",
    "tf32_rounding",
    "saturated_logits",
    "mixed_precision",
]


@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernels(interp_report, case):
    check_interpreted_case(interp_report, case)


def test_case_list_is_complete():
    assert case_names(INTERP_SCRIPT) == set(CASES)


# ---------------------------------------------------------------- dispatch (in-process, no interpreter)
def test_import_lla_does_not_import_triton():
    code = "import sys, lla; assert 'triton' not in sys.modules, 'lla imported triton'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_auto_backend_on_cpu_is_torch():
    q, k, v = (torch.randn(1, 12, 2, 16) for _ in range(3))
    assert pick_backend("auto", q) == "torch"
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
    from lla.ops.common.varlen import Varlen
    from lla.ops.lla.triton_backend.function import row_ranges

    cu_t = None if cu is None else torch.tensor(cu)
    mask = visible_mask(T, S, causal=causal, window_size=window, cu_seqlens=cu_t)  # [T, S]
    win = (window[0], 0 if causal else window[1])  # as the public op normalises it
    varlen = None if cu_t is None else Varlen(cu_t, cu_t)  # self-attention: one offsets tensor
    lo, hi, qlo, qhi = (t.long() for t in row_ranges(T, S, win, varlen, "cpu"))
    j = torch.arange(S)[None, :]
    i = torch.arange(T)[:, None]
    assert torch.equal((j >= lo[:, None]) & (j <= hi[:, None]), mask)
    assert torch.equal((i >= qlo[None, :]) & (i <= qhi[None, :]), mask)


def test_block_config_pads_head_dims():
    pytest.importorskip("triton")
    from lla.ops.lla.triton_backend.function import block_config

    for D, bd in [(8, 16), (16, 16), (48, 64), (64, 64), (100, 128), (256, 256)]:
        cfg = block_config(D, D, torch.bfloat16)
        assert cfg["BLOCK_D"] == bd and cfg["BLOCK_DV"] == bd
        assert cfg["PREC_QK"] == "tf32" and cfg["PREC"] == "tf32x3"  # exact-operand logits; ~fp32 elsewhere
        for dtype in (torch.float32, torch.float16):  # backward query tiles sit inside forward tiles
            c = block_config(D, D, dtype)
            assert c["bwd_q"][0] <= c["fwd"][0] and c["bwd_k"][0] <= c["fwd"][0]
    assert block_config(32, 32, torch.float32)["PREC"] == "ieee" == block_config(32, 32, torch.float32)["PREC_QK"]


def test_precision_choices():
    """``precision``: "auto" follows torch.get_float32_matmul_precision() for float32 inputs and is
    "mixed" for half inputs; "mixed" runs the CG iterations as bf16 / fp16 tensor-core products, the
    rest accurate (ieee for float32 inputs; TF32x3 and native half logits, all on tensor cores, for
    half inputs); unknown values raise."""
    pytest.importorskip("triton")
    from lla.ops.common.policy import triton_precision as resolve_precision
    from lla.ops.lla.triton_backend.function import block_config

    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert resolve_precision("auto", torch.float32) == "fp32"
        torch.set_float32_matmul_precision("high")
        assert resolve_precision("auto", torch.float32) == "mixed"
    finally:
        torch.set_float32_matmul_precision(old)
    assert resolve_precision("auto", torch.bfloat16) == "mixed" == resolve_precision("auto", torch.float16)
    assert resolve_precision("fp32", torch.bfloat16) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("tf32", torch.float32)
    for dtype, low, prec, qk in ((torch.float32, "bf16", "ieee", "ieee"), (torch.bfloat16, "bf16", "tf32x3", "bf16"),
                                 (torch.float16, "fp16", "tf32x3", "fp16")):
        c = block_config(64, 64, dtype, "mixed")
        assert c["MIXED"] and c["PREC_CG"] == c["PREC_CGQ"] == low and c["PREC_QK"] == qk and c["PREC"] == prec
        if dtype != torch.float32:
            assert "ieee" not in (c["PREC"], c["PREC_QK"], c["PREC_CG"], c["PREC_CGQ"])
    f = block_config(64, 64, torch.float32, "fp32")
    assert not f["MIXED"] and f["PREC"] == f["PREC_CG"] == "ieee"


def test_bench_gpu_dry_mode():
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--dry"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run ok" in proc.stdout


def test_launch_grids_fold_batch_and_heads_into_axis_0(monkeypatch):
    """B x H = 70000 (over CUDA's 65535 cap on grid axes 1 and 2): every launch the backend makes
    has a legal 1-D grid.  The kernels are replaced by recorders; nothing runs."""
    pytest.importorskip("triton")
    from lla.ops.lla.triton_backend import function as F

    grids = record_launches(monkeypatch, F._k, ("lla_fwd_kernel", "lla_bwd_query_kernel", "lla_bwd_key_kernel"))
    B, T, H, D = 35000, 3, 2, 16
    q = torch.zeros(B, T, H, D)
    k, v = torch.zeros(B, T, 1, D), torch.zeros(B, T, 1, D)
    lam = torch.ones(B, T, H)
    ranges = F.row_ranges(T, T, (-1, 0), None, "cpu")
    cfg = F._Cfg(0.25, 4, 1e-6, True)
    o, lse, stats, X, M, stat, shift = F._forward(q, k, v, lam, ranges, cfg)
    F._backward(torch.zeros_like(o), q, k, v, lam, X, M, stat, shift, ranges, cfg)
    assert len(grids) == 3
    for grid in grids:
        assert len(grid) == 1 and 1 <= grid[0] <= 2**31 - 1, grid
    assert grids[0][0] == B * H * triton_cdiv(T, F.block_config(D, D, q.dtype)["fwd"][0])
    assert grids[2][0] == B * 1 * triton_cdiv(T, F.block_config(D, D, q.dtype)["bwd_k"][1])
    with pytest.raises(ValueError, match="too many tiles"):
        F.launch_grid(2**20, 2**12)
    for shape in ((0, 4, 2, 16), (1, 4, 0, 16), (1, 0, 2, 16)):  # an empty grid is never launched
        z = torch.zeros(shape)
        assert F._use_torch(z, z, z, "cg")


def triton_cdiv(a, b):
    return -(-a // b)


def test_key_shifts_use_only_keys_every_row_of_the_tile_sees():
    """The per-tile key shift is the median of keys inside the tile's common visible range: moving
    any key outside that range leaves it bit-identical; a tile with no common key gets zero."""
    pytest.importorskip("triton")
    from lla.ops.lla.triton_backend.function import key_shifts, row_ranges

    T, D, bm = 40, 4, 16
    k = torch.randn(1, T, 1, D, generator=torch.Generator().manual_seed(3))
    for window in ((-1, 0), (5, 0), (3, 3)):
        lo, hi, _, _ = row_ranges(T, T, window, None, "cpu")
        c = key_shifts(k, lo, hi, bm)  # [1, 1, n_tiles, D]
        for t in range(c.shape[2]):
            rows = range(t * bm, min(T, (t + 1) * bm))
            common = set(range(T))
            for i in rows:
                common &= set(range(int(lo[i]), int(hi[i]) + 1))
            k2 = k.clone()
            outside = [j for j in range(T) if j not in common]
            k2[:, outside] *= 1e4
            assert torch.equal(key_shifts(k2, lo, hi, bm)[:, :, t], c[:, :, t]), (window, t)
            if not common:
                assert torch.count_nonzero(c[:, :, t]) == 0


def test_tile_tables_cover_every_head_dim_and_arch():
    """Every (tile family, padded head dim) has tiles for sm_90 and a choice for sm_80; the backward's
    query tiles sit inside the forward's; ``block_config`` follows the arch it is given and the launcher
    takes it from ``device_arch`` (``target_arch`` overrides it, as the compile check does)."""
    pytest.importorskip("triton")
    from lla.ops.lla.triton_backend import function as F
    from lla.ops.parallax import triton_backend as P
    from lla.ops.common.triton_utils import device_arch, smem_limit, target_arch

    for table in (F.TILES, P.TILES):
        for (kind, widest), per_arch in table.items():
            assert 90 in per_arch, (kind, widest)
            for arch, t in per_arch.items():
                assert set(t) == {"fwd", "bwd_q", "bwd_k"}
                for bm, bn, warps, stages in t.values():
                    assert bm >= 16 and bn >= 16 and warps in (1, 2, 4, 8, 16) and stages >= 1
                if table is F.TILES:
                    assert t["bwd_q"][0] <= t["fwd"][0] and t["bwd_k"][0] <= t["fwd"][0], (kind, widest, arch)
    for kind in ("fp32", "half", "lowp"):
        assert {w for (k, w) in F.TILES if k == kind} == {16, 32, 64, 128, 256}
    for D in (16, 48, 64, 100, 128, 200, 256):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for prec in ("fp32", "mixed", "authors"):
                for arch in (80, 86, 89, 90):
                    c = F.block_config(D, D, dtype, prec, arch)
                    assert len(c["fwd"]) == 4
            for arch in (80, 90):
                assert len(P.block_config(D, D, dtype, arch)["bwd_k"]) == 4
    # float32 inputs on "mixed" at a (head dim, arch) of MIXED_AS_FP32 run the fp32 scheme
    old = dict(F.MIXED_AS_FP32)
    try:
        F.MIXED_AS_FP32.clear()
        F.MIXED_AS_FP32[(256, 90)] = "test"
        assert F.launch_precision(256, 256, torch.float32, "mixed", 90) == ("fp32", "test")
        assert F.launch_precision(200, 64, torch.float32, "mixed", 90) == ("fp32", "test")
        assert F.launch_precision(256, 256, torch.float32, "mixed", 80) == ("mixed", None)
        assert F.launch_precision(128, 128, torch.float32, "mixed", 90) == ("mixed", None)
        assert F.launch_precision(256, 256, torch.bfloat16, "mixed", 90) == ("mixed", None)
        assert F.launch_precision(256, 256, torch.float32, "fp32", 90) == ("fp32", None)
    finally:
        F.MIXED_AS_FP32.clear()
        F.MIXED_AS_FP32.update(old)
    assert device_arch("cpu") == 90
    with target_arch(80):
        assert device_arch("cpu") == 80
        with target_arch(90):
            assert device_arch("cpu") == 90
        assert device_arch("cpu") == 80
    assert smem_limit(90) == 232_448 and smem_limit(80) == 166_912 and smem_limit(86) == 101_376


def test_unlaunchable_configuration_falls_back_with_one_warning(monkeypatch):
    """A (head dim, dtype, precision, arch) listed in ``UNSUPPORTED`` runs on the PyTorch backend, with
    one RuntimeWarning (per process) that says why, and the PyTorch backend's results."""
    pytest.importorskip("triton")
    import warnings

    from lla.ops.lla.torch_backend import lla_torch
    from lla.ops.lla.triton_backend import function as F
    from lla.ops.parallax import triton_backend as P
    from lla.ops.parallax.torch_backend import parallax_torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled path's check (not interpreted)
    monkeypatch.setattr(F, "UNSUPPORTED", {("fp32", 32, 90): "no tiles fit (test)"})
    monkeypatch.setattr(F, "_WARNED", set())
    q, k, v = (torch.randn(1, 12, 2, 24, generator=torch.Generator().manual_seed(i)) for i in range(3))
    lam = torch.full((1, 12, 2), 0.5)
    from lla.ops.lla.config import LLAConfig

    config = LLAConfig(scale=24 ** -0.5, window=(-1, 0), solver="cg", max_iters=64, tol=1e-6, precondition=True,
                       precision="fp32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o1 = F.lla_triton(q, k, v, lam, None, config)[0]
        o2 = F.lla_triton(q, k, v, lam, None, config)[0]
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no tiles fit (test)" in msgs[0] and "D=24" in msgs[0] and "sm_90" in msgs[0], msgs
    ref = lla_torch(q, k, v, lam, None, config)[0]
    assert torch.equal(o1, ref) and torch.equal(o2, ref)
    # another head dim is not listed: it would launch the kernels (CPU tensors, no interpreter: raises)
    q8, k8, v8 = (torch.randn(1, 12, 2, 80) for _ in range(3))
    with pytest.raises(Exception):
        F.lla_triton(q8, k8, v8, lam, None, config)

    monkeypatch.setattr(P, "UNSUPPORTED", {("fp32", 32, 90): "no tiles fit (test)"})
    monkeypatch.setattr(P, "_WARNED", set())
    r = torch.randn(1, 12, 2, 24)
    from lla.ops.parallax.config import ParallaxConfig

    pconfig = ParallaxConfig(scale=24 ** -0.5, window=(-1, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        po = P.parallax_triton(q, r, k, v, None, pconfig)[0]
        P.parallax_triton(q, r, k, v, None, pconfig)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no tiles fit (test)" in msgs[0], msgs
    assert torch.equal(po, parallax_torch(q, r, k, v, None, pconfig)[0])
