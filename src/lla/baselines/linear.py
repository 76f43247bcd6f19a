"""Causal linear attention, computed chunkwise, with a choice of feature map."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_qkv, expand_kv

#: feature maps phi applied to queries and keys (last dim)
FEATURE_MAPS = {
    "elu1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "identity": lambda x: x,
}


def _phi(name: str):
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {name!r}")
    return FEATURE_MAPS[name]


def _check_self(q, k):
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"causal recurrent baselines need S == T, got T = {q.shape[1]}, S = {k.shape[1]}")


def linear_attention(
    q, k, v, *, feature_map: str = "elu1", normalize: bool = True, chunk_size: int = 64, eps: float = 1e-6
) -> torch.Tensor:
    """Causal linear attention ``o_i = sum_{j<=i} (phi(q_i).phi(k_j)) v_j [/ sum_{j<=i} phi(q_i).phi(k_j)]``.

    ``q [B, T, H, D]``, ``k [B, T, Hk, D]``, ``v [B, T, Hk, Dv]`` -> ``[B, T, H, Dv]``.  Computed in chunks
    of ``chunk_size``: a masked quadratic product inside each chunk plus the running state
    ``sum_j phi(k_j) v_j^T`` ``[F, Dv]`` of the earlier chunks.  ``normalize`` divides by the running
    kernel mass (only meaningful for positive feature maps).
    """
    check_qkv(q, k, v)
    _check_self(q, k)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    phi = _phi(feature_map)
    B, T, H, _ = q.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    # [B, H, T, F] features, padded to whole chunks (padded keys have zero features and values)
    fq = phi(q).transpose(1, 2)
    fk = phi(expand_kv(k, H)).transpose(1, 2)
    vv = expand_kv(v, H).transpose(1, 2)
    if pad:
        fq, fk, vv = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, vv))
    fq, fk, vv = (t.reshape(B, H, N, C, t.shape[-1]) for t in (fq, fk, vv))
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    a = (fq @ fk.transpose(-1, -2)).masked_fill(~tril, 0.0)  # [B, H, N, C, C] intra-chunk kernel
    kv = fk.transpose(-1, -2) @ vv  # [B, H, N, F, Dv] per-chunk state
    state = torch.cumsum(kv, dim=2) - kv  # exclusive prefix: the chunks before
    o = a @ vv + fq @ state  # [B, H, N, C, Dv]
    if normalize:
        z = fk.sum(dim=3)  # [B, H, N, F]
        zprev = torch.cumsum(z, dim=2) - z
        den = a.sum(-1) + (fq * zprev.unsqueeze(3)).sum(-1)  # [B, H, N, C]
        o = o / (den.unsqueeze(-1) + eps)
    o = o.reshape(B, H, N * C, -1)[:, :, :T]
    return o.transpose(1, 2)


def linear_attention_naive(q, k, v, *, feature_map="elu1", normalize=True, eps=1e-6):
    """Dense masked form of the same thing (quadratic)."""
    _check_self(q, k)
    phi = _phi(feature_map)
    H, T = q.shape[2], q.shape[1]
    fq, fk, vv = phi(q), phi(expand_kv(k, H)), expand_kv(v, H)
    a = torch.einsum("bthf,bshf->bhts", fq, fk)
    a = a.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0.0)
    o = torch.einsum("bhts,bshd->bthd", a, vv)
    if normalize:
        o = o / (a.sum(-1).transpose(1, 2).unsqueeze(-1) + eps)
    return o
