"""KV-cache decoding and chunked prefill for Parallax, mirroring ``lla.local_linear_attention_with_kvcache``.

Parallax has no fixed-size recurrent state either (the weights depend on the query), so it keeps
every key and value; each new query does one pass over its cache.

* A single new token (``T_new == 1``) reads the caches once, in chunks, all query heads of a key head in
  one GEMM.  Sequences long enough (``PER_SEQUENCE``, ``common.kvcache.sequence_spans``'s rule) go one at
  a time, each over exactly the entries it sees, read in place (``_decode_each``: no masking, no copy, no
  work on another sequence's padding); shorter ones go in one batched pass (``_attend_chunked``): one GEMM
  per chunk of keys for the logits and ``r . k`` of every visible entry (kept: ``[B, H, S]`` each, no
  ``[S, D]`` temporary), the masked softmax, ``c`` and the centred weights, then one GEMM per chunk of
  values for the output; entries a row does not see (past its length, before its window) are masked, a
  chunk of values holding such entries is staged into a small buffer with them zeroed (they may hold
  anything).  When a gradient is needed the step runs on whole-span tensors instead
  (``_decode_one_autograd``).
* Chunks (``T_new > 1``, prefill on top of a cache) go through the public op: one batched call when
  every sequence has the same length, else one packed varlen call (``cu_seqlens_q`` /
  ``cu_seqlens_k``), bottom-right aligned per sequence, which makes chunked prefill equal to the full
  forward.  (``_attend_chunked`` takes ``T_new > 1`` rows too, bottom-right aligned, and is tested so; for
  64 new tokens on an 8K cache it was slower than the op in a one-off comparison on the loaded machine,
  keeping ``[T_new H, S]`` logits, so chunks are not routed to it.)
"""

from __future__ import annotations

import torch

from ..common.checks import (
    check_cache_batch_idx, check_cache_seqlens, check_new_kv, check_qkv, check_scale, check_tensor, check_window,
)
from ..common.kvcache import (
    append_to_cache, cache_chunk, chunk_keys, gather_cache, pack_cache, sequence_spans, stage_chunk,
)
from .api import parallax_attention

__all__ = ["parallax_attention_with_kvcache"]

#: When a batch's single-token step goes one sequence at a time (``common.kvcache.sequence_spans``'s rule,
#: ``(min_keys, pad_weight)``): a per-sequence pass costs ~0.15 ms of overhead, the batched pass copies its
#: GEMM operands (~4x an entry of one sequence's pass), so equal lengths break even at ~64 entries (B 32..256,
#: 16..8K entries, H 8, D 64, one thread).
PER_SEQUENCE = (64, 4.0)

#: Keys per GEMM of the per-sequence step when the cache is read in place (no temporaries to bound): 2048
#: was the fastest of 1024 / 2048 / 4096 at 8K-32K, B 1, H 8, D 64, 1 and 2 threads, two interleaved runs
#: (e.g. 32K, one thread: 1.70x / 1.66x / 1.80x SDPA; 16K, two threads: 2.22x / 1.99x / 1.99x).
VIEW_CHUNK = 2048


def _query_rows(q, r, scale, Hk, cdt):
    """q, r [B, T, H, D] -> ``[B, Hk, 2 T G, D]`` in ``cdt``: per key head the scaled queries, then the slope
    queries, rows ``(t, g)`` (query head ``h = hk G + g``): one GEMM against the keys gives logits and ``r . k``."""
    B, T, H, D = q.shape
    QR = torch.stack([q.to(cdt) * scale, r.to(cdt)], dim=1).reshape(B, 2, T, Hk, H // Hk, D).permute(0, 3, 1, 2, 4, 5)
    return QR.reshape(B, Hk, 2 * T * (H // Hk), D)


def _centred_weights(s, a):
    """Parallax's output weights ``w_j = s_j (1 - (a_j - c))``, ``c = sum_j s_j a_j`` (``s`` the softmax
    weights, ``a = r . k``, over the last dimension)."""
    c = (s * a).sum(-1, keepdim=True)
    return s * (1.0 - (a - c))


def _decode_one_autograd(q, r, k_cache, v_cache, rows, lens, scale, left):
    """One new query per sequence, on whole-span tensors (differentiable; ``_decode_one`` otherwise).  q, r [B, 1, H, D]; caches [B_cache, S_max, Hk, *], batch element
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
    la = _query_rows(q, r, scale, Hk, cdt) @ K.transpose(-1, -2)  # [B, Hk, 2 G, S]
    logits, a = la[:, :, :G], la[:, :, G:]
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    seen = visible.any(-1)[:, None, None, None]  # [B, 1, 1, 1]
    s = torch.where(seen, torch.softmax(logits, dim=-1), torch.zeros_like(logits))  # [B, Hk, G, S]
    w = _centred_weights(s, a)
    o = w @ V  # [B, Hk, G, Dv]
    return o.reshape(B, 1, H, Dv).to(q.dtype)


@torch.no_grad()
def _decode_each(q, r, k_cache, v_cache, spans, scale):
    """One new query per sequence, one sequence at a time over exactly the entries it sees (``spans``:
    ``(cache row, j0, j1)`` per batch element, ``common.kvcache.sequence_spans``), the cache read in place:
    per sequence one GEMM for the logits and ``r . k`` of all its query heads (``[Hk, 2 G, n]``, kept), the
    softmax, ``c`` and the centred weights, one GEMM for the output (both in chunks: ``VIEW_CHUNK`` entries
    of a cache in the compute dtype, else ``chunk_keys`` entries converted chunk by chunk); the arithmetic of
    ``_decode_one_autograd``, no gradient, no masking (nothing outside the span enters).
    -> o [B, 1, H, Dv]."""
    B, _, H, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    QR = _query_rows(q, r, scale, Hk, cdt)  # [B, Hk, 2 G, D]
    o = torch.zeros(B, Hk, G, Dv, dtype=cdt, device=q.device)
    for b, (row, j0, j1) in enumerate(spans):
        n = j1 - j0
        if n <= 0:
            continue
        if k_cache.dtype == cdt and v_cache.dtype == cdt:  # views: the chunk only blocks the GEMMs
            step = min(n, VIEW_CHUNK)
        else:  # converted chunk by chunk: chunks bound the temporaries
            step = chunk_keys(1, Hk, max(D, Dv), n)
        la = torch.empty(Hk, 2 * G, n, dtype=cdt, device=q.device)  # logits | r . k
        parts = [(j0 + a, j0 + min(a + step, n), slice(a, min(a + step, n))) for a in range(0, n, step)]
        for e0, e1, part in parts:  # [Hk, n, D] views of the cache row: no copy
            la[..., part] = QR[b] @ k_cache[row, e0:e1].to(cdt).transpose(0, 1).transpose(1, 2)
        w = _centred_weights(torch.softmax(la[:, :G], dim=-1), la[:, G:])  # [Hk, G, n]
        for e0, e1, part in parts:
            o[b] += w[..., part] @ v_cache[row, e0:e1].to(cdt).transpose(0, 1)
    return o.reshape(B, 1, H, Dv).to(q.dtype)


@torch.no_grad()
def _attend_chunked(q, r, k_cache, v_cache, rows, lens, scale, left):
    """``T_new >= 1`` new queries per sequence, causal and bottom-right aligned (new query ``t`` of sequence
    ``b`` sees entries ``max(0, e - 1 - left) <= j < e``, ``e = lens[b] - T_new + t + 1``; ``left < 0``: from
    0), in chunks of the cache (see the module docstring); for ``T_new = 1`` the arithmetic of
    ``_decode_one_autograd`` (same arguments and result), no gradient.  -> o [B, T_new, H, Dv]."""
    B, T, H, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    dev = q.device
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    end = lens[:, None] - T + 1 + torch.arange(T, device=dev)[None, :]  # [B, T]: row (b, t) sees j < end
    first = (end - 1 - left).clamp_min(0) if left >= 0 else torch.zeros_like(end)
    if not B:
        return q.new_zeros(B, T, H, Dv)
    S0, S1, first_max, end_min = torch.stack([first.min(), end.max(), first.max(), end.min()]).tolist()
    S0, S1 = max(S0, 0), max(S1, 0)
    if S1 <= S0:
        return q.new_zeros(B, T, H, Dv)
    n_all = S1 - S0
    C = chunk_keys(B, Hk, max(D, Dv), n_all)
    parts = []
    for j0 in range(S0, S1, C):
        j1 = min(j0 + C, S1)
        hide = None
        if j0 < first_max or j1 > end_min:  # some row does not see all of it
            j = torch.arange(j0, j1, device=dev)[None, None, :]
            hide = (j < first[..., None]) | (j >= end[..., None])  # [B, T, n]
        parts.append((j0 - S0, j1 - j0, hide))
    QR = _query_rows(q, r, scale, Hk, cdt)  # [B, Hk, 2 T G, D]
    la = torch.empty(B, Hk, 2, T, G, n_all, dtype=cdt, device=dev)  # logits | r . k
    for a, n, hide in parts:
        part = la[..., a : a + n]
        part.copy_((QR @ cache_chunk(k_cache, rows, S0 + a, S0 + a + n).to(cdt).transpose(-1, -2)).view(B, Hk, 2, T, G, n))
        if hide is not None:
            part[:, :, 0].masked_fill_(hide[:, None, :, None, :], float("-inf"))
            part[:, :, 1].masked_fill_(hide[:, None, :, None, :], 0.0)
    logits, ak = la[:, :, 0], la[:, :, 1]  # [B, Hk, T, G, n]
    seen = (end > first)[:, None, :, None, None]  # [B, 1, T, 1, 1]
    s = torch.where(seen, torch.softmax(logits, dim=-1), torch.zeros_like(logits))
    w = _centred_weights(s, ak).reshape(B, Hk, T * G, n_all)
    o = torch.zeros(B, Hk, T * G, Dv, dtype=cdt, device=dev)
    buf = None
    for a, n, hide in parts:
        if hide is None:
            V = cache_chunk(v_cache, rows, S0 + a, S0 + a + n).to(cdt)
        else:  # entries no row of a sequence sees may hold anything (NaN): zeroed in a staged copy
            if buf is None:
                buf = torch.empty(B * Hk * min(n_all, C) * Dv, dtype=cdt, device=dev)
            V = stage_chunk(v_cache, rows, S0 + a, S0 + a + n, buf, cdt, hide.all(1))
        o.add_(w[..., a : a + n] @ V)
    return o.view(B, Hk, T, G, Dv).permute(0, 2, 1, 3, 4).reshape(B, T, H, Dv).to(q.dtype)


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

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, r, k_cache, v_cache))
    if T == 1:
        if grad:
            return _decode_one_autograd(q, r, k_cache, v_cache, rows, lens, scale, window_size[0])
        spans = sequence_spans(lens, rows, window_size[0], PER_SEQUENCE)
        if spans is not None:
            return _decode_each(q, r, k_cache, v_cache, spans, scale)
        return _attend_chunked(q, r, k_cache, v_cache, rows, lens, scale, window_size[0])
    lens_list = lens.tolist()
    kw = dict(scale=scale, causal=causal, window_size=window_size, backend=backend)
    if all(x == lens_list[0] for x in lens_list):
        n = lens_list[0] if B else 0
        return parallax_attention(q, r, gather_cache(k_cache, rows, n), gather_cache(v_cache, rows, n), **kw)
    K, cu_seqlens_k = pack_cache(k_cache, rows, lens)
    V, _ = pack_cache(v_cache, rows, lens)
    cu_seqlens_q = torch.arange(B + 1, device=q.device) * T
    o = parallax_attention(q.reshape(1, B * T, H, D), r.reshape(1, B * T, H, D), K, V, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, max_seqlen_q=T, max_seqlen_k=max(lens_list), **kw)
    return o.reshape(B, T, H, Dv)
