"""KV-cache decoding and chunked prefill for LLA, mirroring flash-attn's ``flash_attn_with_kvcache``.

LLA has no fixed-size recurrent state (``Sigma_i`` depends on the query), so, like softmax
attention, it keeps every key and value and each new query does a pass over the cache.

* Chunks (``T_new > 1``, prefill on top of a cache, or ``solver="cg"``) go through the public op:
  one batched call when every sequence has the same length, else one packed varlen call
  (``cu_seqlens_q`` / ``cu_seqlens_k``) whose per-sequence bottom-right causal alignment makes chunked
  prefill equal to the full forward.
* A single new token (``T_new == 1``, decoding) runs the PyTorch backend's numerics on one row per
  query head: the softmax weights over the visible cache entries, the keys shifted by the backend's
  per-tile rule (the coordinate-wise median of the last ``SHIFT_SAMPLE`` keys the row sees), the
  weighted mean ``m``, and ``A x = m - q`` solved by ``solvers.direct_solve`` (``A`` formed with the
  streamed moment GEMM, Cholesky, refinement with the centred ``cov_matvec``, the true residual at
  exit).  Prefill and decode run the same moment and solve code.  Extra memory is ``O(S)`` per
  head: the weights ``[B, H, S]``, the shifted keys (one compute-dtype copy of the visible cache
  span) and the ``D x D`` moment per head (formed over key chunks).

Per query row, with softmax weights ``s_j`` over the cache entries it sees (every statistic is
the row's own: entries it does not see never enter its arithmetic):

    m = sum_j s_j k_j,   A = sum_j s_j (k_j - m)(k_j - m)^T + lam I,   x = A^{-1} (m - q)
    o = sum_j s_j (1 - (k_j - m) . x) v_j

The single-token path reports like the op: the solve's true relative residual and the rounding
amplification go through ``lla.ops.diagnostics`` (``check_solve`` / ``check_conditioning``).  With at
most ``solvers.FEW_ROWS`` query heads per key head it follows the op's few-row rules: ``m`` over the
weights' computed sum, ``y . x`` relative to each row's pivot key, and the amplification from the
row's own sensitivity ``M' A^-1`` (``function._sensitivity``, from the direct solve's Cholesky factor).
"""

from __future__ import annotations

import torch

from ..checks import (
    check_bool, check_cache_batch_idx, check_cache_seqlens, check_new_kv, check_qkv, check_ridge, check_scale,
    check_solver_options, check_window,
)
from ..diagnostics import check_conditioning, check_solve, default_tol
from .api import LLAAux, local_linear_attention
from .torch_backend.function import (  # the backend's code, shared
    SHIFT_SAMPLE, _amplification, _floor, _hopeless_rows, _sensitivity,
)
from .torch_backend.solvers import FEW_ROWS, direct_solve

__all__ = ["local_linear_attention_with_kvcache", "append_to_cache", "gather_cache", "pack_cache"]

_OP = "local_linear_attention_with_kvcache"

#: Keys per chunk of the single-token step's moment passes (bounds their temporaries).
DECODE_CHUNK = 1024


def _visible_span(lens, left):
    """Row ``b`` sees cache entries ``first[b] <= j < lens[b]``.  -> (first [B], the span ``S0:S1`` any
    row sees, whether some row sees only part of it), one host read."""
    first = (lens - 1 - left).clamp_min(0) if left >= 0 else torch.zeros_like(lens)
    if not lens.numel():
        return first, 0, 0, False
    S0, S1, first_max, lens_min = torch.stack([first.min(), lens.max(), first.max(), lens.min()]).tolist()
    return first, S0, S1, first_max > S0 or lens_min < S1


def _key_shift(K, first, lens, S0):
    """The backend's tile shift for one row per sequence: the coordinate-wise (lower) median of the
    last ``SHIFT_SAMPLE`` keys the row sees, zero when it sees none.  K [B, Hk, n, D] (entries
    ``S0 + j``) -> ``[B, Hk, 1, D]``, detached (the output does not depend on it)."""
    B, Hk, n, D = K.shape
    idx = lens[:, None] - 1 - torch.arange(SHIFT_SAMPLE, device=K.device)[None, :]  # [B, SHIFT_SAMPLE]
    ok = (idx >= first[:, None]) & (idx >= S0)
    idx = (idx - S0).clamp(0, max(n - 1, 0))
    picked = K.detach().gather(2, idx[:, None, :, None].expand(B, Hk, SHIFT_SAMPLE, D))
    picked = picked.masked_fill(~ok[:, None, :, None], float("nan"))
    return picked.nanmedian(dim=2, keepdim=True).values.nan_to_num(0.0)


def _chunk_moments(kc, K, V, j0, j1):
    """``[(k - c)^2 | |k - c| | |k| | |v|]`` of keys ``j0:j1``: ``[B, Hk, c, D + 3]``."""
    kc2 = kc[..., j0:j1, :].square()
    k2 = K[..., j0:j1, :].square().sum(-1, keepdim=True)
    v2 = V[..., j0:j1, :].square().sum(-1, keepdim=True)
    return torch.cat([kc2, torch.cat([kc2.sum(-1, keepdim=True), k2, v2], dim=-1).sqrt()], dim=-1)


def _decode_one(q, k_cache, v_cache, rows, lens, lam, scale, left, tol):
    """Single-query LLA with the backend's moment / solve code, and what it needs to report.

    q [B, 1, H, D]; caches [B_cache, S_max, Hk, *], batch element ``b`` reading cache row
    ``rows[b]`` (``rows`` None: row ``b``); lens [B] int64; lam [B, 1, H].  Row ``b`` sees entries
    ``max(lens[b] - 1 - left, 0) <= j < lens[b]`` (``left < 0``: from 0).  Returns ``o [B, 1, H, Dv]``
    in q's dtype, ``lse [B, 1, H]`` float32 (``-inf`` for a row that sees nothing) and ``stats [4]``
    (worst true relative residual of the solve, worst amplification as in ``LLAAux``, and the
    residual and rounding floor of the row furthest past its tolerance, for ``check_solve``), each
    estimate the backend's own (``_floor``, ``_amplification``).
    """
    B, _, H, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    first, S0, S1, partial = _visible_span(lens, left)
    if S1 == 0:
        lse = torch.full((B, 1, H), float("-inf"), dtype=torch.float32, device=q.device)
        return q.new_zeros(B, 1, H, Dv), lse, torch.zeros(4, dtype=cdt)
    sel = slice(None) if rows is None else rows
    K = k_cache[sel, S0:S1].to(cdt).permute(0, 2, 1, 3)  # [B, Hk, n, D]
    V = v_cache[sel, S0:S1].to(cdt).permute(0, 2, 1, 3)
    j = torch.arange(S0, S1, device=q.device)[None, :]
    visible = (j >= first[:, None]) & (j < lens[:, None])  # [B, n]
    if partial:  # entries a row does not see may hold anything (garbage, another sequence's keys)
        hide = ~visible[:, None, :, None]
        K, V = K.masked_fill(hide, 0.0), V.masked_fill(hide, 0.0)
    Q = q.to(cdt).reshape(B, Hk, G, D)  # query head h = hk * G + g
    L = lam.to(cdt).reshape(B, Hk, G)
    logits = (Q * scale) @ K.transpose(-1, -2)  # [B, Hk, G, n]
    if partial:
        logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf for a row that sees nothing
    has_key = (lens > 0)[:, None, None, None]
    s = torch.softmax(logits.masked_fill(~has_key, 0.0), dim=-1) * has_key  # rows with no key: s = 0
    shift = _key_shift(K, first, lens, S0)  # [B, Hk, 1, D]
    kc = K - shift
    # the weighted mean in the shifted frame, over the weights' computed sum (1 only to rounding; see
    # function._centred): [B, Hk, G, D]
    ssum = s.sum(-1, keepdim=True).clamp_min(torch.finfo(cdt).tiny)
    m = (s @ kc) / ssum
    b = m - (Q - shift)
    few = G <= FEW_ROWS  # the op's few-row rules (pivoted y . x, ``_sensitivity``) for its one-row tiles
    x, residual, chol = direct_solve(s, kc, m, L, b, tol=tol, factor=True)
    # the moments the estimates need, [E (k - c)^2 | E|k - c| | E|k| | E|v|], over key chunks (no second
    # cache-sized temporary)
    ext = sum(s[..., j0 : j0 + DECODE_CHUNK] @ _chunk_moments(kc, K, V, j0, j0 + DECODE_CHUNK)
              for j0 in range(0, kc.shape[-2], DECODE_CHUNK))
    floor = _floor(torch.finfo(cdt).eps, x, b, L, ext[..., :D].sum(-1), m)
    # output weights w_j = s_j (1 - y_j . x), y_j . x as the backend's ``_centred`` forms it (relative to the
    # row's pivot key, then centred with the weighted mean of the computed products: a row whose weight sits
    # on one key gets y . x = 0 there), with the op's rule for when to pivot
    yx = x @ kc.transpose(-1, -2)  # out of place (the step is differentiable)
    if few:
        yx = yx - yx.gather(-1, s.argmax(-1, keepdim=True))
    w = s - s * (yx - (s * yx).sum(-1, keepdim=True) / ssum)
    o = w @ V  # [B, Hk, G, Dv]
    live = has_key[..., 0].expand(B, Hk, G)
    hopeless = None
    if cdt != torch.float64:  # rows the working precision cannot solve: in float64, as the op does
        hopeless = (_hopeless_rows("direct", residual, floor) | ~torch.isfinite(o).all(-1)) & live
        if bool(hopeless.any()):
            o64, _lse64, st64 = _decode_one(q.double(), k_cache, v_cache, rows, lens, lam.double(), scale, left, tol)
            o = torch.where(hopeless.unsqueeze(-1), o64.reshape(B, Hk, G, Dv).to(cdt), o)
            residual = torch.where(hopeless, st64[0].to(cdt), residual)
            floor = floor.masked_fill(hopeless, 0.0)
        else:
            hopeless = None
    # the backend's rounding estimate, from the same moments: [m | sum s | E (k - c)^2 | E|k - c| | E|k|]
    mom = torch.cat([m, s.sum(-1, keepdim=True), ext[..., : D + 2]], dim=-1)
    on = o.norm(dim=-1)
    rel = ext[..., D + 2] / torch.maximum(on, on.mean(-1, keepdim=True)).clamp_min(torch.finfo(cdt).tiny)
    with torch.no_grad():
        sens = (_sensitivity(s, kc, V, m, chol, b, residual, ext[..., D], Q - shift, ext[..., D + 2], chunk_elems=1 << 20)
                if few else None)
    amplification = _amplification(w, x, m, Q - shift, L, mom, D, scale, Q, s.amax(-1), rel, sens, skip=hopeless)
    # the solve's report: the worst residual, and the residual and floor of the row furthest past max(tol, floor)
    residual, floor = torch.where(live, residual, 0.0), torch.where(live, floor, 0.0)
    worst = (residual / floor.clamp_min(tol)).reshape(-1).argmax()
    stats = torch.stack([residual.amax(), amplification, residual.reshape(-1)[worst], floor.reshape(-1)[worst]])
    return o.reshape(B, 1, H, Dv).to(q.dtype), lse.reshape(B, 1, H).float(), stats.detach()


def append_to_cache(k_cache, v_cache, k, v, seqlens, rows=None) -> None:
    """Write ``k, v [B, T_new, Hk, *]`` in place at entries ``seqlens[b] + t`` of cache row ``rows[b]``
    (``rows`` None: row ``b``), detached: no gradient flows through the cache."""
    B, T = k.shape[:2]
    pos = seqlens[:, None] + torch.arange(T, device=seqlens.device)[None, :]  # [B, T]
    bidx = (torch.arange(B, device=seqlens.device) if rows is None else rows)[:, None].expand(B, T)
    with torch.no_grad():
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


def local_linear_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens,
    cache_batch_idx: torch.Tensor | None = None,
    ridge=1.0,
    scale: float | None = None,
    solver: str = "auto",
    max_iters: int | None = None,
    tol: float | None = None,
    backend: str = "auto",
    window_size: tuple[int, int] = (-1, -1),
    return_aux: bool = False,
):
    """LLA against a KV cache, with the new keys/values appended in place (flash-attn semantics).

    Args:
        q: ``[B, T_new, H, D]`` new queries (``T_new == 1`` for a decoding step).
        k_cache: ``[B_cache, S_max, Hk, D]`` key cache; ``H % Hk == 0`` (grouped-query).
        v_cache: ``[B_cache, S_max, Hk, Dv]`` value cache.
        k, v: ``[B, T_new, Hk, D]`` / ``[B, T_new, Hk, Dv]`` new keys and values, or both None.  When
            given they are written **in place** into the caches at entries
            ``cache_seqlens[b] ... cache_seqlens[b] + T_new - 1`` of each batch element's cache row.
            They are written **detached**: no gradient flows through the cache (into ``k``, ``v``, or
            later calls that read them back).
        cache_seqlens: int tensor ``[B]`` (or an int): entries already in each batch element's cache
            row; may differ across the batch.  Not advanced here: the caller adds ``T_new``
            afterwards, as with flash-attn.
        cache_batch_idx: optional int32/int64 ``[B]`` (flash-attn's): the cache row batch element
            ``b`` uses, in ``[0, B_cache)``, distinct when ``k``/``v`` are written.  Default: row ``b``
            (then ``B_cache == B``).
        ridge: float or tensor broadcastable to ``[B, T_new, H]``, > 0.
        scale: logit scale, default ``1 / sqrt(D)``.
        solver: ``"auto"`` (the direct ``D x D`` solve for one new token, the public op's rule for
            chunks), ``"direct"``, or ``"cg"`` (always through the public op).
        max_iters, backend: passed to the public op for chunks / ``solver="cg"``.
        tol: the public op's CG tolerance; for the direct single-token solve, the true relative
            residual above which (times ``RESIDUAL_FACTOR``) it warns.  Default per dtype
            (``lla.ops.diagnostics.default_tol``).
        window_size: ``(left, right)``, flash-attn semantics (``right`` is moot: causal): new query
            ``t`` of sequence ``b`` also only sees entries ``j >= L_b - T_new + t - left``; ``-1``
            unbounded.  The single-token path then reads only the last ``left + 1`` entries.
        return_aux: also return an ``lla.LLAAux``.

    Sequence ``b`` sees the first ``L_b = cache_seqlens[b] + T_new`` entries of its cache row
    (``T_new`` only counted when ``k`` is given); its queries attend causally, bottom-right aligned:
    new query ``t`` sees entries ``j <= L_b - T_new + t``.  Entries a query does not see (past
    ``L_b``, before its window, another row's) never enter its arithmetic.  The output is
    differentiable in ``q``, the ridge and the caches (when they require grad), not in ``k``, ``v``.

    Diagnostics are the op's: a solve whose true relative residual misses ``RESIDUAL_FACTOR * tol``,
    or a system too ill-conditioned for the dtype, warns (``LLAConvergenceWarning``, named
    ``local_linear_attention_with_kvcache`` for the single-token path).

    Returns:
        ``o [B, T_new, H, Dv]`` in q's dtype, or ``(o, LLAAux)`` with ``return_aux=True`` (single
        token: ``iters = 0``, ``solver = "direct"``, ``residual`` / ``amplification`` the worst over
        rows; chunks: the public op's).  A sequence that sees no entry outputs zeros (``lse = -inf``).
    """
    B, T, H, D, S_max, _Hk, _Dv = shape = check_qkv(q, k_cache, v_cache, k_name="k_cache", v_name="v_cache",
                                                    same_batch=False)
    check_new_kv(k, v, shape)
    t_add = T if k is not None else 0
    rows = check_cache_batch_idx(cache_batch_idx, B, k_cache.shape[0], k is not None, q.device)
    seqlens = check_cache_seqlens(cache_seqlens, B, t_add, S_max, q.device)
    left = check_window(window_size, True)[0]
    check_solver_options(solver, max_iters, tol)
    check_bool("return_aux", return_aux)
    scale = check_scale(scale, D)
    if isinstance(ridge, torch.Tensor):
        ridge = ridge.to(q.device)  # the cache op accepts a ridge on another device
    lam = check_ridge(ridge, B, T, H, q)
    if k is not None:
        append_to_cache(k_cache, v_cache, k, v, seqlens, rows)
    lens = seqlens + t_add  # [B] visible entries

    if T == 1 and solver in ("auto", "direct"):
        tol = float(default_tol(q.dtype) if tol is None else tol)
        o, lse, stats = _decode_one(q, k_cache, v_cache, rows, lens, lam, scale, left, tol)
        residual, amplification = (float("nan"), float("nan"))
        if not torch.compiler.is_compiling():
            residual, amplification, chk_residual, chk_floor = stats.tolist()
            lam_min = float(lam.detach().min()) if lam.numel() else float("nan")
            check_solve(stage="forward", solver="direct", residual=chk_residual, tol=tol, lam_min=lam_min, op=_OP,
                        floor=chk_floor)
            check_conditioning(amplification, q.dtype, op=_OP)
        if return_aux:
            return o, LLAAux(iters=0, residual=residual, lse=lse, solver="direct", amplification=amplification)
        return o
    return _chunk(q, k_cache, v_cache, rows, lens, lam, scale=scale, left=left, solver=solver, max_iters=max_iters,
                  tol=tol, backend=backend, return_aux=return_aux)


def _chunk(q, k_cache, v_cache, rows, lens, lam, *, return_aux, **kw):
    """New queries through the public op, bottom-right causal on each sequence's ``lens[b]`` entries:
    one batched call when all lengths are equal, else one packed varlen call."""
    B, T, H, _ = q.shape
    lens_list = lens.tolist()
    n = lens_list[0] if B else 0
    op_kw = dict(ridge=lam, scale=kw["scale"], causal=True, window_size=(kw["left"], -1), solver=kw["solver"],
                 max_iters=kw["max_iters"], tol=kw["tol"], backend=kw["backend"], return_aux=True)
    if all(x == n for x in lens_list):
        o, aux = local_linear_attention(q, gather_cache(k_cache, rows, n), gather_cache(v_cache, rows, n), **op_kw)
    else:
        K, cu_k = pack_cache(k_cache, rows, lens)
        V, _ = pack_cache(v_cache, rows, lens)
        cu_q = torch.arange(B + 1, device=q.device) * T
        op_kw["ridge"] = lam.reshape(1, B * T, H)
        o, aux = local_linear_attention(q.reshape(1, B * T, H, -1), K, V, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                        max_seqlen_q=T, max_seqlen_k=max(lens_list), **op_kw)
        o = o.reshape(B, T, H, -1)
        aux = aux._replace(lse=aux.lse.reshape(B, T, H))
    return (o, aux) if return_aux else o
