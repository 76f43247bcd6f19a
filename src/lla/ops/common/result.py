"""The typed contract between a public op and its backends.

A backend takes the validated arguments (tensors in the op's layout, the ridge as ``[B, T, H]``, a
``varlen.Varlen`` or None, and its mechanism's config with every ``"auto"`` resolved except the
device-dependent precision) and returns ``(o, BackendResult)``: the output and what the op reports or
checks besides it.  Parallax fills ``lse`` only; LLA fills the solver's fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BackendResult"]


@dataclass
class BackendResult:
    """What a backend returns besides its output.

    lse:           ``[B, T, H]`` float32 softmax log-sum-exp of the scaled logits (``-inf`` for a row that
                   sees no key), or None when not asked for.
    iters:         CG iterations of the slowest row (0 for a direct solve or a solver-free mechanism).
    residual:      worst true relative residual ``||A x - b|| / ||b||`` of the forward solve.
    worst_residual, worst_floor: the true residual and attainable rounding floor of the row furthest past
                   ``max(tol, floor)`` (what ``diagnostics.check_solve`` judges); ``worst_residual`` None
                   means "judge ``residual`` with floor 0".
    amplification: the estimated rounding-error magnifier of the output (``LLAAux.amplification``); NaN
                   when not estimated.
    precision:     what the solve ran in (``LLAAux.precision``); "" when not reported.
    """

    lse: torch.Tensor | None = None
    iters: int = 0
    residual: float = math.nan
    worst_residual: float | None = None
    worst_floor: float = 0.0
    amplification: float = math.nan
    precision: str = ""
