"""Who sees whom, materialised (for the float64 references and tests), and grouped-query head expansion.

The fused paths never build these: they use ``varlen.row_ranges`` / per-tile ranges with the same
semantics (flash-attn's bottom-right aligned causal mask and ``window_size``).
"""

from __future__ import annotations

import torch

__all__ = ["visible_mask", "expand_heads"]


def visible_mask(
    T: int,
    S: int,
    *,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Boolean ``[T, S]`` mask of the keys each query sees (flash-attn conventions).

    Query ``i`` is aligned with key ``i + S - T`` (bottom-right).  ``causal`` hides keys after that
    position; ``window_size=(left, right)`` keeps keys in ``[i + S - T - left, i + S - T + right]``
    (``-1`` = unbounded; ``causal`` implies ``right = 0``).  With ``cu_seqlens`` (``T == S``) a
    query only sees keys of its own packed sequence, and alignment is per sequence.
    """
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    diag = i + (S - T)  # key aligned with query i
    left, right = window_size
    if causal:
        right = 0
    mask = torch.ones(T, S, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= diag + right
    if left >= 0:
        mask &= j >= diag - left
    if cu_seqlens is not None:
        seg = torch.bucketize(torch.arange(T, device=device), cu_seqlens.to(device)[1:], right=True)
        mask &= seg[:, None] == seg[None, :]
    return mask


def expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """``[B, S, Hk, D] -> [B, H, S, D]``, query head ``h`` reading key head ``h // (H // Hk)``."""
    return x.transpose(1, 2).repeat_interleave(H // x.shape[2], dim=1)
