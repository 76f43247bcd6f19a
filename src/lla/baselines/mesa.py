"""Global ridge-regression attention (MesaNet / the OLS limit of linear attention), exact solve."""

from __future__ import annotations

import torch

from ..ops.common.linalg import solve
from ._common import check_qkv, expand_kv
from .linear import _check_self


def _ridge_tensor(ridge, B, T, H, like):
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float, torch.Tensor)):
        raise TypeError(f"ridge must be a float or a tensor broadcastable to [B, T, H], got {type(ridge).__name__}")
    if not isinstance(ridge, torch.Tensor):
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        ridge = torch.tensor(float(ridge), dtype=like.dtype, device=like.device)
    return ridge.to(like.dtype).expand(B, T, H) if ridge.dim() else ridge.reshape(1, 1, 1).expand(B, T, H)


def mesa_attention(q, k, v, *, ridge=1.0, chunk_size: int = 64) -> torch.Tensor:
    """``o_i = (sum_{j<=i} v_j k_j^T) (sum_{j<=i} k_j k_j^T + ridge I)^{-1} q_i`` (causal, S == T).

    The ridge-regression fit of the values on the keys over all visible pairs (no intercept, no
    locality), evaluated at the query: the optimal-state limit of linear attention (MesaNet).
    ``q [B, T, H, D]``, ``k [B, T, Hk, D]``, ``v [B, T, Hk, Dv]``, ``ridge`` float or broadcastable to
    ``[B, T, H]``, > 0 -> ``[B, T, H, Dv]``.  Exact: per position an LU solve of the running
    ``D x D`` Gram matrix for ``x_i = G_i^{-1} q_i``, built chunk by chunk (``[B, H, chunk, D, D]``
    live memory), then ``o_i = sum_{j<=i} (k_j . x_i) v_j`` as a masked GEMM within the chunk plus
    the carried ``sum v k^T`` of earlier chunks.  (LU rather than Cholesky: its backward reuses the
    factorisation, measured 2.4x faster fwd + bwd at B = 32, T = 64, H = 4, D = 16 on the CPU.)
    """
    check_qkv(q, k, v)
    _check_self(q, k)
    B, T, H, D = q.shape
    k, v = expand_kv(k, H), expand_kv(v, H)
    lam = _ridge_tensor(ridge, B, T, H, q).transpose(1, 2)  # [B, H, T]
    eye = torch.eye(D, dtype=q.dtype, device=q.device)
    gram = q.new_zeros(B, H, D, D)  # running sum k k^T of earlier chunks
    corr = q.new_zeros(B, H, v.shape[-1], D)  # running sum v k^T of earlier chunks
    outs = []
    for t0 in range(0, T, chunk_size):
        kc = k[:, t0 : t0 + chunk_size].transpose(1, 2)  # [B, H, C, D]
        vc = v[:, t0 : t0 + chunk_size].transpose(1, 2)  # [B, H, C, Dv]
        qc = q[:, t0 : t0 + chunk_size].transpose(1, 2)
        C = kc.shape[2]
        g = gram.unsqueeze(2) + torch.cumsum(kc.unsqueeze(-1) * kc.unsqueeze(-2), dim=2)  # [B, H, C, D, D]
        x = solve(g + lam[:, :, t0 : t0 + chunk_size, None, None] * eye, qc.unsqueeze(-1)).squeeze(-1)  # [B, H, C, D]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        kx = (x @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, C, C]: k_j . x_i, j <= i
        outs.append(x @ corr.transpose(-1, -2) + kx @ vc)  # [B, H, C, Dv]
        gram, corr = g[:, :, -1], corr + vc.transpose(-1, -2) @ kc
    return torch.cat(outs, dim=2).transpose(1, 2)


def mesa_attention_naive(q, k, v, *, ridge=1.0):
    """Per-position least squares from scratch (an LU solve per position, ``ops.linalg.solve``)."""
    B, T, H, D = q.shape
    k, v = expand_kv(k, H), expand_kv(v, H)
    lam = _ridge_tensor(ridge, B, T, H, q)
    out = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for i in range(T):
        K, V = k[:, : i + 1].transpose(1, 2), v[:, : i + 1].transpose(1, 2)  # [B, H, i+1, D]
        sigma = K.transpose(-1, -2) @ K + lam[:, i, :, None, None] * torch.eye(D, dtype=q.dtype)
        w = solve(sigma, q[:, i].unsqueeze(-1))  # [B, H, D, 1]
        out[:, i] = (V.transpose(-1, -2) @ (K @ w)).squeeze(-1)
    return out
