"""``torch.library`` registration of the LLA op, so that ``torch.compile(fullgraph=True)`` sees one
opaque node (with a fake implementation for shapes and an autograd formula) instead of the
backend's Python loops and data-dependent branches.

``lla.local_linear_attention`` routes here (``api._dispatch``) when ``torch.compiler.is_compiling()``;
the eager path does not touch this module.  Both custom ops run the PyTorch backend's plain functions
(``lla_forward`` / ``lla_backward``), so compiled and eager results agree to rounding.

    lla::fwd(q, k, v, ridge, cu_seqlens_q?, ..., cu_seqlens_k?) -> (o [B,T,H,Dv], lse [B,T,H], x,
                                                                  m [B,Hk,G,T,D], lse_c [B,Hk,G,T])
    lla::bwd(do, q, k, v, ridge, x, m, lse_c, cu_seqlens_q?, ..., cu_seqlens_k?) -> (dq, dk, dv, dridge [B,T,H])

``cu_seqlens_q`` are the packed query offsets, ``cu_seqlens_k`` the key offsets (None: the same).  The
checks that read values (offsets, ridge > 0: ``lla.ops.common.checks``) run inside ``lla::fwd``, where the
values exist.  What compiled calls give up: the convergence / conditioning warnings and the
``LLAAux`` counters (they need host reads of data); ``return_aux=True`` still returns ``lse``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..common.checks import check_ridge_values, check_varlen_values
from ..common.diagnostics import default_max_iters, default_tol
from ..common.policy import resolve_solver
from ..common.varlen import Varlen, longest_keys, segments, varlen_of, with_queries
from .torch_backend import function as _tb

__all__ = ["lla_compiled"]


def _cfg(scale, window_left, window_right, solver, max_iters, tol, precondition, precision, ridge, q, keys):
    """The backend's ``_Cfg``, with ``solver="auto"`` and ``precision="auto"`` resolved as the eager op
    resolves them (by ``keys``, the longest packed key sequence)."""
    if solver == "auto":
        ridge_min = float(ridge.detach().min()) if ridge.numel() else 1.0
        solver = resolve_solver("auto", ridge_min, q.shape[-1], q.dtype, S=keys)
    precision = _tb.resolve_precision(precision, q.dtype, q.device, keys)
    return _tb._Cfg(scale, (window_left, window_right), solver, max_iters, tol, precondition, precision=precision)


@torch.library.custom_op("lla::fwd", mutates_args=())
def _fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ridge: Tensor,
    cu_seqlens_q: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    solver: str,
    max_iters: int,
    tol: float,
    precondition: bool,
    precision: str,
    cu_seqlens_k: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_ridge_values(ridge)
    varlen = varlen_of(cu_seqlens_q, cu_seqlens_k)
    T, S = q.shape[1], k.shape[1]
    segs = segments(None, T, S) if varlen is None else check_varlen_values(varlen, T, S)
    cfg = _cfg(scale, window_left, window_right, solver, max_iters, tol, precondition, precision, ridge, q,
               longest_keys(segs))
    outs = _fwd_fake(q, k, v, ridge, cu_seqlens_q, scale, window_left, window_right, solver, max_iters, tol, precondition,
                     precision)
    o, lse, X, M, LSE = (t.zero_() for t in outs)
    lse.fill_(float("-inf"))
    LSE.fill_(float("-inf"))
    for sq, sk in with_queries(segs):
        o[:, sq], lse[:, sq], _stats, X[..., sq, :], M[..., sq, :], LSE[..., sq] = _tb.lla_forward(
            q[:, sq], k[:, sk], v[:, sk], ridge[:, sq], cfg)
    return o, lse, X, M, LSE


@_fwd.register_fake
def _fwd_fake(q, k, v, ridge, cu_seqlens_q, scale, window_left, window_right, solver, max_iters, tol, precondition,
              precision, cu_seqlens_k=None):
    B, T, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = q.new_empty(B, T, H, Dv)
    lse = q.new_empty(B, T, H, dtype=torch.float32)
    X = q.new_empty(B, Hk, H // Hk, T, D, dtype=cdt)
    M = q.new_empty(B, Hk, H // Hk, T, D, dtype=cdt)
    LSE = q.new_empty(B, Hk, H // Hk, T, dtype=cdt)
    return o, lse, X, M, LSE


@torch.library.custom_op("lla::bwd", mutates_args=())
def _bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ridge: Tensor,
    X: Tensor,
    M: Tensor,
    LSE: Tensor,
    cu_seqlens_q: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    solver: str,
    max_iters: int,
    tol: float,
    precondition: bool,
    precision: str,
    cu_seqlens_k: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    varlen = varlen_of(cu_seqlens_q, cu_seqlens_k)
    segs = segments(varlen, q.shape[1], k.shape[1])
    cfg = _cfg(scale, window_left, window_right, solver, max_iters, tol, precondition, precision, ridge, q,
               longest_keys(segs))
    if varlen is None:
        grads = _tb.lla_backward(do, q, k, v, ridge, X, M, LSE, cfg, True)
        return tuple(g.contiguous() for g in grads)  # the fake's strides
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dridge = ridge.new_zeros(ridge.shape)
    for sq, sk in with_queries(segs):
        g = _tb.lla_backward(do[:, sq], q[:, sq], k[:, sk], v[:, sk], ridge[:, sq], X[..., sq, :], M[..., sq, :],
                             LSE[..., sq], cfg, True)
        dq[:, sq], dridge[:, sq] = g[0], g[3]
        dk[:, sk] += g[1]
        dv[:, sk] += g[2]
    return dq, dk, dv, dridge


@_bwd.register_fake
def _bwd_fake(do, q, k, v, ridge, X, M, LSE, cu_seqlens_q, scale, window_left, window_right, solver, max_iters, tol,
              precondition, precision, cu_seqlens_k=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ridge.new_empty(ridge.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, ridge, cu_seqlens_q, *config, cu_seqlens_k = inputs
    _o, _lse, X, M, LSE = output
    ctx.save_for_backward(q, k, v, ridge, X, M, LSE, cu_seqlens_q, cu_seqlens_k)
    ctx.config = config


def _backward(ctx, do, _dlse, _dx, _dm, _dlse_c):
    q, k, v, ridge, X, M, LSE, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv, dridge = _bwd(do.contiguous(), q, k, v, ridge, X, M, LSE, cu_seqlens_q, *ctx.config, cu_seqlens_k)
    return dq, dk, dv, dridge, None, None, None, None, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def lla_compiled(q, k, v, ridge, varlen: Varlen | None, *, scale, window_size, solver, max_iters, tol,
                 precondition, precision="auto"):
    """The op through the custom op: ``(o [B, T, H, Dv], lse [B, T, H])``.

    Arguments as the public op's ``_dispatch`` takes them, their types and shapes already checked
    (``ridge [B, T, H]``, ``varlen`` with int64 offsets or None); ``solver`` and
    ``precision`` may still be ``"auto"`` and ``max_iters`` / ``tol`` None (resolved here and inside the
    op, where the ridge's values and the packed lengths can be read, by the eager op's rules).
    """
    if max_iters is None:
        max_iters = default_max_iters(q.dtype, q.shape[-1])
    if tol is None:
        tol = default_tol(q.dtype)
    cu_seqlens_q, cu_seqlens_k = (None, None) if varlen is None else varlen[:2]
    same = cu_seqlens_k is cu_seqlens_q
    o, lse, _x, _m, _lse_c = _fwd(
        q, k, v, ridge, cu_seqlens_q, float(scale), int(window_size[0]), int(window_size[1]), solver, int(max_iters),
        float(tol), bool(precondition), str(precision), None if same else cu_seqlens_k,
    )
    return o, lse
