"""Blockwise PyTorch Parallax: forward and exact backward, CPU and CUDA tensors.

The math in the form this backend computes (``reference.py`` is the spec).  Per query row with
softmax weights ``s_j`` over its visible keys and ``a_j = r . k_j``:

    c    = sum_j s_j a_j                   the row's weighted mean of r . k
    b_j  = a_j - c                         centred per row, from the keys the row sees only
    w_j  = s_j (1 - b_j)                   the Parallax weights (sum to one, may be negative)
    o    = sum_j w_j v_j

``b_j`` is formed from the row's own ``c``, never from a statistic over keys the row cannot see,
so a huge invisible key cannot cost a row digits; and ``1 + c - a_j`` is never formed from the
uncentred moments ``d2 / d1`` and ``O2 / d1`` (which cancel when ``r . k`` is large).

Backward (exact; ``g_j = do . v_j``, ``gbar = sum_j s_j g_j``, ``e_j = g_j - gbar``):

    beta  = -sum_j w_j e_j                 (= Cov_s(a, g))
    dl_j  = w_j e_j + s_j beta             gradient of the logit scale * q . k_j
    da_j  = -s_j e_j                       gradient of a_j = r . k_j
    dq    = scale sum_j dl_j k_j,   dr = sum_j da_j k_j
    dk_j  = sum_i (scale dl_ij q_i + da_ij r_i),   dv_j = sum_i w_ij do_i

Layout: the (batch, key head) pairs are folded into one dim ``N`` and every step takes ``nb`` of
them and a tile of query rows (all ``G`` query heads of a key head at once) against the keys the
tile can see.  The scaled queries and ``r`` are stacked, so that one GEMM gives the logits and
``r . k`` of a tile (``[nb, 2 R, n]``), and in the backward one GEMM gives ``dq`` and ``dr`` and one
gives the tile's ``dk``.  The softmax is recomputed in the backward (one fused pass), so the only
row statistic saved is ``c`` (``[B, Hk, G, T]``): memory ``O(tile x S + T x H x D)``.
"""

from __future__ import annotations

import torch

from ..common.masks import zero_nonfinite
from ..common.result import BackendResult
from ..common.varlen import Varlen, segments, with_queries
from .config import ParallaxConfig

__all__ = ["parallax_torch", "parallax_forward", "parallax_backward", "ParallaxTorchFunction", "TILE_ELEMS"]

#: Upper bound on the elements of one step's ``[nb, R, n]`` weight tile (float32: 2 MiB); the step
#: holds three such tiles (logits, ``r . k`` and ``do . v``), which keeps them in cache.
TILE_ELEMS = 1 << 19


class _Cfg:
    __slots__ = ("scale", "window", "need_lse")

    def __init__(self, scale, window, need_lse=False):
        self.scale, self.window, self.need_lse = float(scale), (int(window[0]), int(window[1])), bool(need_lse)


def _plan(T: int, S: int, window, G: int, N: int, elems: int):
    """Steps ``(i0, i1, j0, j1, fill, empty)`` and the pairs per step ``nb``.

    Query rows ``i0:i1`` see keys in ``j0:j1`` (bottom-right aligned, flash-attn windows).  ``fill``
    is ``(c0, c1, hidden [G * t, c1 - c0])``, the masked entries of the only partly visible columns
    (tile-relative), or None; ``empty [G * t]`` flags rows that see no key (None when every row sees
    one).  Tiles that see no key at all are left out (their rows output zeros).  Only the partly
    visible columns' mask is built (a band of at most ``t`` columns on each side)."""
    left, right = window
    off = S - T
    t = max(16, min(T, elems // max(1, G * S)))
    if t < T <= 2 * t and S >= 4 * T:
        # a chunk of queries on a long cache: one tile of up to 2x the budget rather than a second pass over
        # nearly the same keys (64 queries on 8K keys: 48 -> 40 ms; at T = S a causal second tile reads
        # more keys than the first, and one 1024-row tile was 1.4x slower than two)
        t = T
    plan, widest = [], 1
    for i0 in range(0, T, t):
        i1 = min(T, i0 + t)
        j1 = S if right < 0 else max(0, min(S, i1 - 1 + off + right + 1))
        j0 = 0 if left < 0 else max(0, min(S, i0 + off - left))
        if j1 <= j0:
            continue
        # columns every row of the tile sees: [fa, fb)
        fa = j0 if left < 0 else max(j0, i1 - 1 + off - left)
        fb = j1 if right < 0 else min(j1, i0 + off + right + 1)
        fill = empty = None
        if fa > j0 or fb < j1 or fa >= fb:
            c0, c1 = (0, j1 - j0) if fa >= fb else (0 if fa > j0 else fb - j0, j1 - j0 if fb < j1 else fa - j0)
            i = torch.arange(i0 + off, i1 + off)[:, None]
            j = torch.arange(j0 + c0, j0 + c1)[None, :]
            vis = torch.ones(i1 - i0, c1 - c0, dtype=torch.bool)
            if right >= 0:
                vis &= j <= i + right
            if left >= 0:
                vis &= j >= i - left
            fill = (c0, c1, (~vis).repeat(G, 1))
            lo = torch.arange(i0 + off, i1 + off) - (left if left >= 0 else S)
            hi = torch.arange(i0 + off, i1 + off) + (right if right >= 0 else S)
            seen = (torch.clamp(lo, min=j0) <= torch.clamp(hi, max=j1 - 1))
            if not bool(seen.all()):
                empty = (~seen).repeat(G)
        plan.append((i0, i1, j0, j1, fill, empty))
        widest = max(widest, G * (i1 - i0) * (j1 - j0))
    return plan, max(1, min(N, elems // widest))


_PLANS: dict = {}


def _cached_plan(T, S, window, G, N, device, elems=None):
    """``_plan`` with the masks on ``device``, cached per shape (the forward and the backward share one)."""
    elems = TILE_ELEMS if elems is None else elems
    key = (T, S, window, G, N, str(device), elems)
    if key not in _PLANS:
        plan, nb = _plan(T, S, window, G, N, elems)
        plan = [(i0, i1, j0, j1, None if f is None else (f[0], f[1], f[2].to(device)),
                 None if e is None else e.to(device)) for i0, i1, j0, j1, f, e in plan]
        if len(_PLANS) >= 64:
            _PLANS.clear()
        _PLANS[key] = (plan, nb)
    return _PLANS[key]


def _steps(T, S, window, G, N, device, elems=None):
    """``(c, i0, i1, j0, j1, fill, empty)`` for every step: ``c`` a slice of ``nb`` pairs (see ``_plan``)."""
    plan, nb = _cached_plan(T, S, window, G, N, device, elems)
    for c0 in range(0, N, nb):
        c = slice(c0, min(N, c0 + nb))
        for step in plan:
            yield (c, *step)


def _softmax_(x, a, fill, empty):
    """Masked softmax of a logit tile ``[nb, R, n]`` in place (fused), rows that see nothing -> 0.

    ``r . k`` (``a``, same shape) is zeroed where hidden, so that a huge key a row cannot see (even
    one whose ``r . k`` overflows) cannot reach the row through ``0 * inf``."""
    if fill is not None:
        c0, c1, hidden = fill
        x[..., c0:c1].masked_fill_(hidden, float("-inf"))
        a[..., c0:c1].masked_fill_(hidden, 0.0)
    torch.softmax(x, -1, out=x)
    if empty is not None:
        x.masked_fill_(empty[:, None], 0.0)
        a.masked_fill_(empty[:, None], 0.0)
    return x


def _prepare(q, r, k, v, scale, window):
    """Head-major compute-dtype tensors, (batch, key head) pairs folded into ``N``.

    Returns ``X [N, 2 G, T, D]`` (scaled queries, then ``r``),
    ``K [N, S, D]``, ``V [N, S, Dv]`` and ``bad [N, S]`` flagging non-finite keys/values (zeroed
    here, so that ``0 * inf`` cannot reach rows that do not see them), or None.  ``K`` and ``V`` are
    contiguous copies when the plan reads them more than once (several query tiles), else views where
    the layout allows (``B = 1``): copying would cost a pass of its own (64 queries on an 8K cache, one
    thread: 48 -> 37 ms with the one-tile plan; a 4096-query forward is ~5 % faster with the copies)."""
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    Qs = (q.to(cdt) * scale).permute(0, 2, 1, 3).reshape(B * Hk, G, T, D)
    R = r.to(cdt).permute(0, 2, 1, 3).reshape(B * Hk, G, T, D)
    X = torch.cat([Qs, R], dim=1)
    K = k.to(cdt).permute(0, 2, 1, 3).reshape(B * Hk, S, D)
    V = v.to(cdt).permute(0, 2, 1, 3).reshape(B * Hk, S, Dv)
    plan, _nb = _cached_plan(T, S, window, G, B * Hk, q.device)
    once = len(plan) <= 1  # one tile of query rows: every key is read once
    K, V, bad = zero_nonfinite(K, V)  # [N, S]
    return X, (K if once else K.contiguous()), (V if once else V.contiguous()), bad


def _rows(X, c, i0, i1):
    """The stacked rows of a tile: ``[nb, 2 G t, D]`` (first half then second half of ``X``)."""
    return X[c, :, i0:i1].reshape(X[c].shape[0], -1, X.shape[-1])


def _sees_bad(bad_t, fill, empty, R, G, dtype):
    """``[nb, R, 1]`` > 0 for the rows of a tile that see a non-finite key or value."""
    n = bad_t.shape[-1]
    vis = torch.ones(R, n, dtype=dtype, device=bad_t.device)
    if fill is not None:
        vis[:, fill[0]:fill[1]].masked_fill_(fill[2], 0.0)
    if empty is not None:
        vis.masked_fill_(empty[:, None], 0.0)
    return vis @ bad_t.to(dtype).unsqueeze(-1)


def parallax_forward(q, r, k, v, cfg):
    """Forward.  ``q, r [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]``.

    Returns ``o [B, T, H, Dv]`` (dtype of q), ``C [B, Hk, G, T]`` (compute dtype: the row means
    ``c``, saved for the backward) and ``lse [B, T, H]`` float32 (``-inf`` for a row that sees no
    key) when ``cfg.need_lse``, else None.

    Per step: one GEMM for the logits and ``r . k`` of the tile (``[nb, 2 R, n]``), the fused softmax
    in place, ``c = sum_j s_j a_j``, then ``a <- s (a - c - 1) = -w`` in place and one GEMM for the
    output.
    """
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    N = B * Hk
    X, K, V, bad = _prepare(q, r, k, v, cfg.scale, cfg.window)
    cdt = X.dtype
    O = X.new_zeros(N, G, T, Dv)
    C = X.new_zeros(N, G, T)
    LSE = X.new_full((N, G, T), float("-inf")) if cfg.need_lse else None
    buf = None
    for c, i0, i1, j0, j1, fill, empty in _steps(T, S, cfg.window, G, N, X.device):
        t, n = i1 - i0, j1 - j0
        R = G * t
        Kt, Vt = K[c, j0:j1], V[c, j0:j1]
        nbc = Kt.shape[0]
        size = nbc * 3 * R * n
        if buf is None or buf.numel() < size:
            buf = X.new_empty(size)
        tile = buf[:size].view(nbc, 3 * R, n)  # (logits -> weights | r . k -> -w | scratch)
        torch.matmul(_rows(X, c, i0, i1), Kt.transpose(-1, -2), out=tile[:, : 2 * R])
        s, a, sa = tile[:, :R], tile[:, R : 2 * R], tile[:, 2 * R :]
        if LSE is not None:
            if fill is not None:
                s[..., fill[0]:fill[1]].masked_fill_(fill[2], float("-inf"))
            LSE[c, :, i0:i1] = torch.logsumexp(s, -1).view(nbc, G, t)
        _softmax_(s, a, fill, empty)
        cm = torch.mul(s, a, out=sa).sum(-1, keepdim=True)  # c = sum_j s_j a_j   [nb, R, 1]
        nw = a.sub_(cm + 1.0).mul_(s)  # s (a - c - 1) = -w, centred on the row's own c
        o = torch.matmul(nw, Vt).neg_()  # [nb, R, Dv]
        if bad is not None:
            o.masked_fill_(_sees_bad(bad[c, j0:j1], fill, empty, R, G, cdt) > 0, float("nan"))
        O[c, :, i0:i1] = o.view(nbc, G, t, Dv)
        C[c, :, i0:i1] = cm.view(nbc, G, t)
    o = O.view(B, Hk * G, T, Dv).permute(0, 2, 1, 3).to(q.dtype)
    lse = None if LSE is None else LSE.view(B, H, T).permute(0, 2, 1).float()
    return o, C.view(B, Hk, G, T), lse


def parallax_backward(do, q, r, k, v, C, cfg):
    """Backward from the saved row means ``C [B, Hk, G, T]`` -> ``(dq, dr, dk, dv)``.

    The forward's steps, the softmax recomputed per tile, in a ``[nb, 3 R, n]`` tile holding
    ``(weights | r . k | s g)``; the last two thirds become ``(-dl | -da)`` in place, so that one GEMM
    against the keys gives ``(-dq / scale | -dr)`` and one against the stacked ``(scale q | r)`` the
    tile's ``-dk``.
    """
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    N = B * Hk
    X, K, V, _ = _prepare(q, r, k, v, cfg.scale, cfg.window)
    cdt = X.dtype
    dO = do.to(cdt).permute(0, 2, 1, 3).reshape(N, G, T, Dv)
    C = C.reshape(N, G, T)
    dX = X.new_zeros(N, 2 * G, T, D)  # (-dq / scale | -dr)
    dK = K.new_zeros(N, S, D)
    dV = V.new_zeros(N, S, Dv)
    buf = gbuf = None
    for c, i0, i1, j0, j1, fill, empty in _steps(T, S, cfg.window, G, N, X.device):
        t, n = i1 - i0, j1 - j0
        R = G * t
        Kt, Vt = K[c, j0:j1], V[c, j0:j1]
        nbc = Kt.shape[0]
        size = nbc * R * n
        if buf is None or buf.numel() < 3 * size:
            buf, gbuf = X.new_empty(3 * size), X.new_empty(size)
        tile = buf[: 3 * size].view(nbc, 3 * R, n)  # (weights | r . k -> -w -> -dl | s g -> -da)
        Xt = _rows(X, c, i0, i1)  # (scale q | r) rows of the tile
        torch.matmul(Xt, Kt.transpose(-1, -2), out=tile[:, : 2 * R])
        s, a, sg = tile[:, :R], tile[:, R : 2 * R], tile[:, 2 * R :]
        _softmax_(s, a, fill, empty)
        do_t = dO[c, :, i0:i1].reshape(nbc, R, Dv)
        e = torch.matmul(do_t, Vt.transpose(-1, -2), out=gbuf[:size].view(nbc, R, n))  # g_j = do . v_j
        gbar = torch.mul(s, e, out=sg).sum(-1, keepdim=True)  # sum_j s_j g_j
        e.sub_(gbar)  # e_j = g_j - gbar
        nw = a.sub_(C[c, :, i0:i1].reshape(nbc, R, 1) + 1.0).mul_(s)  # -w
        dV[c, j0:j1].baddbmm_(nw.transpose(-1, -2), do_t, alpha=-1.0)
        beta = nw.mul_(e).sum(-1, keepdim=True)  # -sum_j w_j e_j
        nw.addcmul_(s, beta, value=-1.0)  # -dl = -w e - s beta
        sg.addcmul_(s, gbar, value=-1.0)  # s e = -da
        grads = tile[:, R:]  # (-dl | -da), paired with (scale q | r)
        dX[c, :, i0:i1] = torch.matmul(grads, Kt).view(nbc, 2 * G, t, D)
        dK[c, j0:j1].baddbmm_(grads.transpose(-1, -2), Xt, alpha=-1.0)
    dX = dX.view(B, Hk, 2 * G, T, D)
    dq = dX[:, :, :G].reshape(B, H, T, D).permute(0, 2, 1, 3).mul(-cfg.scale).to(q.dtype)
    dr = dX[:, :, G:].reshape(B, H, T, D).permute(0, 2, 1, 3).neg().to(r.dtype)
    dk = dK.view(B, Hk, S, D).permute(0, 2, 1, 3).to(k.dtype)
    dv = dV.view(B, Hk, S, Dv).permute(0, 2, 1, 3).to(v.dtype)
    return dq, dr, dk, dv


def forward_varlen(q, r, k, v, cfg, varlen: Varlen | None):
    """``parallax_forward`` over the packed sequences of ``varlen`` (or the whole input when None), one
    after the other, each bottom-right aligned on its own keys.  Rows of an empty query sequence do not
    exist; rows without keys output zeros."""
    if varlen is None:
        return parallax_forward(q, r, k, v, cfg)
    B, T, H, _ = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = q.new_zeros(B, T, H, Dv)
    C = q.new_zeros(B, Hk, H // Hk, T, dtype=cdt)
    lse = q.new_full((B, T, H), float("-inf"), dtype=torch.float32) if cfg.need_lse else None
    for sq, sk in with_queries(segments(varlen, T, k.shape[1])):
        o_s, C_s, lse_s = parallax_forward(q[:, sq], r[:, sq], k[:, sk], v[:, sk], cfg)
        o[:, sq], C[..., sq] = o_s, C_s
        if lse is not None:
            lse[:, sq] = lse_s
    return o, C, lse


def backward_varlen(do, q, r, k, v, C, cfg, varlen: Varlen | None):
    """``parallax_backward`` over packed sequences (as ``forward_varlen``)."""
    if varlen is None:
        return parallax_backward(do, q, r, k, v, C, cfg)
    grads = [torch.zeros_like(t) for t in (q, r, k, v)]
    for sq, sk in with_queries(segments(varlen, q.shape[1], k.shape[1])):
        dq, dr, dk, dv = parallax_backward(do[:, sq], q[:, sq], r[:, sq], k[:, sk], v[:, sk], C[..., sq], cfg)
        grads[0][:, sq], grads[1][:, sq] = dq, dr
        grads[2][:, sk] += dk
        grads[3][:, sk] += dv
    return tuple(grads)


class ParallaxTorchFunction(torch.autograd.Function):
    """``(q, r, k, v, cfg, varlen) -> (o, lse or empty)``; saves the inputs and ``c``."""

    @staticmethod
    def forward(ctx, q, r, k, v, cfg, varlen):
        o, C, lse = forward_varlen(q, r, k, v, cfg, varlen)
        ctx.save_for_backward(q, r, k, v, C)
        ctx.cfg, ctx.varlen = cfg, varlen
        if lse is None:
            lse = q.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, r, k, v, C = ctx.saved_tensors
        dq, dr, dk, dv = backward_varlen(do, q, r, k, v, C, ctx.cfg, ctx.varlen)
        return dq, dr, dk, dv, None, None


def parallax_torch(q, r, k, v, varlen: Varlen | None, config: ParallaxConfig) -> tuple[torch.Tensor, BackendResult]:
    """PyTorch backend entry: ``q, r [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` ->
    ``(o [B, T, H, Dv], BackendResult)`` with ``lse [B, T, H]`` float32 when ``config.need_lse``."""
    cfg = _Cfg(config.scale, tuple(config.window), config.need_lse)
    o, lse = ParallaxTorchFunction.apply(q, r, k, v, cfg, varlen)
    return o, BackendResult(lse=lse if config.need_lse else None)
