"""Who sees whom, materialised (for the float64 references and tests), grouped-query head expansion, and
the non-finite keys / values the PyTorch backends keep away from rows that do not see them.

The fused paths never build these: they use ``varlen.row_ranges`` / per-tile ranges with the same
semantics (flash-attn's bottom-right aligned causal mask and ``window_size``).
"""

from __future__ import annotations

import torch

__all__ = ["visible_mask", "expand_heads", "zero_nonfinite"]


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


def zero_nonfinite(K: torch.Tensor, V: torch.Tensor):
    """``K [..., S, D]``, ``V [..., S, Dv]`` -> ``(K, V, bad)``: ``bad [..., S]`` flags the entries whose key or
    value is not finite (None when all are), and those entries are zeroed in copies of ``K`` and ``V`` (so
    that ``0 * inf`` in a GEMM cannot reach rows that mask them out; the caller poisons the rows that see
    them).  Inputs without one come back as they are.  One cheap pass first: a finite sum means every
    entry is finite (an overflowing sum of finite entries only sends us to the exact per-entry check, four
    passes over K and V)."""
    if not K.numel() or bool(torch.isfinite(K.sum() + V.sum())):
        return K, V, None
    finite = torch.isfinite(K).all(-1) & torch.isfinite(V).all(-1)
    if bool(finite.all()):
        return K, V, None
    bad = ~finite
    return K.masked_fill(bad[..., None], 0.0), V.masked_fill(bad[..., None], 0.0), bad
