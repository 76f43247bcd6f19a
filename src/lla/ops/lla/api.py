"""The public op: argument checks, defaults, backend dispatch and the aux structure."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from ..diagnostics import LLAConvergenceWarning, check_conditioning, check_solve, default_max_iters, default_tol

__all__ = ["local_linear_attention", "LLAAux", "LLAConvergenceWarning", "resolve_solver"]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SOLVERS = ("auto", "cg", "direct")
BACKENDS = ("auto", "torch", "triton")


class LLAAux(NamedTuple):
    """What a call reports besides its output.

    iters:    CG iterations of the slowest row (0 for the direct solver).
    residual: worst *true* relative residual ``||A x - b|| / ||b||`` of the forward solve over all
              rows, measured at exit with one more matvec (``A`` the ridge-regularised key
              covariance, see ``lla.ops.lla.torch_backend``).  In float32 it cannot go below a rounding
              floor of about ``eps * cond(A)``; the op warns when it exceeds ``RESIDUAL_FACTOR``
              times the larger of ``tol`` and that floor (``lla.ops.diagnostics.check_solve``).
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


def _check_tensor(name: str, x, rank: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} ([B, T, H, D] layout), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {x.dtype}")


def _check_qkv(q, k, v, r=None):
    """The shared checks of ``q [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` (and Parallax's
    ``r``, shaped like ``q``) -> ``(B, T, H, D, S, Hk, Dv)``."""
    names, ts = ("q", "r", "k", "v") if r is not None else ("q", "k", "v"), (q, r, k, v) if r is not None else (q, k, v)
    for name, t in zip(names, ts):
        _check_tensor(name, t, 4)
    if len({t.dtype for t in ts}) != 1:
        raise TypeError(f"{', '.join(names)} must share a dtype, got {', '.join(str(t.dtype) for t in ts)}")
    if len({t.device for t in ts}) != 1:
        raise ValueError(f"{', '.join(names)} must be on one device, got {', '.join(str(t.device) for t in ts)}")
    if r is not None and r.shape != q.shape:
        raise ValueError(f"r must have the shape of q {tuple(q.shape)}, got {tuple(r.shape)}")
    B, T, H, D = q.shape
    Bk, S, Hk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {v.shape[0]}")
    if v.shape[1] != S:
        raise ValueError(f"k and v must have the same length S, got {S} and {v.shape[1]}")
    if v.shape[2] != Hk:
        raise ValueError(f"k and v must have the same number of heads, got {Hk} and {v.shape[2]}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim D, got {D} and {Dk}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the key/value heads ({Hk})")
    if D == 0 or v.shape[3] == 0:
        raise ValueError("head dims must be > 0")
    return B, T, H, D, S, Hk, v.shape[3]


def _check_window(window_size, causal) -> tuple[int, int]:
    """``causal`` a bool and ``window_size`` a pair of ints >= -1 -> the ``(left, right)`` the backends
    take (``right = 0`` when causal)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    ):
        raise ValueError(f"window_size must be a pair of ints >= -1 (left, right), got {window_size!r}")
    return int(window_size[0]), 0 if causal else int(window_size[1])


def _normalise_ridge(ridge, B: int, T: int, H: int, q: torch.Tensor) -> torch.Tensor:
    """Return the ridge as a ``[B, T, H]`` float tensor (an expanded view when given smaller)."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float, torch.Tensor)):
        raise TypeError(f"ridge must be a float or a tensor broadcastable to [B, T, H], got {type(ridge).__name__}")
    if not isinstance(ridge, torch.Tensor):
        if not math.isfinite(ridge) or ridge <= 0:
            raise ValueError(f"ridge must be a finite number > 0, got {ridge}")
        return torch.full((1, 1, 1), float(ridge), dtype=torch.float64, device=q.device).expand(B, T, H)
    if not ridge.is_floating_point():
        raise TypeError(f"ridge must be a floating-point tensor, got {ridge.dtype}")
    if ridge.device != q.device:
        raise ValueError(f"ridge is on {ridge.device} but q is on {q.device}")
    if ridge.dim() > 3:
        raise ValueError(f"ridge must be broadcastable to [B, T, H] = {[B, T, H]}, got shape {tuple(ridge.shape)}")
    try:
        lam = ridge.expand(B, T, H) if ridge.dim() else ridge.reshape(1, 1, 1).expand(B, T, H)
    except RuntimeError:
        raise ValueError(
            f"ridge must be broadcastable to [B, T, H] = {[B, T, H]}, got shape {tuple(ridge.shape)} "
            "(a per-head ridge has shape [H])"
        ) from None
    if torch.compiler.is_compiling():  # no host reads while traced (the custom op takes it as given)
        return lam
    if not bool(torch.isfinite(ridge).all()) or not bool((ridge > 0).all()):
        raise ValueError("ridge must be finite and > 0 everywhere")
    return lam


def _check_cu_seqlens(cu_seqlens, B: int, T: int, S: int, device) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a LongTensor [N + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor [N + 1] with N >= 1, got {cu_seqlens.dtype} "
            f"of shape {tuple(cu_seqlens.shape)}"
        )
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B = {B}")
    if S != T:
        raise ValueError(f"cu_seqlens needs self-attention shapes (S == T), got T = {T}, S = {S}")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    c = cu.tolist()
    if c[0] != 0 or c[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}, got {c[0]} ... {c[-1]}")
    if any(b <= a for a, b in zip(c, c[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (every packed sequence non-empty)")
    return cu


def resolve_solver(solver: str, lam_min: float, D: int, dtype: torch.dtype, S: int | None = None) -> str:
    """The ``solver="auto"`` rule.

    CG's iteration count grows like sqrt(cond(A)) and cond(A) ~ ||Cov(k)|| / ridge, while the
    direct solve forms the D x D moment of every row (``R n D^2 / 2`` multiply-adds) and runs one
    small batched Cholesky per row (LAPACK-bound on the CPU: ~15 us per 16 x 16 row, ~60 us per
    32 x 32, whatever the key length).  A row's conditioning also depends on how many keys it sees,
    and the torch backend's CG drops converged rows, so CG wins almost everywhere once the
    (batch, key head) pairs are batched together.  Measured (CPU, 2 threads, fp32, fwd + bwd,
    4096 tokens in B x T, H = 4; ``python benchmarks/solver_rule.py``):
    D = 16: direct / CG time 2.6x at T = 16, 3.0x at 64, 1.07x at 256, 0.74x at 1024 (ridge 1),
    0.89x at 256 and 0.57x at 1024 (ridge 0.05); D = 32: 5.0x at 16 .. 1.02x at 1024 (ridge 1),
    3.1x .. 0.61x (ridge 0.05); D = 64, ridge 0.01: 6.2x at 16 .. 1.01x at 1024.  So: direct for
    float64 (exactness expected), tiny ridges (< 1e-3: CG's iteration count unmeasured there),
    D <= 16 at ``S >= 512`` and D <= 32 with ridge < 0.5 at ``S >= 1024``; CG otherwise.  ``S``
    unknown counts as short.
    On the Triton backend (CUDA) ``auto`` means CG, the solver the fused kernels run.
    """
    if solver != "auto":
        return solver
    if dtype == torch.float64 or lam_min < 1e-3:
        return "direct"
    if S is not None and ((D <= 16 and S >= 512) or (D <= 32 and lam_min < 0.5 and S >= 1024)):
        return "direct"
    return "cg"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _pick_backend(backend: str, q: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if (q.is_cuda and _triton_available()) else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend


def _backend_fn(name: str):
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
        q: ``[B, T, H, D]`` queries.
        k: ``[B, S, Hk, D]`` keys; ``H % Hk == 0`` (grouped-query: query head ``h`` reads key head
            ``h // (H // Hk)``).
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
        cu_seqlens: ``[N + 1]`` int64 offsets of packed sequences (``B == 1``, ``S == T``); each
            sequence only attends within itself.
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
            true residual, rows where it stalls finish in fp32) or ``"auto"`` (``"mixed"`` where
            bf16 GEMMs are fast, see ``torch_backend.function.resolve_precision``).  float64 inputs
            always solve in float64.
        backend: ``"auto"`` (Triton on CUDA when available, else PyTorch), ``"torch"``, ``"triton"``.
        return_aux: also return an ``LLAAux``.

    Returns:
        ``o [B, T, H, Dv]`` in the dtype of ``q``, or ``(o, LLAAux)`` with ``return_aux=True``.
    """
    B, T, H, D, S, Hk, _ = _check_qkv(q, k, v)
    if scale is None:
        scale = D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    window_size = _check_window(window_size, causal)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if precision not in ("auto", "fp32", "mixed"):
        raise ValueError(f"precision must be one of ('auto', 'fp32', 'mixed'), got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1):
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    if tol is not None and (not isinstance(tol, (int, float)) or not (tol > 0)):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    lam = _normalise_ridge(ridge, B, T, H, q)
    if torch.compiler.is_compiling():
        # torch.compile: one opaque custom op (fake impl + autograd), no data-dependent checks or
        # warnings; "auto" solver and defaults are resolved inside it.  Eager path below unchanged.
        from .custom_op import lla_compiled

        o, lse = lla_compiled(
            q, k, v, lam, cu_seqlens, scale=float(scale), window_size=window_size, solver=solver,
            max_iters=max_iters, tol=tol, precondition=precondition,
        )
        return (o, LLAAux(iters=-1, residual=float("nan"), lse=lse, solver=solver)) if return_aux else o
    if cu_seqlens is not None:
        cu_seqlens = _check_cu_seqlens(cu_seqlens, B, T, S, q.device)

    lam_min = float(ridge) if not isinstance(ridge, torch.Tensor) else float(ridge.detach().min())
    name = _pick_backend(backend, q)
    if name == "triton" and solver == "auto" and q.dtype != torch.float64:
        solver = "cg"  # the fused kernels solve by CG; "direct" and float64 run the PyTorch path
    solver = resolve_solver(solver, lam_min, D, q.dtype, S=S)
    if max_iters is None:
        max_iters = default_max_iters(q.dtype, D)
    if tol is None:
        tol = default_tol(q.dtype)

    o, lse, iters, residual, *extra = _backend_fn(name)(
        q,
        k,
        v,
        lam,
        scale=float(scale),
        window_size=window_size,
        cu_seqlens=cu_seqlens,
        solver=solver,
        max_iters=max_iters,
        tol=float(tol),
        precondition=bool(precondition),
        **({"precision": precision} if name == "torch" else {}),  # lla_triton takes it once it has the mixed path
    )
    amplification = float(extra[0]) if extra else float("nan")
    chk_residual, chk_floor = extra[1] if len(extra) > 1 else (residual, 0.0)
    check_solve(stage="forward", solver=solver, residual=chk_residual, tol=float(tol), iters=iters, lam_min=lam_min,
                floor=chk_floor)
    check_conditioning(amplification, q.dtype)
    if return_aux:
        return o, LLAAux(iters=iters, residual=residual, lse=lse, solver=solver, amplification=amplification,
                         precision=extra[2] if len(extra) > 2 else "")
    return o
