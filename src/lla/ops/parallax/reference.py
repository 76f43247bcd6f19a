"""Parallax straight from the formula: the specification in code (float64 at small sizes).

Parallax (Zuo et al. 2026, "parameterized local linear attention") keeps LLA's local linear
correction but replaces the per-query solve by a second, learned query ``r_i``.  With the masked
softmax weights of LLA (``lla.ops.common.masks.visible_mask``) and ``r_i . k_j`` NOT scaled:

    s_ij = softmax_j(scale * q_i . k_j)                 over the visible keys j
    c_i  = sum_j s_ij (r_i . k_j)
    o_i  = sum_j s_ij (1 + c_i - r_i . k_j) v_j  =  E_s[v] - Cov_s(r_i . k, v)

The weights ``s_ij (1 + c_i - r_i . k_j)`` sum to one and can be negative.  LLA is the case
``r_i = A_i^{-1} (m_i - q_i)`` with ``m_i = E_s[k]`` and ``A_i = Cov_s(k) + lam I`` (see
``docs/parallax.md``).  A query row that sees no key outputs zeros.  Differentiable by autograd.
"""

from __future__ import annotations

import torch

from ..common.masks import expand_heads, visible_mask

__all__ = ["parallax_attention_ref"]


def parallax_attention_ref(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference Parallax.  ``q, r [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` ->
    ``[B, T, H, Dv]``, computed in the inputs' dtype (pass float64 for a trustworthy answer).

    Materialises the ``[B, H, T, S]`` weights: small sizes only.  Masks as ``local_linear_attention_ref``.
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    mask = visible_mask(T, S, causal=causal, window_size=window_size, cu_seqlens=cu_seqlens, device=q.device)
    Q, R = q.transpose(1, 2), r.transpose(1, 2)  # [B, H, T, D]
    K, V = expand_heads(k, H), expand_heads(v, H)  # [B, H, S, D], [B, H, S, Dv]
    logits = (scale * Q @ K.transpose(-1, -2)).masked_fill(~mask, float("-inf"))  # [B, H, T, S]
    seen = mask.any(-1)[:, None]  # [T, 1] rows that see at least one key
    s = torch.where(seen, torch.softmax(logits, dim=-1), torch.zeros_like(logits))
    a = R @ K.transpose(-1, -2)  # [B, H, T, S]  r_i . k_j
    c = (s * a).sum(-1, keepdim=True)  # [B, H, T, 1]
    weights = s * (1.0 + c - a)
    return (weights @ V).transpose(1, 2)
