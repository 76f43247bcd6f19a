"""KV-cache decoding and chunked prefill for LLA, mirroring flash-attn's ``flash_attn_with_kvcache``.

LLA has no fixed-size recurrent state (``Sigma_i`` depends on the query), so, like softmax
attention, it keeps every key and value and each new query does a pass over the cache.

* Chunks (``T_new > 1``, prefill on top of a cache, or ``solver="cg"``) go through the public op:
  one batched call when every sequence has the same length, else one packed varlen call
  (``cu_seqlens_q`` / ``cu_seqlens_k``) whose per-sequence bottom-right causal alignment makes chunked
  prefill equal to the full forward.
* A single new token (``T_new == 1``, decoding) runs the PyTorch backend's numerics on one row per
  query head, in chunks of the cache (``_decode_one``, issue 24): the softmax weights over the visible
  cache entries (an online softmax), the keys shifted by the backend's per-tile rule (the
  coordinate-wise median of the last ``SHIFT_SAMPLE`` keys the row sees), the weighted mean ``m`` and
  second moment as GEMMs per chunk, ``A x = m - q`` by Cholesky, refined with the centred matvec while the
  true residual exceeds ``tol`` (``solvers.direct_solve``'s rule), and the centred output weights
  times ``V``.  All query heads of a key head go in one batched call, all sequences of a ragged batch in
  one call.  Extra memory: the kept logits and products (``O(S)`` per head) and one chunk's temporaries;
  no copy of the cache.  When a gradient is needed the whole-span step (``_decode_one_autograd``, the same
  numerics on whole-span tensors) runs instead.

Per query row, with softmax weights ``s_j`` over the cache entries it sees (every statistic is
the row's own: entries it does not see never enter its arithmetic):

    m = sum_j s_j k_j,   A = sum_j s_j (k_j - m)(k_j - m)^T + lam I,   x = A^{-1} (m - q)
    o = sum_j s_j (1 - (k_j - m) . x) v_j

The single-token path reports like the op: the solve's true relative residual and the rounding
amplification go through ``lla.ops.common.diagnostics`` (``check_solve`` / ``check_conditioning``).  With at
most ``solvers.FEW_ROWS`` query heads per key head it follows the op's few-row rules: ``m`` over the
weights' computed sum, ``y . x`` relative to each row's pivot key, and the amplification from the
row's own sensitivity ``M' A^-1`` (``function._sensitivity``, from the direct solve's Cholesky factor).
"""

from __future__ import annotations

import torch

from ..common.checks import (
    check_bool, check_cache_batch_idx, check_cache_seqlens, check_new_kv, check_qkv, check_ridge, check_scale,
    check_solver_options, check_window,
)
from ..common.kvcache import (  # noqa: F401  (append_to_cache, gather_cache, pack_cache: re-exported)
    append_to_cache, chunk_keys, chunk_parts, gather_cache, pack_cache, sequence_spans, stage_chunk,
    visible_span,
)
from ..common.diagnostics import CONDITIONING_THRESHOLD, check_conditioning, check_solve, default_tol
from .api import LLAAux, local_linear_attention
from .torch_backend.function import (  # the backend's code, shared
    SHIFT_SAMPLE, _amplification, _floor, _hopeless_rows, _sensitivity, amplification_rows,
)
from .torch_backend.solvers import FEW_ROWS, _chol_apply, _cholesky, chol_solve, direct_solve

__all__ = ["local_linear_attention_with_kvcache", "append_to_cache", "gather_cache", "pack_cache"]

_OP = "local_linear_attention_with_kvcache"

#: Keys per chunk of the single-token step's moment passes (bounds their temporaries).
DECODE_CHUNK = 1024

#: When a batch's single-token step goes one sequence at a time (``common.kvcache.sequence_spans``'s rule,
#: ``(min_keys, pad_weight)``): per-sequence calls cost ~2.7 ms each (the shift's median, the Cholesky, the
#: estimates), so equal lengths break even at ~512 entries; a padded entry costs the batched pass ~2.2x an
#: entry of one sequence's pass (B 4..256, 16..8K entries, H 8, D 64, one thread).
PER_SEQUENCE = (512, 2.2)


def _chunk_moments(kc, K, V, j0, j1):
    """``[(k - c)^2 | |k - c| | |k| | |v|]`` of keys ``j0:j1``: ``[B, Hk, c, D + 3]``."""
    kc2 = kc[..., j0:j1, :].square()
    k2 = K[..., j0:j1, :].square().sum(-1, keepdim=True)
    v2 = V[..., j0:j1, :].square().sum(-1, keepdim=True)
    return torch.cat([kc2, torch.cat([kc2.sum(-1, keepdim=True), k2, v2], dim=-1).sqrt()], dim=-1)


def _float64_rescue(step, o, residual, floor, live, q, k_cache, v_cache, rows, lens, lam, scale, left, tol):
    """Rows the working precision cannot solve (hopeless residual or a non-finite output; ``live`` rows
    only) recomputed in float64 by ``step`` (a decode step function), as the op does.

    o [B, Hk, G, Dv], residual / floor / live [B, Hk, G] -> ``(o, residual, floor, hopeless)`` with the
    rescued rows' floors zeroed; ``hopeless`` is None when no row needed it (or the step is float64).
    """
    cdt = o.dtype
    if cdt == torch.float64:
        return o, residual, floor, None
    hopeless = (_hopeless_rows("direct", residual, floor) | ~torch.isfinite(o).all(-1)) & live
    if not bool(hopeless.any()):
        return o, residual, floor, None
    o64, _lse64, st64 = step(q.double(), k_cache, v_cache, rows, lens, lam.double(), scale, left, tol)
    o = torch.where(hopeless.unsqueeze(-1), o64.reshape(o.shape).to(cdt), o)
    residual = torch.where(hopeless, st64[0].to(cdt), residual)
    return o, residual, floor.masked_fill(hopeless, 0.0), hopeless


def _decode_one_autograd(q, k_cache, v_cache, rows, lens, lam, scale, left, tol):
    """Single-query LLA with the backend's moment / solve code, and what it needs to report: the
    differentiable path (autograd through whole-span tensors; ``_decode_one`` when no gradient is needed).

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
    first, S0, S1, first_max, lens_min = visible_span(lens, left)
    partial = first_max > S0 or lens_min < S1  # some row does not see the whole span
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
    shift = _cache_shift(k_cache, rows, first, lens, cdt).detach()  # [B, Hk, 1, D]
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
    o, residual, floor, hopeless = _float64_rescue(
        _decode_one_autograd, o, residual, floor, live, q, k_cache, v_cache, rows, lens, lam, scale, left, tol
    )
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


#: Refinement steps of the single-token solve (as ``solvers.direct_solve``).
REFINE = 4


def _cache_shift(k_cache, rows, first, lens, cdt):
    """The backend's tile shift for one row per sequence, read from the cache: the coordinate-wise (lower)
    median of the last ``SHIFT_SAMPLE`` keys the row sees, zero when it sees none.  -> ``[B, Hk, 1, D]``."""
    B, S_max = lens.shape[0], k_cache.shape[1]
    idx = lens[:, None] - 1 - torch.arange(SHIFT_SAMPLE, device=lens.device)[None, :]  # [B, SHIFT_SAMPLE]
    ok = idx >= first[:, None]
    r = (torch.arange(B, device=lens.device) if rows is None else rows)[:, None]
    picked = k_cache[r, idx.clamp(0, max(S_max - 1, 0))].to(cdt).permute(0, 2, 3, 1)  # [B, Hk, D, SHIFT_SAMPLE]
    if bool(ok.all()):  # every row sees SHIFT_SAMPLE keys: the lower median, as nanmedian takes it
        return picked.median(dim=-1).values.unsqueeze(2)
    picked = picked.masked_fill(~ok[:, None, None, :], float("nan"))
    return picked.nanmedian(dim=-1).values.nan_to_num(0.0).unsqueeze(2)


class _Chunks:
    """The cache span ``S0:S1`` in chunks: ``(offset into the span, n, hide [B, n] or None)`` per chunk;
    ``keys`` (shifted) and ``values`` (staged into one reused buffer, ``common.kvcache.stage_chunk``) read
    one.  (Values read in place instead, a strided view when one sequence sees the whole chunk, were no
    faster: 24.1 / 92-94 ms per step at 8K / 32K either way, one thread.)"""

    def __init__(self, k_cache, v_cache, rows, first, lens, span, C, cdt, shift):
        self.k_cache, self.v_cache, self.rows, self.cdt, self.shift = k_cache, v_cache, rows, cdt, shift
        _, S0, S1 = span[:3]
        B, Hk = lens.shape[0], k_cache.shape[2]
        self.S0 = S0
        self.parts = chunk_parts(first, lens, span, C)
        n = min(C, S1 - S0)
        self.buf = torch.empty(B * Hk * n * max(k_cache.shape[3], v_cache.shape[3]), dtype=cdt, device=lens.device)
        self.vbuf = None  # a second buffer, for values read beside keys

    def keys(self, a, n, hide):
        """``k - c`` (zero where hidden), contiguous [B, Hk, n, D]."""
        return stage_chunk(self.k_cache, self.rows, self.S0 + a, self.S0 + a + n, self.buf, self.cdt, hide, self.shift)

    def values(self, a, n, hide, beside_keys=False):
        if beside_keys and self.vbuf is None:
            self.vbuf = torch.empty_like(self.buf)
        buf = self.vbuf if beside_keys else self.buf
        return stage_chunk(self.v_cache, self.rows, self.S0 + a, self.S0 + a + n, buf, self.cdt, hide)


def _weighted_cross(s, kc, V, out):
    """``out [B, Hk, G D, Dv] += sum_j s_j (k_j - c) v_j^T`` per row (one GEMM per key head, its ``G`` rows
    stacked): s [B, Hk, G, n], kc [B, Hk, n, D], V [B, Hk, n, Dv]."""
    B, Hk, G, n = s.shape
    D, Dv = kc.shape[-1], V.shape[-1]
    skT = torch.empty(B, Hk, G, D, n, dtype=kc.dtype, device=kc.device)
    torch.mul(s.unsqueeze(-2), kc.transpose(-1, -2).unsqueeze(2), out=skT)  # [B, Hk, G, D, n]
    out.view(B * Hk, G * D, Dv).baddbmm_(skT.view(B * Hk, G * D, n), V.reshape(B * Hk, n, Dv))


class _Gram:
    """``sum X^T X`` over chunks (X ``[B, R, n, D]``, one of the ``R`` per query row) in three contiguous
    ``D/2``-square blocks of the upper triangle (three GEMMs: 3/4 of the full GEMM's flops); ``full()`` ->
    ``[B, R, D, D]``, symmetric."""

    def __init__(self, B, R, D, dtype, device):
        self.h = h = D // 2
        self.blocks = [torch.zeros(B * R, r, c, dtype=dtype, device=device) for r, c in ((h, h), (h, D - h), (D - h, D - h))]
        self.shape = (B, R, D, D)

    def scale_(self, alpha):  # alpha: B R numbers
        a = alpha.reshape(-1, 1, 1)
        for blk in self.blocks:
            blk.mul_(a)

    def add_(self, X):
        B, R, n, D = X.shape
        X3 = X.reshape(B * R, n, D)
        XT, h = X3.transpose(-1, -2), self.h
        self.blocks[0].baddbmm_(XT[:, :h], X3[:, :, :h])
        self.blocks[1].baddbmm_(XT[:, :h], X3[:, :, h:])
        self.blocks[2].baddbmm_(XT[:, h:], X3[:, :, h:])

    def full(self):
        h = self.h
        M = self.blocks[0].new_empty(self.shape).view(-1, *self.shape[-2:])
        M[:, :h, :h] = self.blocks[0]
        M[:, :h, h:] = self.blocks[1]
        M[:, h:, :h] = self.blocks[1].transpose(-1, -2)
        M[:, h:, h:] = self.blocks[2]
        return M.view(self.shape)


@torch.no_grad()
def _decode_one(q, k_cache, v_cache, rows, lens, lam, scale, left, tol, want_aux=False, span=None):
    """Single-query LLA in chunks of the cache, no gradient: the numerics of ``_decode_one_autograd`` (the
    backend's shift, moments, direct solve with refinement, centred output weights and estimates), with no
    ``[S, D]`` temporary beyond one chunk.  Same arguments and returns; ``want_aux``: the amplification
    reported is the estimate itself (else, when a cheap bound shows it cannot warn, that bound); ``span``:
    ``visible_span(lens, left)`` when the caller has it.

    Passes over the cache (chunks staged by ``_Chunks``), per key head all its ``G`` query heads in one
    GEMM, all sequences of a ragged batch in one call:
      1. keys (``_decode_moments``): logits (kept, ``[B, H, S]``), an online softmax (running max), the
         weighted first moment, the weighted second moment of the shifted keys (``[G D, n] x [n, D]``
         GEMMs) and ``E|k - c|``, ``E|k|``;
      2. keys (``_decode_solve``): ``(k_j - c) . x`` (kept, ``[B, H, S]``) and the true residual of
         ``A x = b`` with the centred matvec (``solvers.cov_matvec``'s arithmetic); again per refinement
         step, while some row's residual exceeds ``tol``;
      3. values (``_decode_values``): the centred output weights (``function._centred``'s arithmetic)
         times V, ``E|v|``, ``E|v|^2``;
      4. (``_decode_amplification``, only when a row's conditioning estimate may warn, or ``want_aux``)
         keys and values: the few-row sensitivity's ``sum_j s_j (k_j - c) v_j^T``
         (``function._sensitivity``); with ``want_aux`` it joins pass 1 instead.
    """
    B, _, H, _D = q.shape
    Dv = v_cache.shape[3]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    span = visible_span(lens, left) if span is None else span
    if span[2] == 0:
        lse = torch.full((B, 1, H), float("-inf"), dtype=torch.float32, device=q.device)
        return q.new_zeros(B, 1, H, Dv), lse, torch.zeros(4, dtype=cdt)
    st = _decode_moments(q, k_cache, v_cache, rows, lens, lam, scale, span, fused_cross=want_aux)
    x, residual, w, chol = _decode_solve(st, tol)
    o, ev, ev2 = _decode_values(st, w)
    floor = _floor(torch.finfo(cdt).eps, x, st.b, st.L, st.ekc2, st.m)
    live = st.live[..., 0]
    o, residual, floor, hopeless = _float64_rescue(
        _decode_one, o, residual, floor, live, q, k_cache, v_cache, rows, lens, lam, scale, left, tol
    )
    amp = _decode_amplification(st, chol, x, residual, o, ev, ev2, torch.linalg.vector_norm(w, ord=1, dim=-1),
                                hopeless)
    # the solve's report: the worst residual, and the residual and floor of the row furthest past max(tol, floor)
    residual, floor = torch.where(live, residual, 0.0), torch.where(live, floor, 0.0)
    worst = (residual / floor.clamp_min(tol)).reshape(-1).argmax()
    stats = torch.stack([residual.amax(), amp.to(cdt), residual.reshape(-1)[worst], floor.reshape(-1)[worst]])
    return o.reshape(B, 1, H, Dv).to(q.dtype), st.lse, stats


def _decode_each(q, k_cache, v_cache, spans, lens, lam, scale, left, tol, want_aux=False):
    """``_decode_one`` one sequence at a time (``spans``: ``(cache row, j0, j1)`` per batch element,
    ``common.kvcache.sequence_spans``), each on a one-row view of its cache row, so that it reads exactly
    the entries it sees, in place (no masking, no other sequence's padding).  Same returns as
    ``_decode_one``; ``stats`` combined over the sequences (the worst residual and amplification, the
    residual and floor of the row furthest past ``max(tol, floor)``)."""
    # each sequence's ``visible_span`` from its span (no second host read): first = lens - n on the device
    outs = [_decode_one(q[b : b + 1], k_cache[row : row + 1], v_cache[row : row + 1], None, lens[b : b + 1],
                        lam[b : b + 1], scale, left, tol, want_aux, span=(lens[b : b + 1] - (j1 - j0), j0, j1, j0, j1))
            for b, (row, j0, j1) in enumerate(spans)]
    o, lse, stats = (torch.cat(x) if i < 2 else torch.stack(x) for i, x in enumerate(zip(*outs)))  # stats [B, 4]
    worst = (stats[:, 2] / stats[:, 3].clamp_min(tol)).argmax()
    return o, lse, torch.stack([stats[:, 0].amax(), stats[:, 1].amax(), stats[worst, 2], stats[worst, 3]])


class _DecodeMoments:
    """One decode step after its first pass, per row ``[B, Hk, G, ...]`` (query head ``h = hk * G + g``),
    keys in the frame of the shift ``c``: chunks (the cache reader), Q / L / scale (queries, ridge, logit
    scale), s [.., n] the softmax weights (in the logits' buffer), live [.., 1] rows that see a key, lse
    [B, 1, H], piv / ssum / smax (each row's pivot key, the weights' computed sum, the largest weight),
    m [.., D] the weighted mean, A [.., D, D] the ridge-regularised covariance, ekc2 / ekc / ek
    (``E|k - c|^2``, ``E|k - c|``, ``E|k|``), qc = q - c, b = m - qc (the right-hand side), few (G <=
    FEW_ROWS), and with ``fused_cross`` the weighted ``cross = E (k - c) v^T`` and ``pv = E v``."""

    __slots__ = ("chunks", "Dv", "Q", "L", "scale", "s", "live", "lse", "piv", "ssum", "smax", "m", "A", "ekc2", "ekc",
                 "ek", "qc", "b", "few", "fused_cross", "cross", "pv")

    def __init__(self, **kw):
        for name, value in kw.items():
            setattr(self, name, value)


def _decode_moments(q, k_cache, v_cache, rows, lens, lam, scale, span, fused_cross) -> _DecodeMoments:
    """Pass 1 over the keys: logits, online softmax, first and second moments of the shifted keys
    (``fused_cross``: with few rows, also the sensitivity's cross moment, so that pass 4 is not needed)."""
    B, _, H, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    dev = q.device
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    tiny = torch.finfo(cdt).tiny
    first, S0, S1 = span[:3]
    n_all = S1 - S0
    few = G <= FEW_ROWS
    shift = _cache_shift(k_cache, rows, first, lens, cdt)  # [B, Hk, 1, D]
    chunks = _Chunks(k_cache, v_cache, rows, first, lens, span, chunk_keys(B, H, max(D, Dv), n_all), cdt, shift)
    Q = q.to(cdt).reshape(B, Hk, G, D)  # query head h = hk * G + g
    Qs = Q * scale
    L = lam.to(cdt).reshape(B, Hk, G)
    fused_cross = fused_cross and few
    gram = D >= 16  # sqrt(p)-scaled keys per row, symmetric blocks (else: G rows stacked in one GEMM)
    logits = torch.empty(B, Hk, G, n_all, dtype=cdt, device=dev)
    mx = torch.full((B, Hk, G, 1), float("-inf"), dtype=cdt, device=dev)
    psum = torch.zeros(B, Hk, G, 1, dtype=cdt, device=dev)
    pk = torch.zeros(B, Hk, G, D, dtype=cdt, device=dev)  # sum_j p_j (k_j - c)
    # sum_j p_j (k_j - c)(k_j - c)^T: symmetric blocks per row (D >= 16), or the G rows stacked in one GEMM
    M2 = _Gram(B, Hk * G, D, cdt, dev) if gram else torch.zeros(B, Hk, G * D, D, dtype=cdt, device=dev)
    Qc = torch.cat([Qs, shift], dim=2)  # [B, Hk, G + 1, D]: the logits and c . (k_j - c) in one GEMM
    qsc = Qs @ shift.transpose(-1, -2)  # q . c  [B, Hk, G, 1]
    cc = torch.linalg.vecdot(shift, shift).unsqueeze(-1)  # |c|^2  [B, Hk, 1, 1]
    pn = torch.zeros(B, Hk, G, 2, dtype=cdt, device=dev)  # sum_j p_j [|k_j - c|, |k_j|]
    cross = pv = None
    if fused_cross:
        cross = torch.zeros(B, Hk, G * D, Dv, dtype=cdt, device=dev)
        pv = torch.zeros(B, Hk, G, Dv, dtype=cdt, device=dev)
    for a, n, hide in chunks.parts:
        kc = chunks.keys(a, n, hide)  # k - c, contiguous (zero where hidden): the cache is read once here
        lk = Qc @ kc.transpose(-1, -2)  # [B, Hk, G + 1, n]: q . (k - c) and c . (k - c)
        lg = logits[..., a : a + n]
        torch.add(lk[:, :, :G], qsc, out=lg)  # the logits q . k = q . (k - c) + q . c
        if hide is not None:
            lg.masked_fill_(hide[:, None, None, :], float("-inf"))
        kcn = torch.linalg.vector_norm(kc, dim=-1)  # |k_j - c|  [B, Hk, n]
        # |k|^2 = |k - c|^2 + 2 c . (k - c) + |c|^2 (hidden entries: |k - c| = 0, p = 0)
        kn = torch.addcmul(lk[:, :, G] * 2.0 + cc[..., 0], kcn, kcn).clamp_min_(0.0).sqrt_()
        norms = torch.stack([kcn, kn], dim=-1)  # [B, Hk, n, 2]
        if hide is not None:
            norms.masked_fill_(hide[:, None, :, None], 0.0)  # garbage past a length: not even NaN may enter
        new = torch.maximum(mx, lg.amax(-1, keepdim=True))
        ref = new.masked_fill(new == float("-inf"), 0.0)  # rows that saw no key yet: p = 0
        alpha = torch.exp(mx - ref)
        mx = new
        p = torch.exp(lg - ref)  # [B, Hk, G, n]
        psum.mul_(alpha).add_(p.sum(-1, keepdim=True))
        pk.mul_(alpha).add_(p @ kc)
        pn.mul_(alpha).add_(p @ norms)
        if fused_cross:
            V = chunks.values(a, n, hide, beside_keys=True)
            cross.view(B, Hk, G, D, Dv).mul_(alpha.unsqueeze(-1))
            _weighted_cross(p, kc, V, cross)
            pv.mul_(alpha).add_(p @ V)
        if gram:
            M2.scale_(alpha)
            if G == 1:  # (the shifted keys are not needed after this)
                M2.add_(kc.mul_(p.sqrt().transpose(-1, -2)))
            else:  # [B, Hk G, n, D]: each row's sqrt(p)-scaled keys
                M2.add_((kc.unsqueeze(2) * p.sqrt().unsqueeze(-1)).view(B, Hk * G, n, D))
        else:
            M2.view(B, Hk, G, D, D).mul_(alpha.unsqueeze(-1))
            _weighted_cross(p, kc, kc, M2)
    live = psum > 0  # [B, Hk, G, 1]: rows that see a key
    ps = psum.clamp_min(tiny)
    lse = (mx + psum.log()).reshape(B, 1, H).float()  # -inf for a row that sees nothing
    ref = mx.masked_fill(~live, 0.0)
    s = logits.sub_(ref).exp_().div_(ps)  # the softmax weights [B, Hk, G, n] (0 for a row that sees nothing)
    piv = s.argmax(-1, keepdim=True)  # each row's pivot key (largest weight)
    ssum = s.sum(-1, keepdim=True).clamp_min(tiny)
    smax = s.gather(-1, piv)[..., 0]
    m = pk / ps  # the weighted mean in the shifted frame  [B, Hk, G, D]
    M2 = (M2.full() if gram else M2).view(B, Hk, G, D, D) / ps.unsqueeze(-1)
    if fused_cross:
        cross, pv = cross.view(B, Hk, G, D, Dv) / ps.unsqueeze(-1), pv / ps
    ekc2 = M2.diagonal(dim1=-2, dim2=-1).sum(-1)  # E|k - c|^2  [B, Hk, G]
    ekc, ek = (pn / ps).unbind(-1)
    A = (0.5 * (M2 + M2.transpose(-1, -2)) - m.unsqueeze(-1) * m.unsqueeze(-2)
         + L[..., None, None] * torch.eye(D, dtype=cdt, device=dev))
    del M2
    qc = Q - shift
    return _DecodeMoments(chunks=chunks, Dv=Dv, Q=Q, L=L, scale=scale, s=s, live=live, lse=lse, piv=piv, ssum=ssum,
                          smax=smax, m=m, A=A, ekc2=ekc2, ekc=ekc, ek=ek, qc=qc, b=m - qc, few=few,
                          fused_cross=fused_cross, cross=cross, pv=pv)


def _decode_solve(st: _DecodeMoments, tol):
    """Cholesky of ``A``, then pass 2 over the keys (the true residual with the centred matvec, and
    ``(k_j - c) . x``), refined while some row misses ``tol`` (as ``solvers.direct_solve``); then the output
    weights ``w_j = s_j (1 - y_j . x)`` as ``function._centred`` forms them (relative to the row's pivot key
    when few, then centred with the weighted mean of the computed products).
    -> (x [B, Hk, G, D], true relative residual [B, Hk, G], w [B, Hk, G, n], the Cholesky factor)"""
    s, m, b, L, chunks = st.s, st.m, st.b, st.L, st.chunks
    chol = _cholesky(st.A)
    x = _chol_apply(*chol, b)
    bnorm = b.norm(dim=-1)
    bnorm = bnorm.where(bnorm > 0, torch.ones_like(bnorm))
    yx = torch.empty_like(s)  # (k_j - c) . x  [B, Hk, G, n]

    def residual_pass(x, out):
        """The true residual ``b - A x`` with the centred matvec; ``out`` (or None): also store ``(k_j - c) . x``."""
        mxd = -torch.linalg.vecdot(m, x).unsqueeze(-1)
        ap = torch.zeros_like(x)
        kps = torch.zeros_like(mxd)
        for a, n, hide in chunks.parts:
            kc = chunks.keys(a, n, hide)
            kp = x @ kc.transpose(-1, -2)  # [B, Hk, G, n]
            if out is not None:
                out[..., a : a + n] = kp
            kp.add_(mxd).mul_(s[..., a : a + n])
            ap.add_(kp @ kc)
            kps.add_(kp.sum(-1, keepdim=True))
        r = b - ap.addcmul_(kps, m, value=-1.0).addcmul_(x, L.unsqueeze(-1))
        return r, r.norm(dim=-1) / bnorm

    r, residual = residual_pass(x, yx)
    yx_new = None
    for _ in range(REFINE):  # as solvers.direct_solve
        if not bool((residual > tol).any()):
            break
        x_new = x + _chol_apply(*chol, r)
        if yx_new is None:
            yx_new = torch.empty_like(s)
        # the refinement's pass keeps (k_j - c) . x_new too, so that the rows that take x_new take its
        # products from here (no further pass over the keys for y . x)
        r_new, res_new = residual_pass(x_new, yx_new)
        better = res_new < residual
        x = torch.where(better.unsqueeze(-1), x_new, x)
        r = torch.where(better.unsqueeze(-1), r_new, r)
        residual = torch.where(better, res_new, residual)
        yx = torch.where(better.unsqueeze(-1), yx_new, yx)
    if st.few:
        yx.sub_(yx.gather(-1, st.piv))
    yx.sub_(torch.linalg.vecdot(s, yx).unsqueeze(-1) / st.ssum).mul_(s)
    return x, residual, torch.sub(s, yx, out=yx), chol


def _decode_values(st: _DecodeMoments, w):
    """Pass 3 over the values: the output ``o = sum_j w_j v_j`` [B, Hk, G, Dv], ``E|v|`` and ``E|v|^2``."""
    B, Hk, G, _ = st.Q.shape
    o = torch.zeros(B, Hk, G, st.Dv, dtype=w.dtype, device=w.device)
    ev = torch.zeros(B, Hk, G, 2, dtype=w.dtype, device=w.device)
    for a, n, hide in st.chunks.parts:
        V = st.chunks.values(a, n, hide)
        o.add_(w[..., a : a + n] @ V)
        vn = torch.linalg.vector_norm(V, dim=-1)
        ev.add_(st.s[..., a : a + n] @ torch.stack([vn, vn * vn], dim=-1))
    ev, ev2 = ev.unbind(-1)
    return o, ev, ev2


def _decode_amplification(st: _DecodeMoments, chol, x, residual, o, ev, ev2, aw, hopeless):
    """The step's rounding-error magnifier (``function._amplification`` on the per-row numbers), worst over
    rows; with few rows (``function._sensitivity``) ``|A^-1 M'^T|_F`` times the rounding of ``m - q`` and the
    residual, over ``E|v|``: first as a cheap bound, and by pass 4 over keys and values only when the bound
    could warn (or the cross moment was fused into pass 1)."""
    B, Hk, G, D = st.Q.shape
    cdt, dev = x.dtype, x.device
    eps, tiny = torch.finfo(cdt).eps, torch.finfo(cdt).tiny
    m, qc, L, chunks = st.m, st.qc, st.L, st.chunks
    on = o.norm(dim=-1)
    rel = ev / torch.maximum(on, on.mean(-1, keepdim=True)).clamp_min(tiny)

    def amplification(sens):
        amp = amplification_rows(aw, st.ekc, st.ek, st.ekc2, m.norm(dim=-1), x.norm(dim=-1), qc.norm(dim=-1),
                                 st.Q.norm(dim=-1), st.smax, L, D, st.scale, eps, sens) * rel
        amp = torch.where(torch.isnan(amp), torch.full_like(amp, float("inf")), amp)
        if hopeless is not None:
            amp = amp.masked_fill(hopeless, 0.0)
        return amp.max()

    if not st.few:
        return amplification(None)
    err = st.ekc + qc.norm(dim=-1) + residual * st.b.norm(dim=-1) / eps
    if not st.fused_cross and not bool(chol[2].any()):
        # a bound first: |A^-1 M'^T|_F <= |M'|_F / lam_min(A), |M'|_F <= sqrt(tr C E|v|^2), lam_min(A) >= lam
        # (x2 for rounding); below the warning threshold it is reported (as an upper bound) and nothing warns
        trc = (st.ekc2 - torch.linalg.vecdot(m, m)).clamp_min(0.0)
        bound = 2.0 * (trc * ev2).sqrt() / L * err / ev.clamp_min(tiny)
        amp = amplification(bound)
        if bool(amp * eps <= CONDITIONING_THRESHOLD):
            return amp
    cross, pv = st.cross, st.pv
    if not st.fused_cross:  # pass 4
        cross = torch.zeros(B, Hk, G * D, st.Dv, dtype=cdt, device=dev)
        pv = torch.zeros(B, Hk, G, st.Dv, dtype=cdt, device=dev)
        for a, n, hide in chunks.parts:
            kc = chunks.keys(a, n, hide)
            V = chunks.values(a, n, hide, beside_keys=True)
            _weighted_cross(st.s[..., a : a + n], kc, V, cross)
            pv.add_(st.s[..., a : a + n] @ V)
        cross = cross.view(B, Hk, G, D, st.Dv)
    N = cross - m.unsqueeze(-1) * pv.unsqueeze(-2)  # M'^T = sum_j s_j (k_j - m) v_j^T  [B, Hk, G, D, Dv]
    g = torch.linalg.matrix_norm(chol_solve(chol, N))
    return amplification(g * err / ev.clamp_min(tiny))


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
            (``lla.ops.common.diagnostics.default_tol``).
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
    ridge = check_ridge(ridge, B, T, H, q)  # [B, T, H]
    if k is not None:
        append_to_cache(k_cache, v_cache, k, v, seqlens, rows)
    lens = seqlens + t_add  # [B] visible entries

    if T == 1 and solver in ("auto", "direct"):
        tol = float(default_tol(q.dtype) if tol is None else tol)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache, ridge)):
            o, lse, stats = _decode_one_autograd(q, k_cache, v_cache, rows, lens, ridge, scale, left, tol)
        elif B > 1 and (spans := sequence_spans(lens, rows, left, PER_SEQUENCE)) is not None:
            o, lse, stats = _decode_each(q, k_cache, v_cache, spans, lens, ridge, scale, left, tol, want_aux=return_aux)
        else:
            o, lse, stats = _decode_one(q, k_cache, v_cache, rows, lens, ridge, scale, left, tol, want_aux=return_aux)
        residual, amplification = (float("nan"), float("nan"))
        if not torch.compiler.is_compiling():
            residual, amplification, chk_residual, chk_floor = stats.tolist()
            ridge_min = float(ridge.detach().min()) if ridge.numel() else float("nan")
            check_solve(stage="forward", solver="direct", residual=chk_residual, tol=tol, ridge_min=ridge_min, op=_OP,
                        floor=chk_floor)
            check_conditioning(amplification, q.dtype, op=_OP)
        if return_aux:
            return o, LLAAux(iters=0, residual=residual, lse=lse, solver="direct", amplification=amplification)
        return o
    return _chunk(q, k_cache, v_cache, rows, lens, ridge, scale=scale, left=left, solver=solver, max_iters=max_iters,
                  tol=tol, backend=backend, return_aux=return_aux)


def _chunk(q, k_cache, v_cache, rows, lens, ridge, *, return_aux, **kw):
    """New queries through the public op, bottom-right causal on each sequence's ``lens[b]`` entries:
    one batched call when all lengths are equal, else one packed varlen call."""
    B, T, H, _ = q.shape
    lens_list = lens.tolist()
    n = lens_list[0] if B else 0
    op_kw = dict(ridge=ridge, scale=kw["scale"], causal=True, window_size=(kw["left"], -1), solver=kw["solver"],
                 max_iters=kw["max_iters"], tol=kw["tol"], backend=kw["backend"], return_aux=True)
    if all(x == n for x in lens_list):
        o, aux = local_linear_attention(q, gather_cache(k_cache, rows, n), gather_cache(v_cache, rows, n), **op_kw)
    else:
        K, cu_seqlens_k = pack_cache(k_cache, rows, lens)
        V, _ = pack_cache(v_cache, rows, lens)
        cu_seqlens_q = torch.arange(B + 1, device=q.device) * T
        op_kw["ridge"] = ridge.reshape(1, B * T, H)
        o, aux = local_linear_attention(q.reshape(1, B * T, H, -1), K, V, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                        max_seqlen_q=T, max_seqlen_k=max(lens_list), **op_kw)
        o = o.reshape(B, T, H, -1)
        aux = aux._replace(lse=aux.lse.reshape(B, T, H))
    return (o, aux) if return_aux else o
