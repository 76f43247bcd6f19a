"""KV-cache plumbing shared by ``lla.local_linear_attention_with_kvcache`` and
``lla.parallax_attention_with_kvcache``: writing new entries, gathering / packing the entries a batch
uses (chunks through the public ops), and the chunked reads of the single-token steps.

A single-token step reads the cache in chunks of ``chunk_keys(...)`` entries: ``stage_chunk`` copies
entries ``j0:j1`` of the batch's cache rows into one small contiguous ``[B, Hk, n, D]`` buffer in the
compute dtype (the GEMMs then run on a packed operand that stays in cache), zeroing the entries a row does
not see (past its length, before its window: they may hold anything).  No step copies more than a chunk
of the cache.
"""

from __future__ import annotations

import torch

__all__ = ["append_to_cache", "gather_cache", "pack_cache", "visible_span", "chunk_keys", "chunk_parts", "cache_chunk", "stage_chunk",
           "sequence_spans"]

#: Elements of the largest per-chunk temporary of a single-token step (``[B, H, D, n]``: the weighted keys
#: of LLA's moment GEMM with grouped heads; the staged keys otherwise); the chunk length is this over ``B H D`` (at least ``MIN_CHUNK``).  2^19 fp32
#: elements = 2 MiB: with B 1, H 8, D 64 a chunk is 1024 keys.
CHUNK_ELEMS = 1 << 19
MIN_CHUNK = 512  # below this, per-chunk dispatch dominates (B 8: 16 chunks of 512 over an 8K cache, not 64 of 128)

#: A single-token step over a batch of ``B > 1`` sequences either takes them one at a time, each over exactly
#: the entries it sees, read in place (``sequence_spans``), or makes one batched pass over the span some row
#: sees (``visible_span``; entries a row does not see masked and staged).  Batched, a ``[B, Hk, n, D]`` chunk
#: of a ``[B, S, Hk, D]`` cache is no single strided batch, so GEMM operands are copied, and a ragged batch
#: does the longest row's work for every row; one at a time costs a fixed overhead per sequence.  Each
#: mechanism's rule is ``(min_keys, pad_weight)``: per sequence when ``pad_weight * span - mean >=
#: (pad_weight - 1) * min_keys`` (``span``: entries the batched pass covers, ``mean``: entries a sequence sees
#: on average), i.e. from ``min_keys`` entries at equal lengths, sooner the more padding a ragged batch
#: carries (``pad_weight``: what an entry costs the batched pass over what it costs one sequence's pass).
#: Fitted on B 4..256, 16..8K entries, ragged and not, H 8, D 64, one thread
#: (``lla.ops.lla.decode.PER_SEQUENCE``, ``lla.ops.parallax.decode.PER_SEQUENCE``).


def append_to_cache(k_cache, v_cache, k, v, seqlens, rows=None) -> None:
    """Write ``k, v [B, T_new, Hk, *]`` in place at entries ``seqlens[b] + t`` of cache row ``rows[b]``
    (``rows`` None: row ``b``), detached: no gradient flows through the cache."""
    B, T = k.shape[:2]
    with torch.no_grad():
        if rows is None and T == 1:  # a decoding step: one scatter per cache
            bidx = torch.arange(B, device=seqlens.device)
            k_cache[bidx, seqlens] = k[:, 0].detach().to(k_cache.dtype)
            v_cache[bidx, seqlens] = v[:, 0].detach().to(v_cache.dtype)
            return
        pos = seqlens[:, None] + torch.arange(T, device=seqlens.device)[None, :]  # [B, T]
        bidx = (torch.arange(B, device=seqlens.device) if rows is None else rows)[:, None].expand(B, T)
        k_cache[bidx, pos] = k.detach().to(k_cache.dtype)
        v_cache[bidx, pos] = v.detach().to(v_cache.dtype)


def gather_cache(cache, rows, n):
    """The first ``n`` entries of the cache rows the batch uses: a view without ``rows``, else a gather."""
    return cache[:, :n] if rows is None else cache[rows, :n]


def pack_cache(cache, rows, lens):
    """The first ``lens[b]`` entries of each batch element's cache row, packed: ``[1, sum(lens), Hk, *]``
    and the int64 offsets ``[B + 1]`` (for ``cu_seqlens_k``)."""
    B = lens.shape[0]
    cu = torch.zeros(B + 1, dtype=torch.int64, device=lens.device)
    cu[1:] = lens.cumsum(0)
    total = int(cu[-1])
    rows = torch.arange(B, device=lens.device) if rows is None else rows
    seq = torch.repeat_interleave(torch.arange(B, device=lens.device), lens, output_size=total)
    pos = torch.arange(total, device=lens.device) - cu[seq]
    return cache[rows[seq], pos].unsqueeze(0), cu


def _first_visible(lens, left):
    """The first entry the newest query of each sequence sees: ``lens - 1 - left`` (window), else 0."""
    return (lens - 1 - left).clamp_min(0) if left >= 0 else torch.zeros_like(lens)


def visible_span(lens, left):
    """Row ``b`` sees cache entries ``first[b] <= j < lens[b]`` (``left < 0``: from 0).  -> (first [B],
    ``S0, S1`` the span some row sees, ``first_max, lens_min``: entries ``first_max <= j < lens_min`` every
    row sees), one host read."""
    first = _first_visible(lens, left)
    if not lens.numel():
        return first, 0, 0, 0, 0
    S0, S1, first_max, lens_min = torch.stack([first.min(), lens.max(), first.max(), lens.min()]).tolist()
    return first, S0, S1, first_max, lens_min


def sequence_spans(lens, rows, left, rule):
    """Per batch element ``b``: ``(cache row, j0, j1)``, the entries ``j0 <= j < j1`` it sees (``left < 0``:
    from 0; ``rows`` None: row ``b``), one host read; ``None`` when the mechanism's ``rule = (min_keys,
    pad_weight)`` (above) prefers one batched pass."""
    first = _first_visible(lens, left)
    r = torch.arange(lens.shape[0], device=lens.device) if rows is None else rows.to(lens.dtype)
    spans = [tuple(x) for x in torch.stack([r, first, lens], 1).tolist()]
    if not spans:
        return None
    min_keys, pad_weight = rule
    span = max(j1 for _, _, j1 in spans) - min(j0 for _, j0, _ in spans)
    mean = sum(j1 - j0 for _, j0, j1 in spans) / len(spans)
    return spans if pad_weight * span - mean >= (pad_weight - 1) * min_keys else None


def chunk_keys(B: int, H: int, D: int, n: int) -> int:
    """Keys per chunk of a single-token step over ``n`` cache entries (see ``CHUNK_ELEMS``)."""
    return max(1, min(n, max(MIN_CHUNK, CHUNK_ELEMS // max(1, B * H * D))))


def chunk_parts(first, lens, span, C: int):
    """The span ``S0:S1`` of ``visible_span`` in chunks of ``C`` entries: ``[(offset into the span, n, hide)]``,
    ``hide [B, n]`` the entries a row does not see (None where every row sees the whole chunk)."""
    _, S0, S1, first_max, lens_min = span
    parts = []
    for j0 in range(S0, S1, C):
        j1 = min(j0 + C, S1)
        hide = None
        if j0 < first_max or j1 > lens_min:
            j = torch.arange(j0, j1, device=lens.device)[None, :]
            hide = (j < first[:, None]) | (j >= lens[:, None])
        parts.append((j0 - S0, j1 - j0, hide))
    return parts


def cache_chunk(cache, rows, j0: int, j1: int):
    """Entries ``j0:j1`` of the batch's cache rows as a ``[B, Hk, n, D]`` view (a gather of one chunk with
    ``rows``).  cache [B_cache, S_max, Hk, D]."""
    part = cache[:, j0:j1] if rows is None else cache[rows, j0:j1]  # [B, n, Hk, D]
    return part.permute(0, 2, 1, 3)


def stage_chunk(cache, rows, j0: int, j1: int, buf, dtype, hide=None, shift=None):
    """Entries ``j0:j1`` of the batch's cache rows, minus ``shift`` (optional, ``[B, Hk, 1, D]``), as a
    contiguous ``[B, Hk, n, D]`` tensor in ``dtype`` written into ``buf`` (a flat buffer of at least
    ``B Hk n D`` elements), in one pass; ``hide [B, n]`` (optional): entries set to zero (a row does not see
    them; they may hold anything).  cache [B_cache, S_max, Hk, D]."""
    part = cache_chunk(cache, rows, j0, j1)
    B, Hk, n, D = part.shape
    out = buf[: B * Hk * n * D].view(B, Hk, n, D)
    if shift is None:
        out.copy_(part)
    else:
        torch.sub(part.to(dtype), shift, out=out)
    if hide is not None:
        out.masked_fill_(hide[:, None, :, None], 0.0)
    return out
