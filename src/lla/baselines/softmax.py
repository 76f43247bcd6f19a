"""Softmax attention (SDPA) and sliding-window softmax attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import causal_mask, check_qkv, expand_kv


def _sdpa(q, k, v, mask, scale):
    # SDPA layout [B, H, T, D]; the boolean mask is True where attention is allowed.
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return o.transpose(1, 2)


def softmax_attention(q, k, v, *, scale: float | None = None, causal: bool = True) -> torch.Tensor:
    """Softmax attention. ``q [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` -> ``[B, T, H, Dv]``.

    Causal masks are bottom-right aligned (query i sees keys ``j <= i + S - T``), as in the LLA op;
    a row that sees no key outputs zeros.
    """
    check_qkv(q, k, v)
    H, T, S = q.shape[2], q.shape[1], k.shape[1]
    k, v = expand_kv(k, H), expand_kv(v, H)
    if not causal:
        return _sdpa(q, k, v, None, scale)
    mask = causal_mask(T, S, q.device)
    o = _sdpa(q, k, v, mask, scale)
    return o.masked_fill(~mask.any(-1)[None, :, None, None], 0.0)


def softmax_attention_naive(q, k, v, *, scale=None, causal=True, window: int | None = None):
    """Dense reference: explicit logits, mask, softmax, weighted sum (float64 friendly)."""
    H, T, S, D = q.shape[2], q.shape[1], k.shape[1], q.shape[3]
    k, v = expand_kv(k, H), expand_kv(v, H)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    logits = torch.einsum("bthd,bshd->bhts", q, k) * scale  # [B, H, T, S]
    if causal or window is not None:
        mask = causal_mask(T, S, q.device, window) if causal else torch.ones(T, S, dtype=torch.bool)
        logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", p, v)


def sliding_window_attention(q, k, v, *, window: int, scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention over the last ``window`` keys (the query's own position included).

    Shapes as ``softmax_attention``; ``window >= 1``.
    """
    check_qkv(q, k, v)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    H, T, S = q.shape[2], q.shape[1], k.shape[1]
    k, v = expand_kv(k, H), expand_kv(v, H)
    mask = causal_mask(T, S, q.device, window)
    o = _sdpa(q, k, v, mask, scale)
    return o.masked_fill(~mask.any(-1)[None, :, None, None], 0.0)


def sliding_window_attention_naive(q, k, v, *, window: int, scale=None):
    """Per-query loop over the visible window (the definition)."""
    H, T, S, D = q.shape[2], q.shape[1], k.shape[1], q.shape[3]
    k, v = expand_kv(k, H), expand_kv(v, H)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for i in range(T):
        hi = i + S - T
        lo = max(0, hi - window + 1)
        if hi < 0:
            continue
        logits = torch.einsum("bhd,bshd->bhs", q[:, i], k[:, lo : hi + 1]) * scale
        out[:, i] = torch.einsum("bhs,bshd->bhd", torch.softmax(logits, -1), v[:, lo : hi + 1])
    return out
