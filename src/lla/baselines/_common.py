"""Argument checks and grouped-query expansion shared by the baselines."""

from __future__ import annotations

import torch


def check_qkv(q, k, v) -> None:
    """Validate ``q [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` (``H % Hk == 0``)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 ([B, T, H, D] layout), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head dim {k.shape[-1]} != q head dim {q.shape[-1]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in S, Hk")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k heads ({k.shape[2]})")


def expand_kv(x: torch.Tensor, H: int) -> torch.Tensor:
    """Repeat key/value heads ``[B, S, Hk, D] -> [B, S, H, D]`` (head h reads h // (H // Hk))."""
    Hk = x.shape[2]
    return x if Hk == H else x.repeat_interleave(H // Hk, dim=2)


def causal_mask(T: int, S: int, device, window: int | None = None) -> torch.Tensor:
    """Bool ``[T, S]``: query i sees key j iff ``j <= i + S - T`` (and ``j > i + S - T - window``)."""
    i = torch.arange(T, device=device)[:, None] + (S - T)
    j = torch.arange(S, device=device)[None, :]
    m = j <= i
    if window is not None:
        m &= j > i - window
    return m
