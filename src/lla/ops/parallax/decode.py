"""KV-cache decoding and chunked prefill for Parallax, mirroring ``lla.local_linear_attention_with_kvcache``.

Parallax has no fixed-size recurrent state either (the weights depend on the query), so it keeps
every key and value; each new query does one pass over its cache.

* A single new token (``T_new == 1``) runs one batched pass over the caches: logits and ``r . k``
  of every cached entry (``[B, H, S]``), the masked softmax, ``c``, the centred weights and the
  output, masking each sequence's entries past its length (ragged batches in one call).
* Chunks (``T_new > 1``, prefill on top of a cache) go through the public op: one batched call when
  every sequence has the same length, else one packed varlen call (``cu_seqlens_q`` /
  ``cu_seqlens_k``), bottom-right aligned per sequence, which makes chunked prefill equal to the full
  forward.
"""

from __future__ import annotations

import torch

from ..checks import (
    check_cache_batch_idx, check_cache_seqlens, check_new_kv, check_qkv, check_scale, check_tensor, check_window,
)
from ..lla.decode import append_to_cache, gather_cache, pack_cache
from .api import parallax_attention

__all__ = ["parallax_attention_with_kvcache"]


def _decode_one(q, r, k_cache, v_cache, rows, lens, scale, left):
    """One new query per sequence.  q, r [B, 1, H, D]; caches [B_cache, S_max, Hk, *], batch element
    ``b`` reading cache row ``rows[b]`` (None: row ``b``); lens [B] int64.

    Sequence ``b`` sees entries ``max(0, lens[b] - 1 - left) <= j < lens[b]`` (``left = -1``: all).
    Returns o [B, 1, H, Dv] in q's dtype (zeros for a sequence with an empty cache)."""
    B, _, H, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = int(lens.max()) if B else 0
    if S == 0:
        return q.new_zeros(B, 1, H, Dv)
    j = torch.arange(S, device=q.device)[None, :]
    visible = j < lens[:, None]  # [B, S]
    if left >= 0:
        visible &= j >= (lens[:, None] - 1 - left)
    K = gather_cache(k_cache, rows, S).to(cdt).permute(0, 2, 1, 3)  # [B, Hk, S, D]
    V = gather_cache(v_cache, rows, S).to(cdt).permute(0, 2, 1, 3)
    hide = ~visible[:, None, :, None]
    K, V = K.masked_fill(hide, 0.0), V.masked_fill(hide, 0.0)  # entries past a length may hold anything
    QR = torch.cat([q.to(cdt) * scale, r.to(cdt)], dim=1).reshape(B, 2, Hk, G, D).transpose(1, 2)  # [B, Hk, 2, G, D]
    la = QR.reshape(B, Hk, 2 * G, D) @ K.transpose(-1, -2)  # [B, Hk, 2 G, S]
    logits, a = la[:, :, :G], la[:, :, G:]
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    seen = visible.any(-1)[:, None, None, None]  # [B, 1, 1, 1]
    s = torch.where(seen, torch.softmax(logits, dim=-1), torch.zeros_like(logits))  # [B, Hk, G, S]
    c = (s * a).sum(-1, keepdim=True)
    w = s * (1.0 - (a - c))
    o = w @ V  # [B, Hk, G, Dv]
    return o.reshape(B, 1, H, Dv).to(q.dtype)


def parallax_attention_with_kvcache(
    q: torch.Tensor,
    r: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens,
    cache_batch_idx: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
):
    """Parallax against a KV cache, new keys/values appended in place (flash-attn semantics).

    Args:
        q, r: ``[B, T_new, H, D]`` new queries and slope queries (``T_new == 1`` for a decoding step).
        k_cache: ``[B_cache, S_max, Hk, D]`` key cache; ``H % Hk == 0`` (grouped-query).
        v_cache: ``[B_cache, S_max, Hk, Dv]`` value cache.
        k, v: ``[B, T_new, Hk, D]`` / ``[B, T_new, Hk, Dv]`` new keys and values, or both None.  When
            given they are written **in place** into the caches at entries
            ``cache_seqlens[b] ... cache_seqlens[b] + T_new - 1`` of each batch element's cache row,
            **detached**: no gradient flows through the cache.
        cache_seqlens: int tensor ``[B]`` (or an int): entries already in each batch element's cache
            row; may differ across the batch.  Not advanced here (the caller adds ``T_new``, as with
            flash-attn).
        cache_batch_idx: optional int32/int64 ``[B]`` (flash-attn's): the cache row batch element
            ``b`` uses, in ``[0, B_cache)``, distinct when ``k``/``v`` are written.  Default: row ``b``.
        scale: logit scale, default ``1 / sqrt(D)``.
        causal, window_size: as ``parallax_attention``, bottom-right aligned on each sequence's
            ``L_b = cache_seqlens[b] + T_new`` entries (``T_new`` only counted when ``k`` is given).
        backend: passed to the public op for chunks.

    Returns:
        ``o [B, T_new, H, Dv]`` in q's dtype.  A query that sees no entry outputs zeros.  Differentiable
        in ``q``, ``r`` and the caches (when they require grad), not in ``k``, ``v``.
    """
    check_tensor("r", r, 4)
    B, T, H, D, S_max, Hk, Dv = shape = check_qkv(q, k_cache, v_cache, r=r, k_name="k_cache", v_name="v_cache",
                                                  same_batch=False)
    check_new_kv(k, v, shape)
    t_add = T if k is not None else 0
    rows = check_cache_batch_idx(cache_batch_idx, B, k_cache.shape[0], k is not None, q.device)
    seqlens = check_cache_seqlens(cache_seqlens, B, t_add, S_max, q.device)
    scale = check_scale(scale, D)
    window_size = check_window(window_size, causal)
    if k is not None:
        append_to_cache(k_cache, v_cache, k, v, seqlens, rows)
    lens = seqlens + t_add

    if T == 1:
        return _decode_one(q, r, k_cache, v_cache, rows, lens, scale, window_size[0])
    lens_list = lens.tolist()
    kw = dict(scale=scale, causal=causal, window_size=window_size, backend=backend)
    if all(x == lens_list[0] for x in lens_list):
        n = lens_list[0] if B else 0
        return parallax_attention(q, r, gather_cache(k_cache, rows, n), gather_cache(v_cache, rows, n), **kw)
    K, cu_k = pack_cache(k_cache, rows, lens)
    V, _ = pack_cache(v_cache, rows, lens)
    cu_q = torch.arange(B + 1, device=q.device) * T
    o = parallax_attention(q.reshape(1, B * T, H, D), r.reshape(1, B * T, H, D), K, V, cu_seqlens_q=cu_q,
                           cu_seqlens_k=cu_k, max_seqlen_q=T, max_seqlen_k=max(lens_list), **kw)
    return o.reshape(B, T, H, Dv)
