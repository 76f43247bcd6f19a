"""``torch.library`` registration of the LLA op, so that ``torch.compile(fullgraph=True)`` sees one
opaque node (with a fake implementation for shapes and an autograd formula) instead of the
backend's Python loops and data-dependent branches.

``lla.local_linear_attention`` routes here when ``torch.compiler.is_compiling()``; the eager path
does not touch this module.  Both custom ops run the PyTorch backend's plain functions
(``lla_forward`` / ``lla_backward``), so compiled and eager results agree to rounding.

    lla::fwd(q, k, v, lam, cu_seqlens?, ...) -> (o [B,T,H,Dv], lse [B,T,H], x, m [B,Hk,G,T,D], lse_c [B,Hk,G,T])
    lla::bwd(do, q, k, v, lam, x, m, lse_c, cu_seqlens?, ...) -> (dq, dk, dv, dlam [B,T,H])

What compiled calls give up: the convergence / conditioning warnings and the ``LLAAux`` counters
(they need host reads of data); ``return_aux=True`` still returns ``lse``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .api import resolve_solver
from .torch_backend import function as _tb

__all__ = ["lla_compiled"]


def _cfg(scale, window_left, window_right, solver, max_iters, tol, precondition, lam, D, dtype, S):
    if solver == "auto":
        solver = resolve_solver("auto", float(lam.detach().min()) if lam.numel() else 1.0, D, dtype, S=S)
    return _tb._Cfg(scale, (window_left, window_right), solver, max_iters, tol, precondition)


def _segments(cu_seqlens, T):
    if cu_seqlens is None:
        return [(0, T)]
    c = cu_seqlens.tolist()
    return list(zip(c, c[1:]))


@torch.library.custom_op("lla::fwd", mutates_args=())
def _fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Tensor,
    cu_seqlens: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    solver: str,
    max_iters: int,
    tol: float,
    precondition: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = _cfg(scale, window_left, window_right, solver, max_iters, tol, precondition, lam, q.shape[-1], q.dtype, k.shape[1])
    parts = []
    for a, b in _segments(cu_seqlens, q.shape[1]):
        sl = slice(a, b)
        o, lse, _stats, X, M, LSE = _tb.lla_forward(q[:, sl], k[:, sl] if cu_seqlens is not None else k,
                                                     v[:, sl] if cu_seqlens is not None else v, lam[:, sl], cfg)
        parts.append((o, lse, X, M, LSE))
    if len(parts) == 1:
        return tuple(t.contiguous() for t in parts[0])
    o, lse, X, M, LSE = zip(*parts)
    return tuple(t.contiguous() for t in (torch.cat(o, 1), torch.cat(lse, 1), torch.cat(X, 3), torch.cat(M, 3), torch.cat(LSE, 3)))


@_fwd.register_fake
def _fwd_fake(q, k, v, lam, cu_seqlens, scale, window_left, window_right, solver, max_iters, tol, precondition):
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
    lam: Tensor,
    X: Tensor,
    M: Tensor,
    LSE: Tensor,
    cu_seqlens: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    solver: str,
    max_iters: int,
    tol: float,
    precondition: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = _cfg(scale, window_left, window_right, solver, max_iters, tol, precondition, lam, q.shape[-1], q.dtype, k.shape[1])
    if cu_seqlens is None:
        grads = _tb.lla_backward(do, q, k, v, lam, X, M, LSE, cfg, True)
        return tuple(g.contiguous() for g in grads)  # the fake's strides
    parts = []
    for a, b in _segments(cu_seqlens, q.shape[1]):
        sl = slice(a, b)
        parts.append(_tb.lla_backward(do[:, sl], q[:, sl], k[:, sl], v[:, sl], lam[:, sl],
                                      X[:, :, :, sl], M[:, :, :, sl], LSE[:, :, :, sl], cfg, True))
    return tuple(torch.cat(g, 1).contiguous() for g in zip(*parts))


@_bwd.register_fake
def _bwd_fake(do, q, k, v, lam, X, M, LSE, cu_seqlens, scale, window_left, window_right, solver, max_iters, tol, precondition):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), lam.new_empty(lam.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, lam, cu_seqlens, *config = inputs
    _o, _lse, X, M, LSE = output
    ctx.save_for_backward(q, k, v, lam, X, M, LSE, cu_seqlens)
    ctx.config = config


def _backward(ctx, do, _dlse, _dx, _dm, _dlse_c):
    q, k, v, lam, X, M, LSE, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dlam = _bwd(do.contiguous(), q, k, v, lam, X, M, LSE, cu_seqlens, *ctx.config)
    return dq, dk, dv, dlam, None, None, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def lla_compiled(q, k, v, lam, cu_seqlens, *, scale, window_size, solver, max_iters, tol, precondition):
    """The op through the custom op: ``(o [B, T, H, Dv], lse [B, T, H])``.

    Arguments as ``lla.ops.lla.torch_backend.lla_torch`` takes them, already checked by the public op;
    ``solver`` may still be ``"auto"`` and ``max_iters`` / ``tol`` None (resolved here and inside
    the op, where the ridge's values can be read).
    """
    if max_iters is None:
        max_iters = 4 * q.shape[-1] if q.dtype == torch.float64 else 2 * q.shape[-1]
    if tol is None:
        tol = 1e-11 if q.dtype == torch.float64 else 1e-6
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int64)
    o, lse, _x, _m, _lse_c = _fwd(
        q, k, v, lam, cu_seqlens, float(scale), int(window_size[0]), int(window_size[1]), solver, int(max_iters),
        float(tol), bool(precondition),
    )
    return o, lse
