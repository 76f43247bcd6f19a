"""``ParallaxConfig``: the checked options a Parallax backend takes (``common.result.BackendResult`` is
what it returns)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ParallaxConfig"]


@dataclass(frozen=True)
class ParallaxConfig:
    """scale: logit scale; window: ``(left, right)`` key window, ``-1`` unbounded (``right = 0`` when causal);
    need_lse: also return the softmax log-sum-exp."""

    scale: float
    window: tuple[int, int]
    need_lse: bool = False
