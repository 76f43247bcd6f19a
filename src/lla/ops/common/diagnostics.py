"""What an LLA solve reports and when it warns: the one place every path (PyTorch, Triton, decode)
turns its diagnostics into ``LLAConvergenceWarning``s.

Contract shared by the backends:

* a backend measures the *true* relative residual ``||A x - b|| / ||b||`` of its solve at exit (one
  extra matvec; worst row) for the forward solve and for the backward's adjoint solve;
* it calls ``check_solve`` once per solve (stage ``"forward"`` or ``"backward"``), and
  ``check_conditioning`` once per forward with its rounding-amplification estimate;
* default tolerances and iteration caps come from ``default_tol`` / ``default_max_iters``.

Nothing here runs while ``torch.compile`` traces (no host reads, no warnings in graphs).
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = [
    "LLAConvergenceWarning",
    "RESIDUAL_FACTOR",
    "default_tol",
    "default_max_iters",
    "adjoint_tol",
    "check_solve",
    "check_conditioning",
]

#: a solve warns when its true relative residual exceeds ``RESIDUAL_FACTOR * max(tol, floor)``
RESIDUAL_FACTOR = 10.0

#: ``check_conditioning`` warns when ``amplification * eps`` exceeds this.  Calibrated on
#: ``benchmarks/robustness.py`` (PyTorch path, 111 cases): 1e-4 left 4 silent misses (all gradient
#: errors) with 5 false alarms but warned on well-posed fp32 solves at ridge 0.01 (errors ~5e-6);
#: 2e-4 leaves 7 silent misses (gradient errors the output estimate does not see) and 4 false alarms
#: (3.6 %); the backward's checks (logit rounding through tiny weights, the ridge gradient's
#: cancellation, both through ``check_conditioning``) bring the misses to 1; see ``docs/robustness.md``.
CONDITIONING_THRESHOLD = 2e-4


class LLAConvergenceWarning(RuntimeWarning):
    """A solve did not reach its tolerance, or the system was too ill-conditioned for the dtype."""


def default_tol(dtype: torch.dtype) -> float:
    """Default CG relative-residual tolerance for inputs of ``dtype``."""
    return 1e-11 if dtype == torch.float64 else 1e-6


def default_max_iters(dtype: torch.dtype, D: int) -> int:
    """Default CG iteration cap for inputs of ``dtype`` and head dim ``D``."""
    return 4 * D if dtype == torch.float64 else 2 * D


def adjoint_tol(tol: float) -> float:
    """Tolerance of the backward's adjoint solve for a forward tolerance ``tol``."""
    return ADJOINT_TOL_FACTOR * tol


#: the adjoint solve runs to ``ADJOINT_TOL_FACTOR * tol`` (see ``adjoint_tol``)
ADJOINT_TOL_FACTOR = 1.0


def _advice(solver: str) -> str:
    if solver == "cg":
        return "raise max_iters or the ridge, loosen tol, or use solver='direct'"
    return "raise the ridge, use float64 inputs or make the logits smaller"


def check_solve(
    *,
    stage: str,
    solver: str,
    residual: float,
    tol: float,
    iters: int = 0,
    ridge_min: float = float("nan"),
    op: str = "local_linear_attention",
    floor: float = 0.0,
    stacklevel: int = 3,
) -> None:
    """Warn when a solve's true relative residual is not finite or above
    ``RESIDUAL_FACTOR * max(tol, floor)``.

    ``stage`` is ``"forward"`` (the solve for ``x``) or ``"backward"`` (the adjoint solve); the
    message names the solver that ran and gives advice that applies to it.  ``floor`` (optional) is
    the residual the working precision can deliver for that row (rounding of the matvec that
    measures it); a backend that estimates it passes the residual and floor of the row furthest
    past ``max(tol, floor)``.  Whether a residual at the floor is accurate enough is
    ``check_conditioning``'s question.
    """
    if torch.compiler.is_compiling():
        return
    limit = RESIDUAL_FACTOR * max(tol, floor if math.isfinite(floor) else 0.0)
    if math.isfinite(residual) and residual <= limit:
        return
    what = f"{iters} CG iterations" if solver == "cg" else "the direct (Cholesky) solve and refinement"
    warnings.warn(
        f"{op}: the {stage} {solver} solve missed its tolerance: worst true relative residual "
        f"{residual:.3g} after {what} (tol {tol:g}, min ridge {ridge_min:g}); {_advice(solver)}.",
        LLAConvergenceWarning,
        stacklevel=stacklevel,
    )


def check_conditioning(
    amplification: float,
    dtype: torch.dtype,
    *,
    op: str = "local_linear_attention",
    threshold: float | None = None,
    stacklevel: int = 3,
) -> None:
    """Warn when ``amplification * eps(compute dtype)`` (the estimated relative rounding error of
    the output) exceeds ``threshold``.  NaN (not reported) never warns."""
    if torch.compiler.is_compiling() or not math.isfinite(amplification) and not math.isinf(amplification):
        return
    threshold = CONDITIONING_THRESHOLD if threshold is None else threshold
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    if amplification * eps > threshold:
        warnings.warn(
            f"{op}: ill-conditioned for {dtype}: the local-linear weights amplify rounding by "
            f"~{amplification:.3g} (expected relative error ~{amplification * eps:.1e}). Use float64 inputs, "
            "a larger ridge, or smaller logits.",
            LLAConvergenceWarning,
            stacklevel=stacklevel,
        )
