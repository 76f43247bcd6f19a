"""Triton backend entry point: argument preparation, launches, the autograd wrapper, fallbacks.

``lla_triton`` has the signature and return of ``lla.ops.torch_backend.lla_torch``:
``(o [B, T, H, Dv], lse [B, T, H] float32, iters, residual, amplification)``.

What runs where
---------------
* forward: ``lla_fwd_kernel`` (grid: query tiles x (batch, head)) -> o, x, m, lse.
* backward: ``lla_bwd_query_kernel`` (adjoint CG, dq, dlam, per-row u / gbar / Ps), then
  ``lla_bwd_key_kernel`` (grid: key tiles x (batch, key head)) -> dk, dv.  No atomics.
* saved for backward: x, m ``[B, T, H, D]`` float32 and the lse ``[B, T, H]``: ``O(T * H * D)``.

Transparent fallbacks to the PyTorch backend (same results, just not fused): float64 inputs,
``solver="direct"``, non-finite keys or values, head dims above 256, empty sequences.
"""

from __future__ import annotations

import torch
import triton

from . import kernels as _k

__all__ = ["lla_triton", "LLATritonFunction", "row_ranges", "block_config", "MAX_HEAD_DIM"]

#: largest head dim the kernels take (padded to a power of two up to this)
MAX_HEAD_DIM = 256


class _Cfg:
    __slots__ = ("scale", "max_iters", "tol", "precondition")

    def __init__(self, scale, max_iters, tol, precondition):
        self.scale, self.max_iters, self.tol, self.precondition = scale, max_iters, tol, precondition


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def block_config(D: int, Dv: int, dtype: torch.dtype) -> dict:
    """Tile sizes, warps and dot precision for head dims ``D``/``Dv`` (padded to powers of two).

    Returns ``BLOCK_D``, ``BLOCK_DV``, ``PREC`` and, per kernel (``fwd``, ``bwd_q``, ``bwd_k``),
    ``(BLOCK_M, BLOCK_N, num_warps)``.  float32 inputs use exact fp32 dots (``ieee``), half inputs
    TF32 dots with fp32 accumulation.  The tiles were chosen by compiling for sm_90 on a CPU machine
    and keeping the configurations with (nearly) no register spills (see docs/triton.md); they are
    not timed.  Under the interpreter the tiles are 16..32 (few, large numpy steps), different per kernel.
    """
    bd = max(16, triton.next_power_of_2(D))
    bdv = max(16, triton.next_power_of_2(Dv))
    widest = max(bd, bdv)
    if _interpreting():  # different tiles per kernel, so that CI sees tiles that do not line up
        fwd, bwd_q, bwd_k = (32, 32, 4), (16, 32, 4), (32, 16, 4)
    elif widest <= 16:
        fwd = bwd_q = bwd_k = (32, 32, 8)
    elif widest <= 32:
        fwd, bwd_q, bwd_k = (16, 32, 4), (16, 32, 4), (16, 32, 4)
    elif widest <= 64 and dtype != torch.float32:
        fwd, bwd_q, bwd_k = (32, 32, 8), (32, 32, 8), (16, 32, 8)
    elif widest <= 64:  # fp32 (ieee dots) needs more registers
        fwd, bwd_q, bwd_k = (16, 32, 8), (16, 32, 8), (16, 16, 8)
    elif widest <= 128 and dtype != torch.float32:
        fwd, bwd_q, bwd_k = (16, 32, 8), (16, 32, 8), (16, 16, 8)
    else:
        fwd = bwd_q = bwd_k = (16, 16, 8)
    prec = "ieee" if dtype == torch.float32 else "tf32"
    return dict(BLOCK_D=bd, BLOCK_DV=bdv, PREC=prec, fwd=fwd, bwd_q=bwd_q, bwd_k=bwd_k)


def _launch_args(bc: dict, which: str) -> dict:
    bm, bn, warps = bc[which]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bc["BLOCK_D"], BLOCK_DV=bc["BLOCK_DV"], PREC=bc["PREC"],
                num_warps=warps)


def row_ranges(T: int, S: int, window_size, cu_seqlens, device):
    """Visibility as ranges: query ``i`` sees keys ``lo[i] <= j <= hi[i]``; key ``j`` is seen by
    queries ``qlo[j] <= i <= qhi[j]``.  All int32 on ``device``; empty ranges have lo > hi.

    Bottom-right alignment (query ``i`` <-> key ``i + S - T``), flash-attn windows, and packed
    sequences (``cu_seqlens``, ``S == T``) each only seeing themselves.  Both bounds are
    non-decreasing in ``i``, so the queries that see a key form a range too.
    """
    i = torch.arange(T, device=device, dtype=torch.int64)
    diag = i + (S - T)
    left, right = window_size
    lo = torch.zeros(T, device=device, dtype=torch.int64)
    hi = torch.full((T,), S - 1, device=device, dtype=torch.int64)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        seg = torch.bucketize(i, cu[1:], right=True)
        lo = cu[seg]
        hi = cu[seg + 1] - 1
    if right >= 0:
        hi = torch.minimum(hi, diag + right)
    if left >= 0:
        lo = torch.maximum(lo, diag - left)
    lo = lo.clamp(0, S)
    hi = hi.clamp(-1, S - 1)
    j = torch.arange(S, device=device, dtype=torch.int64)
    qlo = torch.searchsorted(hi, j, right=False)  # first row whose range reaches key j
    qhi = torch.searchsorted(lo, j, right=True) - 1  # last row whose range starts at or before j
    return tuple(t.to(torch.int32).contiguous() for t in (lo, hi, qlo, qhi))


def _key_mean(k: torch.Tensor) -> torch.Tensor:
    """Per-head key mean ``kbar [B, Hk, D]`` float32; the kernels shift keys by it on load."""
    return torch.mean(k, dim=1, dtype=torch.float32).contiguous()


def _forward(q, k, v, lam, ranges, cfg):
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bc = block_config(D, Dv, q.dtype)
    kbar = _key_mean(k)
    lo, hi, _, _ = ranges
    dev = q.device
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=dev)
    X = torch.empty(B, T, H, D, dtype=torch.float32, device=dev)
    M = torch.empty_like(X)
    stat = torch.empty(B, T, H, 2, dtype=torch.float32, device=dev)  # row max, 1 / mass
    lse = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    res = torch.empty_like(lse)
    amp = torch.empty_like(lse)
    n_m = triton.cdiv(T, bc["fwd"][0])
    iters = torch.zeros(B * H * n_m, dtype=torch.int32, device=dev)
    _k.lla_fwd_kernel[(n_m, B * H)](
        q, k, v, kbar, lam, lo, hi,
        o, X, M, stat, lse, res, amp, iters,
        T, S, H, Hk, D, Dv, cfg.scale, cfg.tol, cfg.max_iters,
        PRECOND=cfg.precondition, **_launch_args(bc, "fwd"),
    )
    stats = torch.stack([iters.max().float(), res.max(), amp.max()]).double().cpu()
    return o, lse, stats, X, M, stat


def _backward(do, q, k, v, lam, X, M, stat, ranges, cfg):
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bc = block_config(D, Dv, q.dtype)
    kbar = _key_mean(k)
    lo, hi, qlo, qhi = ranges
    dev = q.device
    do = do.contiguous()
    dq = torch.empty_like(q)
    U = torch.empty(B, T, H, D, dtype=torch.float32, device=dev)
    gbar = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    ps = torch.empty_like(gbar)
    dlam = torch.empty_like(gbar)
    n_m = triton.cdiv(T, bc["bwd_q"][0])
    iters = torch.zeros(B * H * n_m, dtype=torch.int32, device=dev)
    _k.lla_bwd_query_kernel[(n_m, B * H)](
        q, k, v, kbar, lam, lo, hi, X, M, stat, do,
        dq, U, gbar, ps, dlam, iters,
        T, S, H, Hk, D, Dv, cfg.scale, cfg.tol, cfg.max_iters,
        PRECOND=cfg.precondition, **_launch_args(bc, "bwd_q"),
    )
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _k.lla_bwd_key_kernel[(triton.cdiv(S, bc["bwd_k"][1]), B * Hk)](
        q, k, v, kbar, lo, hi, qlo, qhi, X, M, stat, do, U, gbar, ps,
        dk, dv,
        T, S, H, Hk, D, Dv, cfg.scale,
        **_launch_args(bc, "bwd_k"),
    )
    return dq, dk, dv, dlam


class LLATritonFunction(torch.autograd.Function):
    """``(q, k, v, lam [B, T, H] float32, ranges, cfg) -> (o, lse, stats)``; stats = (iterations,
    worst relative residual, worst amplification) as a float64 CPU tensor, like the torch backend."""

    @staticmethod
    def forward(ctx, q, k, v, lam, ranges, cfg):
        o, lse, stats, X, M, stat = _forward(q, k, v, lam, ranges, cfg)
        ctx.save_for_backward(q, k, v, lam, X, M, stat, *ranges)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lse, stats)
        return o, lse, stats

    @staticmethod
    def backward(ctx, do, _dlse, _dstats):
        q, k, v, lam, X, M, stat, *ranges = ctx.saved_tensors
        dq, dk, dv, dlam = _backward(do, q, k, v, lam, X, M, stat, ranges, ctx.cfg)
        return dq, dk, dv, (dlam if ctx.needs_input_grad[3] else None), None, None


def _use_torch(q, k, v, solver) -> bool:
    if q.dtype == torch.float64 or solver == "direct":
        return True
    if q.shape[3] > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM or q.shape[1] == 0 or k.shape[1] == 0:
        return True
    return not bool(torch.isfinite(k).all() & torch.isfinite(v).all())


def lla_triton(q, k, v, lam, *, scale, window_size, cu_seqlens, solver, max_iters, tol, precondition):
    """Triton backend entry: ``(o [B, T, H, Dv], lse [B, T, H], iters, residual, amplification)``.

    ``lam [B, T, H]`` (any float dtype, possibly an expanded view) is differentiable.  See the module
    docstring for the cases handed to the PyTorch backend.
    """
    if _use_torch(q, k, v, solver):
        from ..torch_backend import lla_torch

        return lla_torch(
            q, k, v, lam, scale=scale, window_size=window_size, cu_seqlens=cu_seqlens, solver=solver,
            max_iters=max_iters, tol=tol, precondition=precondition,
        )
    T, S = q.shape[1], k.shape[1]
    ranges = row_ranges(T, S, tuple(window_size), cu_seqlens, q.device)
    cfg = _Cfg(float(scale), int(max_iters), float(tol), bool(precondition))
    lam32 = lam.float().contiguous()  # [B, T, H]; autograd casts dlam back to lam's dtype
    o, lse, stats = LLATritonFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), lam32, ranges, cfg)
    iters, resid, amp = stats.tolist()
    return o, lse, int(iters), resid, amp
