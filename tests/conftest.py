"""Shared fixtures: random inputs, the error metric and the tolerances every test uses."""

from __future__ import annotations

import os

import pytest
import torch

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
