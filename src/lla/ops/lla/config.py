"""``LLAConfig``: the checked, resolved options a backend of the LLA op takes (``common.result`` has the
other half of the contract, what a backend returns)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LLAConfig"]


@dataclass(frozen=True)
class LLAConfig:
    """scale:        logit scale.
    window:       ``(left, right)`` key window, ``-1`` unbounded (``right = 0`` when causal).
    solver:       ``"cg"`` or ``"direct"`` (resolved by ``common.policy.resolve_solver``).
    max_iters:    CG iteration cap.
    tol:          relative-residual tolerance per row.
    precondition: Jacobi-precondition CG.
    precision:    ``"auto"`` | ``"fp32"`` | ``"mixed"`` (each backend resolves ``"auto"`` by its device rule,
                  ``common.policy``)."""

    scale: float
    window: tuple[int, int]
    solver: str
    max_iters: int
    tol: float
    precondition: bool = True
    precision: str = "auto"
