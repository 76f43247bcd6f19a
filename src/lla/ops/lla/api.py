"""The public op: argument checks, defaults, backend dispatch and the aux structure."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..common.checks import (
    check_bool, check_choice, check_qkv, check_ridge, check_scale, check_solver_options, check_varlen, check_window,
)
from ..common.policy import PRECISIONS, pick_backend, resolve_solver
from ..common.varlen import Varlen
from .config import LLAConfig
from ..common.diagnostics import LLAConvergenceWarning, check_conditioning, check_solve, default_max_iters, default_tol

__all__ = ["local_linear_attention", "LLAAux", "LLAConvergenceWarning"]


class LLAAux(NamedTuple):
    """What a call reports besides its output.

    iters:    CG iterations of the slowest row (0 for the direct solver).
    residual: worst *true* relative residual ``||A x - b|| / ||b||`` of the forward solve over all
              rows, measured at exit with one more matvec (``A`` the ridge-regularised key
              covariance, see ``lla.ops.lla.torch_backend``).  In float32 it cannot go below a rounding
              floor of about ``eps * cond(A)``; the op warns when it exceeds ``RESIDUAL_FACTOR``
              times the larger of ``tol`` and that floor (``lla.ops.common.diagnostics.check_solve``).
    lse:      softmax log-sum-exp of the scaled logits, ``[B, T, H]`` float32 (``-inf`` for a row
              that sees no key).
    solver:   the solver that ran ("cg" or "direct").
    amplification: a rounding-error magnifier, worst over rows: the estimated relative error of the
              output is ``amplification * eps(compute dtype)`` (terms: the possibly negative
              equivalent weights, logit rounding, forming ``y . x``, the solve, the right-hand
              side; see ``torch_backend.function._amplification``).  The op warns when that
              estimate exceeds ``diagnostics.CONDITIONING_THRESHOLD``.  NaN when a backend does not
              report it.
    precision: what the forward's solve ran in: "fp64", "fp32", "mixed" (bf16 matvecs refined to
              the fp32 tolerance) or "mixed+fp32 (N rows)" (N rows stalled in bf16 and finished in
              fp32); "" when a backend does not report it.
    """

    iters: int
    residual: float
    lse: torch.Tensor
    solver: str
    amplification: float = float("nan")
    precision: str = ""


def _backend_fn(name: str):
    """The backend entry for ``name``: ``fn(q, k, v, ridge, varlen, config) -> (o, BackendResult)``."""
    if name == "torch":
        from .torch_backend import lla_torch

        return lla_torch
    from .triton_backend import lla_triton

    return lla_triton


def local_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ridge=1.0,
    scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    solver: str = "auto",
    max_iters: int | None = None,
    tol: float | None = None,
    precondition: bool = True,
    precision: str = "auto",
    backend: str = "auto",
    return_aux: bool = False,
):
    """Local Linear Attention (Zuo et al., 2026): the intercept of a softmax-weighted local ridge fit.

    Args:
        q: ``[B, T, H, D]`` queries (packed: ``[1, total_q, H, D]``).
        k: ``[B, S, Hk, D]`` keys (packed: ``[1, total_k, Hk, D]``); ``H % Hk == 0`` (grouped-query:
            query head ``h`` reads key head ``h // (H // Hk)``).
        v: ``[B, S, Hk, Dv]`` values.
        ridge: penalty on the local slope ``W``: a float or a tensor broadcastable to ``[B, T, H]``
            (scalar, per head ``[H]``, per position ``[B, T, H]``), > 0, differentiable.  It is
            added to the softmax-weighted key covariance, so it has the units of ``|k|^2``:
            scaling queries and keys by ``c`` (and the logit scale by ``1 / c^2``) gives the same
            output with the ridge times ``c^2``; at a fixed ridge, larger keys mean a relatively
            weaker penalty (more local-linear, worse conditioned) and smaller keys a stronger one
            (closer to softmax attention).
        scale: logit scale, default ``1 / sqrt(D)``.  ``0`` gives flat weights.
        causal: bottom-right aligned causal mask (query ``i`` sees keys ``j <= i + S - T``).  A query
            that sees no key outputs zeros.
        window_size: ``(left, right)``, flash-attn semantics, ``-1`` unbounded.
        cu_seqlens_q, cu_seqlens_k: ``[N + 1]`` int32/int64 offsets of ``N`` packed sequences
            (flash-attn's varlen; ``B == 1``, given together): sequence ``n`` is queries
            ``cu_seqlens_q[n]:cu_seqlens_q[n + 1]`` against keys ``cu_seqlens_k[n]:cu_seqlens_k[n + 1]``
            and sees nothing else.  ``causal`` and ``window_size`` apply per sequence, bottom-right
            aligned on each (its last query sees its last key), so a sequence with more keys than
            queries is a prefill against a cached prefix.  Sequences may be empty.
        cu_seqlens: the self-attention shorthand, ``cu_seqlens_q = cu_seqlens_k = cu_seqlens`` (``S == T``).
        max_seqlen_q, max_seqlen_k: optional, flash-attn's longest query / key sequence; checked
            (a value below the real longest is a ``ValueError``), not needed.
        solver: ``"cg"`` (matrix-free preconditioned conjugate gradient), ``"direct"`` (tile-wise
            moments + batched Cholesky, exact at any ridge) or ``"auto"`` (see ``resolve_solver``).
        max_iters: CG iteration cap (default ``diagnostics.default_max_iters``: ``2 D``, ``4 D`` in
            float64).
        tol: relative-residual tolerance per row (default ``diagnostics.default_tol``: 1e-6 for
            float32/bf16/fp16 inputs, 1e-11 in float64).  A CG row also stops once its residual
            reaches the rounding floor of the working precision (no iteration is spent below it).
        precondition: precondition CG with the per-row Jacobi diagonal.
        precision: CG arithmetic for float32 / bf16 / fp16 inputs: ``"fp32"``, ``"mixed"`` (bf16
            matvecs inside the solve, fp32 residuals and refinement: the same tolerance on the fp32
            true residual, rows where it stalls finish in fp32) or ``"auto"`` (PyTorch backend: ``"mixed"``
            on CUDA with bf16 when the sequences hold >= 1024 keys, else ``"fp32"``: on a CPU, with or
            without AMX, the mixed solve was measured slower; see
            ``common.policy.resolve_precision``; the Triton backend's rule is
            ``common.policy.triton_precision``).  float64 inputs always solve in float64;
            under ``torch.compile`` the same rule applies.
        backend: ``"auto"`` (Triton on CUDA when available, else PyTorch; PyTorch under
            ``torch.compile``), ``"torch"``, ``"triton"`` (a ``ValueError`` where it cannot run:
            no triton, CPU tensors without ``TRITON_INTERPRET=1``, under ``torch.compile``).
        return_aux: also return an ``LLAAux``.

    Returns:
        ``o [B, T, H, Dv]`` in the dtype of ``q``, or ``(o, LLAAux)`` with ``return_aux=True``.
    """
    B, T, H, D, S, _Hk, _Dv = check_qkv(q, k, v)
    scale = check_scale(scale, D)
    window = check_window(window_size, causal)
    check_solver_options(solver, max_iters, tol)
    check_bool("return_aux", return_aux)
    check_choice("precision", precision, PRECISIONS)
    ridge = check_ridge(ridge, B, T, H, q)  # [B, T, H]
    varlen = check_varlen(cu_seqlens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, B=B, T=T, S=S,
                          device=q.device)
    return _dispatch(pick_backend(backend, q), q, k, v, ridge, varlen, scale=scale, window=window, solver=solver,
                     max_iters=max_iters, tol=tol, precondition=bool(precondition), precision=precision,
                     return_aux=return_aux)


def _dispatch(name: str, q, k, v, ridge, varlen: Varlen | None, *, scale, window, solver, max_iters, tol,
              precondition, precision="auto", return_aux):
    """The one way from checked arguments to a backend: the custom op while ``torch.compile`` traces
    (it resolves ``solver="auto"`` and checks the values it needs inside), else the backend ``name``
    followed by the forward's diagnostics."""
    if torch.compiler.is_compiling():
        # one opaque custom op (fake impl + autograd): no host reads, warnings or aux counters
        from .custom_op import lla_compiled

        o, lse = lla_compiled(q, k, v, ridge, varlen, scale=scale, window_size=window, solver=solver,
                              max_iters=max_iters, tol=tol, precondition=precondition, precision=precision)
        return (o, LLAAux(iters=-1, residual=float("nan"), lse=lse, solver=solver)) if return_aux else o
    D = q.shape[-1]
    ridge_min = float(ridge.detach().min()) if ridge.numel() else 1.0
    if name == "triton" and solver == "auto" and q.dtype != torch.float64:
        solver = "cg"  # the fused kernels solve by CG; "direct" and float64 run the PyTorch path
    config = LLAConfig(
        scale=scale, window=window, solver=resolve_solver(solver, ridge_min, D, q.dtype, S=k.shape[1]),
        max_iters=default_max_iters(q.dtype, D) if max_iters is None else max_iters,
        tol=float(default_tol(q.dtype) if tol is None else tol), precondition=precondition, precision=precision,
    )
    # under torch.autocast the backends run in their own dtypes (the inputs' dtype, fp32 solves): autocast
    # would otherwise recast some of their internal matmuls and mix dtypes in the out= ops
    with torch.autocast(q.device.type, enabled=False):
        o, res = _backend_fn(name)(q, k, v, ridge, varlen, config)
    worst = res.residual if res.worst_residual is None else res.worst_residual
    check_solve(stage="forward", solver=config.solver, residual=worst, tol=config.tol, iters=res.iters,
                ridge_min=ridge_min, floor=res.worst_floor, stacklevel=4)  # (the warning points at the op's caller)
    check_conditioning(res.amplification, q.dtype, stacklevel=4)
    if return_aux:
        return o, LLAAux(iters=res.iters, residual=res.residual, lse=res.lse, solver=config.solver,
                         amplification=res.amplification, precision=res.precision)
    return o
