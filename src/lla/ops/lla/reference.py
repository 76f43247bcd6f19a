"""Local Linear Attention straight from the math: the specification in code.

Everything is materialised (the centred keys ``z`` are ``[B, H, T, S, D]`` and the moment matrices
``Sigma`` are ``[B, H, T, D, D]``), so use it at small sizes, in float64, as the thing every fast
path is tested against.  It follows ``LLA.md`` section 1 literally:

    s_ij    = softmax_j(scale * q_i . k_j)            over the visible keys j
    z_ij    = k_j - q_i
    mu_i    = sum_j s_ij z_ij                          (D)
    Sigma_i = sum_j s_ij z_ij z_ij^T + lam_i I          (D x D)
    rho_i   = Sigma_i^{-1} mu_i
    delta_i = 1 - mu_i . rho_i
    o_i     = sum_j s_ij (1 - z_ij . rho_i) / delta_i * v_j
            = sum_j s_ij (1 - (z_ij - mu_i) . rho_i / delta_i) * v_j    (the form computed below)

A query row that sees no key outputs zeros.  Differentiable by plain autograd.
"""

from __future__ import annotations

import torch

from ..common.linalg import solve
from ..common.masks import expand_heads, visible_mask

__all__ = ["local_linear_attention_ref", "softmax_attention_ref"]


def _ridge_bth(ridge, B: int, T: int, H: int, like: torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(ridge, dtype=like.dtype, device=like.device)
    return lam.expand(B, T, H) if lam.dim() <= 3 else lam


def softmax_attention_ref(q, k, v, *, scale=None, causal=True, window_size=(-1, -1), cu_seqlens=None):
    """Masked softmax attention (Nadaraya-Watson), same layout and masks as the LLA reference."""
    B, T, H, D = q.shape
    S = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    mask = visible_mask(T, S, causal=causal, window_size=window_size, cu_seqlens=cu_seqlens, device=q.device)
    K, V = expand_heads(k, H), expand_heads(v, H)
    logits = scale * q.transpose(1, 2) @ K.transpose(-1, -2)  # [B, H, T, S]
    logits = logits.masked_fill(~mask, float("-inf"))
    s = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (s @ V).transpose(1, 2)


def local_linear_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ridge=1.0,
    scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference LLA.  ``q [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` -> ``[B, T, H, Dv]``.

    ``ridge`` is a float or a tensor broadcastable to ``[B, T, H]``.  Computes in the dtype of the
    inputs: pass float64 for a trustworthy answer.
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    mask = visible_mask(T, S, causal=causal, window_size=window_size, cu_seqlens=cu_seqlens, device=q.device)
    Q = q.transpose(1, 2)  # [B, H, T, D]
    K, V = expand_heads(k, H), expand_heads(v, H)  # [B, H, S, D], [B, H, S, Dv]
    lam = _ridge_bth(ridge, B, T, H, q).transpose(1, 2)  # [B, H, T]

    logits = scale * Q @ K.transpose(-1, -2)  # [B, H, T, S]
    logits = logits.masked_fill(~mask, float("-inf"))
    s = torch.softmax(logits, dim=-1)
    seen = mask.any(-1)  # [T] rows that see at least one key
    s = torch.where(seen[:, None], s, torch.zeros_like(s))

    z = K[:, :, None, :, :] - Q[:, :, :, None, :]  # [B, H, T, S, D]
    mu = torch.einsum("bhts,bhtsd->bhtd", s, z)  # [B, H, T, D]
    eye = torch.eye(D, dtype=q.dtype, device=q.device)
    sigma = torch.einsum("bhts,bhtsd,bhtse->bhtde", s, z, z) + lam[..., None, None] * eye  # [B, H, T, D, D]
    rho = solve(sigma, mu.unsqueeze(-1)).squeeze(-1)  # [B, H, T, D]
    delta = 1.0 - (mu * rho).sum(-1)  # [B, H, T]
    # (1 - z_ij . rho_i) / delta_i  =  1 - (z_ij - mu_i) . rho_i / delta_i  (as 1 - mu . rho = delta):
    # the same weights, written so that a row with one key gets exactly 1 (z - mu = 0), not 1 + rounding
    y = z - mu[..., None, :]  # [B, H, T, S, D]: k_j - m_i
    weights = s * (1.0 - torch.einsum("bhtsd,bhtd->bhts", y, rho) / delta[..., None])  # [B, H, T, S]
    o = weights @ V  # [B, H, T, Dv]
    o = torch.where(seen[:, None], o, torch.zeros_like(o))
    return o.transpose(1, 2)
