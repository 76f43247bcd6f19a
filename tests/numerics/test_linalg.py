"""``lla.ops.common.linalg.solve``: batched LU solves that neither hang nor fail on the CPU (MKL's batched LU at
n > 150 with several threads: pytorch/pytorch#142815, #141358), and every caller that needed it.

The wide cases run in a subprocess with a timeout, so that a regression (a hang inside MKL) fails the
test instead of stalling the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lla.ops.common import linalg

_WIDE = textwrap.dedent("""
    import sys, torch, lla
    from lla.ops.common import linalg
    from lla.baselines.mesa import mesa_attention, mesa_attention_naive
    if len(sys.argv) > 1:
        linalg.MKL_BATCHED_LU_MAX_N = int(sys.argv[1])  # the test's check that the hang is real
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    n = 160
    A = torch.randn(4, n, n, dtype=torch.float64, generator=g)
    A = (A @ A.mT / n + torch.eye(n, dtype=torch.float64)).requires_grad_()
    B = torch.randn(4, n, 2, dtype=torch.float64, generator=g)
    X = linalg.solve(A, B)
    X1 = torch.stack([torch.linalg.solve(a, b) for a, b in zip(A.detach(), B)])
    assert torch.equal(X.detach(), X1), "not the per-matrix LU solve"
    assert float((A.detach() @ X.detach() - B).abs().max()) < 1e-10
    (gA,) = torch.autograd.grad(X.square().sum(), A)
    assert torch.isfinite(gA).all() and gA.abs().max() > 0
    Xb = linalg.solve(A.detach()[:1], B)  # broadcast batch: one A for four right-hand sides
    assert Xb.shape == (4, n, 2) and float((A.detach()[0] @ Xb - B).abs().max()) < 1e-10

    D = 160  # the float64 reference (T * H = 3 systems) against the op's Cholesky solve in float64
    q, k, v = (torch.randn(1, 3, 1, D, dtype=torch.float64, generator=g) for _ in range(3))
    ref = lla.local_linear_attention_ref(q, k, v, ridge=1.0)
    out = lla.local_linear_attention(q, k, v, ridge=1.0, solver="direct", backend="torch")
    assert float((ref - out).abs().max()) < 1e-10, float((ref - out).abs().max())

    q, k, v = (torch.randn(1, 4, 1, D, dtype=torch.float64, generator=g) for _ in range(3))
    a, b = mesa_attention(q, k, v, ridge=1.0, chunk_size=2), mesa_attention_naive(q, k, v, ridge=1.0)
    assert float((a - b).abs().max()) < 1e-10, float((a - b).abs().max())
    print("OK")
""")


def _run_wide(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-c", _WIDE, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_wide_batched_solves_finish_and_match():
    res = _run_wide()
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the hang is MKL's")
def test_plain_batched_lu_is_what_fails():
    """Without the per-matrix path (threshold lifted), the same script fails or hangs: the guard is needed."""
    try:
        res = _run_wide(str(10**9), timeout=20)
    except subprocess.TimeoutExpired:
        return
    assert res.returncode != 0, "batched LU at n = 160 with 2 threads no longer fails: drop the workaround?"


def test_narrow_or_single_thread_is_plain_torch_solve():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 3, 16, 16, dtype=torch.float64, generator=g) + 8 * torch.eye(16, dtype=torch.float64)
    B = torch.randn(5, 3, 16, 4, dtype=torch.float64, generator=g)
    assert not linalg._batched_lu_at_risk(A)
    assert torch.equal(linalg.solve(A, B), torch.linalg.solve(A, B))
    wide = torch.zeros(2, 151, 151)
    assert linalg._batched_lu_at_risk(wide) == (torch.get_num_threads() > 1 and torch.backends.mkl.is_available())
    assert not linalg._batched_lu_at_risk(wide[0]) and not linalg._batched_lu_at_risk(torch.zeros(2, 150, 150))
