"""Packed sequences (flash-attn's varlen), one implementation for every op and backend.

A packed call holds ``N`` sequences in one batch row: sequence ``n`` is the query rows
``cu_seqlens_q[n]:cu_seqlens_q[n + 1]`` against the key rows ``cu_seqlens_k[n]:cu_seqlens_k[n + 1]``,
bottom-right aligned on its own keys (its last query sees its last key) and seeing nothing else.

* ``Varlen``: the checked offsets (``checks.check_varlen`` builds it from the public arguments);
* ``segments``: the same as ``(query slice, key slice)`` pairs, for backends that loop over sequences;
* ``row_ranges``: the same as per-row key ranges (and per-key query ranges), for fused kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Varlen", "varlen_of", "segments", "with_queries", "longest_keys", "row_ranges"]


class Varlen(NamedTuple):
    """Packed sequences: ``N + 1`` int64 offsets into the query rows (``cu_seqlens_q``) and the key rows
    (``cu_seqlens_k``; the same tensor object for self-attention).  ``max_seqlen_q`` / ``max_seqlen_k``: the
    caller's longest-sequence hints (None when not given; checked, never needed)."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None


def varlen_of(cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None = None) -> Varlen | None:
    """``Varlen`` from the offsets a custom op carries (``cu_seqlens_k`` None: the query offsets; both None:
    not packed, None)."""
    if cu_seqlens_q is None:
        return None
    return Varlen(cu_seqlens_q, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k)


def segments(varlen: Varlen | None, T: int, S: int) -> list[tuple[slice, slice]]:
    """``[(query rows, key rows)]`` of each packed sequence (one host read of the offsets); the whole
    input ``[(0:T, 0:S)]`` when not packed."""
    if varlen is None:
        return [(slice(0, T), slice(0, S))]
    cq = varlen.cu_seqlens_q.tolist()
    ck = cq if varlen.cu_seqlens_k is varlen.cu_seqlens_q else varlen.cu_seqlens_k.tolist()
    return [(slice(a, b), slice(c, d)) for a, b, c, d in zip(cq, cq[1:], ck, ck[1:])]


def with_queries(segs: list[tuple[slice, slice]]) -> list[tuple[slice, slice]]:
    """The segments that hold query rows (an empty query sequence contributes nothing)."""
    return [(sq, sk) for sq, sk in segs if sq.stop > sq.start]


def longest_keys(segs: list[tuple[slice, slice]]) -> int:
    """The longest sequence's key count (of every segment, with or without queries)."""
    return max((sk.stop - sk.start for _sq, sk in segs), default=0)


def row_ranges(T: int, S: int, window_size, varlen: Varlen | None, device):
    """Visibility as ranges: query ``i`` sees keys ``lo[i] <= j <= hi[i]``; key ``j`` is seen by
    queries ``qlo[j] <= i <= qhi[j]``.  All int32 on ``device``; empty ranges have lo > hi.

    Bottom-right alignment and flash-attn windows, per packed sequence when ``varlen`` is given.  A row
    that sees nothing gets ``hi = lo - 1`` at its sequence's first key, so both bounds stay
    non-decreasing in ``i`` (across sequences too) and the queries that see a key form a range.
    """
    i = torch.arange(T, device=device, dtype=torch.int64)
    left, right = window_size
    if varlen is None:
        start, end, diag = torch.zeros_like(i), torch.full_like(i, S), i + (S - T)
    else:
        cq = varlen.cu_seqlens_q.to(device=device, dtype=torch.int64)
        ck = varlen.cu_seqlens_k.to(device=device, dtype=torch.int64)
        seg = torch.bucketize(i, cq[1:], right=True)  # the sequence of each query row
        start, end = ck[seg], ck[seg + 1]
        diag = end - (cq[seg + 1] - i)  # key aligned with query i: the sequences' last rows align
    lo, hi = start, end - 1
    if right >= 0:
        hi = torch.minimum(hi, diag + right)
    if left >= 0:
        lo = torch.maximum(lo, diag - left)
    hi = torch.maximum(hi, start - 1)  # nothing visible: an empty range at the sequence's start
    lo = lo.clamp(0, S)
    hi = hi.clamp(-1, S - 1)
    j = torch.arange(S, device=device, dtype=torch.int64)
    qlo = torch.searchsorted(hi, j, right=False)  # first row whose range reaches key j
    qhi = torch.searchsorted(lo, j, right=True) - 1  # last row whose range starts at or before j
    return tuple(t.to(torch.int32).contiguous() for t in (lo, hi, qlo, qhi))
