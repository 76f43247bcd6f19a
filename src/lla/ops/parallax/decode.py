"""KV-cache decoding and chunked prefill for Parallax, mirroring ``lla.local_linear_attention_with_kvcache``.

Parallax has no fixed-size recurrent state either (the weights depend on the query), so it keeps
every key and value; each new query does one pass over its cache.

* A single new token (``T_new == 1``) runs one batched pass over the caches: logits and ``r . k``
  of every cached entry (``[B, H, S]``), the masked softmax, ``c``, the centred weights and the
  output, masking each sequence's entries past its length (ragged batches in one call).
* Chunks (``T_new > 1``, prefill on top of a cache) go through the public op per group of equal
  lengths, bottom-right aligned, which makes chunked prefill equal to the full forward.
"""

from __future__ import annotations

import torch

from ..lla.decode import append_to_cache, check_cache_seqlens
from .api import _check_qrkv, _check_scale, _check_window, parallax_attention

__all__ = ["parallax_attention_with_kvcache"]


def _decode_one(q, r, k_cache, v_cache, lens, scale, left):
    """One new query per sequence.  q, r [B, 1, H, D]; caches [B, S_max, Hk, *]; lens [B] int64.

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
    K = k_cache[:, :S].to(cdt).permute(0, 2, 1, 3)  # [B, Hk, S, D]
    V = v_cache[:, :S].to(cdt).permute(0, 2, 1, 3)
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
    scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
):
    """Parallax against a KV cache, new keys/values appended in place (flash-attn semantics).

    Args:
        q, r: ``[B, T_new, H, D]`` new queries and slope queries (``T_new == 1`` for a decoding step).
        k_cache: ``[B, S_max, Hk, D]`` key cache; ``H % Hk == 0`` (grouped-query).
        v_cache: ``[B, S_max, Hk, Dv]`` value cache.
        k, v: ``[B, T_new, Hk, D]`` / ``[B, T_new, Hk, Dv]`` new keys and values, or both None.  When
            given they are written **in place** into the caches at rows
            ``cache_seqlens[b] ... cache_seqlens[b] + T_new - 1`` of each sequence ``b``.
        cache_seqlens: int tensor ``[B]`` (or an int): entries already in each sequence's cache; may
            differ across the batch.  Not advanced here (the caller adds ``T_new``, as with flash-attn).
        scale: logit scale, default ``1 / sqrt(D)``.
        causal, window_size: as ``parallax_attention``, bottom-right aligned on each sequence's
            ``L_b = cache_seqlens[b] + T_new`` entries (``T_new`` only counted when ``k`` is given).
        backend: passed to the public op for chunks.

    Returns:
        ``o [B, T_new, H, Dv]`` in q's dtype.  A query that sees no entry outputs zeros.
    """
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or both None)")
    B, T, H, D, S_max, Hk, Dv = _check_qrkv(q, r, k_cache, v_cache)
    if k is not None:
        for name, x, want in (("k", k, (B, T, Hk, D)), ("v", v, (B, T, Hk, Dv))):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if tuple(x.shape) != want:
                raise ValueError(f"{name} must have shape [B, T_new, Hk, *] = {list(want)}, got {tuple(x.shape)}")
    t_add = T if k is not None else 0
    seqlens = check_cache_seqlens(cache_seqlens, B, t_add, S_max, q.device)
    scale = _check_scale(scale, D)
    window_size = _check_window(window_size, causal)
    if k is not None:
        append_to_cache(k_cache, v_cache, k, v, seqlens)
    lens = seqlens + t_add

    if T == 1:
        return _decode_one(q, r, k_cache, v_cache, lens, scale, window_size[0])
    out = q.new_zeros(B, T, H, Dv)
    lens_list = lens.tolist()
    for n in sorted(set(lens_list)):
        if n == 0:
            continue
        idx = [b for b, x in enumerate(lens_list) if x == n]
        sel = slice(None) if len(idx) == B else torch.tensor(idx, device=q.device)
        out[sel] = parallax_attention(q[sel], r[sel], k_cache[sel, :n], v_cache[sel, :n], scale=scale, causal=causal,
                                      window_size=window_size, backend=backend)
    return out
