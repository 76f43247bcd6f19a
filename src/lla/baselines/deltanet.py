"""Gated DeltaNet (Yang et al., 2024) as a plain PyTorch recurrence."""

from __future__ import annotations

import torch

from ._common import check_qkv, expand_kv
from .linear import _check_self


def gated_delta_attention(q, k, v, alpha, beta) -> torch.Tensor:
    """``S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``, ``o_t = S_t q_t``.

    ``q [B, T, H, D]``, ``k [B, T, Hk, D]`` (callers L2-normalise keys), ``v [B, T, Hk, Dv]``,
    ``alpha, beta [B, T, H]`` in (0, 1] -> ``[B, T, H, Dv]``.  One state ``S [B, H, Dv, D]`` carried token
    by token (rank-one updates, no ``D x D`` identity formed).
    """
    check_qkv(q, k, v)
    _check_self(q, k)
    B, T, H, D = q.shape
    k, v = expand_kv(k, H), expand_kv(v, H)
    state = q.new_zeros(B, H, v.shape[-1], D)
    outs = []
    for t in range(T):
        kt, vt, qt = k[:, t], v[:, t], q[:, t]  # [B, H, D]
        a, b = alpha[:, t, :, None, None], beta[:, t, :, None]
        pred = (state @ kt.unsqueeze(-1)).squeeze(-1)  # S_{t-1} k_t, [B, H, Dv]
        # alpha S (I - beta k k^T) + beta v k^T = alpha S + (beta v - alpha beta S k) k^T
        state = a * state + ((b * vt - a.squeeze(-1) * b * pred).unsqueeze(-1) * kt.unsqueeze(-2))
        outs.append((state @ qt.unsqueeze(-1)).squeeze(-1))
    return torch.stack(outs, dim=1)


def gated_delta_attention_naive(q, k, v, alpha, beta):
    """Loop over batch, head and time with explicit ``D x D`` transition matrices."""
    B, T, H, D = q.shape
    k, v = expand_kv(k, H), expand_kv(v, H)
    out = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    eye = torch.eye(D, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(v.shape[-1], D, dtype=q.dtype)
            for t in range(T):
                kt = k[b, t, h]
                transition = alpha[b, t, h] * (eye - beta[b, t, h] * torch.outer(kt, kt))
                S = S @ transition + beta[b, t, h] * torch.outer(v[b, t, h], kt)
                out[b, t, h] = S @ q[b, t, h]
    return out
