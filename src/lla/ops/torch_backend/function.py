"""Blockwise PyTorch LLA: forward, adjoint backward, both solvers.  CPU and CUDA tensors.

The math, in the form this backend computes (equivalent to ``LLA.md`` section 1)
--------------------------------------------------------------------------------
Per query row ``i`` with softmax weights ``s_j`` over its visible keys (index ``i`` dropped):

    m     = sum_j s_j k_j                      weighted key mean            (D)
    mu    = m - q                              = sum_j s_j (k_j - q)        (D)
    A     = sum_j s_j (k_j - m)(k_j - m)^T + lam I                          (D x D)
    x     = A^{-1} mu
    o     = sum_j s_j (1 - (k_j - m) . x) v_j

Why ``A`` and not ``Sigma``: the slope ``W`` of the local fit is unpenalised-intercept ridge
regression, so centring the keys at their weighted mean ``m`` instead of at ``q`` leaves ``W``
unchanged and moves the evaluation point.  Algebraically ``Sigma = A + mu mu^T``; by
Sherman-Morrison ``rho = Sigma^{-1} mu = x / (1 + mu . x)`` and ``delta = 1 - mu . rho =
1 / (1 + mu . x)``, which turns the paper's weights ``s_j (1 - z_j . rho) / delta`` into the ones
above.  ``A`` does not carry the rank-one spike ``mu mu^T``, so it is far better conditioned when the
query sits away from its keys (large logits, large key norms), CG converges in fewer iterations,
and ``delta`` is never formed by cancellation.  Keys are also shifted by their per-head mean
``kbar`` before anything else: ``A``, ``mu`` and the weights are invariant to a common shift, and the
logits change by a per-row constant that the softmax ignores (added back to the reported lse).

Backward (implicit differentiation, one adjoint solve, no unrolling)
--------------------------------------------------------------------
With ``g_j = do . v_j``, ``gbar = sum_j s_j g_j``, ``y_j = k_j - m``:

    u      = A^{-1} gx,   gx = -sum_j s_j g_j y_j               adjoint solve (A symmetric)
    dlam   = -u . x
    gm     = gbar x + u                                          gradient reaching m
    P_j    = (1 - y_j.x) g_j - (y_j.u)(y_j.x) + y_j.gm           gradient reaching s_j
    dl_j   = s_j (P_j - sum_j' s_j' P_j')                        softmax backward
    dq     = -u + scale sum_j dl_j k_j
    dk_j  += s_j [(gbar - g_j - y_j.u) x + (1 - y_j.x) u] + scale dl_j q
    dv_j  += s_j (1 - y_j.x) do

Every sum over ``j`` or over rows is a matmul against a key tile, so the backward is a handful of
attention-shaped passes plus the adjoint solve.  Saved from the forward: ``x``, ``m`` and the lse,
``O(T * H * D)``.
"""

from __future__ import annotations

import math

import torch

from .solvers import cholesky_solve, cov_diag, cov_matrix, pcg_compact, tile_preconditioner

__all__ = ["lla_torch", "lla_forward", "lla_backward", "LLATorchFunction", "TILE_ELEMS"]

#: Upper bound on the elements of one ``[B, H, tile, n_keys]`` score tile (float32: 16 MiB).
TILE_ELEMS = 1 << 22

#: Upper bound on the elements of one ``[G * tile, n_keys]`` weight tile of one key head in the
#: forward (float32: 4 MiB).  Small enough for the CG loop's passes to stay in cache.
HEAD_TILE_ELEMS = 1 << 20


class _Cfg:
    __slots__ = ("scale", "window", "solver", "max_iters", "tol", "precondition")

    def __init__(self, scale, window, solver, max_iters, tol, precondition):
        self.scale, self.window, self.solver = scale, window, solver
        self.max_iters, self.tol, self.precondition = max_iters, tol, precondition


def _tiles(T: int, S: int, window, rows_per_q: int, elems: int = TILE_ELEMS):
    """Yield (i0, i1, j0, j1, mask[t, n] or None): query tiles and the key range they can see.

    A tile has ``t`` query positions, ``rows_per_q * t * S <= elems`` (at least 16 positions)."""
    left, right = window
    off = S - T
    t = max(16, min(T, elems // max(1, rows_per_q * S)))
    for i0 in range(0, T, t):
        i1 = min(T, i0 + t)
        j1 = S if right < 0 else max(0, min(S, i1 - 1 + off + right + 1))
        j0 = 0 if left < 0 else max(0, min(S, i0 + off - left))
        if j1 <= j0:
            yield i0, i1, j0, j0, None
            continue
        i = torch.arange(i0 + off, i1 + off)[:, None]
        j = torch.arange(j0, j1)[None, :]
        mask = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool)
        if right >= 0:
            mask &= j <= i + right
        if left >= 0:
            mask &= j >= i - left
        yield i0, i1, j0, j1, (None if bool(mask.all()) else mask)


def _solve(cfg, s, kc, m, lam, b, diag=None, scratch=None):
    """Solve A x = b for a tile's rows with the configured solver -> (x, iters, residual).

    ``diag`` (CG only) is the Jacobi diagonal when the caller has it already (else computed here).
    """
    if cfg.solver == "direct":
        x, resid = cholesky_solve(cov_matrix(s, kc, m, lam), b)
        return x, 0, resid
    minv = tile_preconditioner(s, kc, m, lam) if cfg.precondition else None
    if minv is not None:
        x, it, resid = pcg_compact(s, kc, m, lam, b, None, tol=cfg.tol, max_iters=cfg.max_iters, scratch=scratch,
                                   minv=minv)
        if bool(resid <= cfg.tol):
            return x, it, resid
        # The shared preconditioner can be poor when the rows' weights differ wildly (very peaked
        # softmax): redo the tile with the per-row Jacobi preconditioner, which has no such failure.
    if cfg.precondition and diag is None:
        diag = cov_diag(s, kc, m, lam)
    return pcg_compact(s, kc, m, lam, b, diag if cfg.precondition else None, tol=cfg.tol,
                       max_iters=cfg.max_iters, scratch=scratch)


class _Scratch:
    """Reusable flat buffers, so that the ``[B, Hk, R, n]`` tiles of the hot loop are not freshly
    allocated (and page-faulted) on every use.  ``get(slot, shape)`` returns a contiguous view."""

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.bufs: dict = {}

    def get(self, slot: str, shape) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get(slot)
        if buf is None or buf.numel() < n:
            buf = self.like.new_empty(max(n, 1))
            self.bufs[slot] = buf
        return buf[:n].view(*shape)


def _tile_plan(T, S, window, G, elems, device, pairs: int = 1, D: int = 0, direct: bool = False):
    """``_tiles`` with each mask reduced, once, to what ``_mask_fill_`` needs: ``(c0, c1, hidden)``
    with ``hidden [G * t, c1 - c0]`` the masked entries of the only partly visible columns.

    Also returns ``nb``: how many of the ``pairs`` (batch, key head) pairs to process together so
    that a step's largest intermediates stay within ``elems`` (1 once one pair fills it): the
    ``[nb, G * t, n]`` weight tile, and, for head size ``D``, the solver's per-row systems
    (``[nb, G * t, D, D]`` for the direct solve) and per-pair ``[nb, D, D]`` preconditioner.
    """
    plan = []
    widest = 1
    for i0, i1, j0, j1, mask in _tiles(T, S, window, G, elems):
        fill = None
        if mask is not None:
            partial = (~mask.all(0)).nonzero()
            c0, c1 = int(partial[0]), int(partial[-1]) + 1
            hidden = ~mask[:, c0:c1]
            fill = (c0, c1, (hidden.repeat(G, 1) if G > 1 else hidden).to(device))
        plan.append((i0, i1, j0, j1, fill))
        rows = G * (i1 - i0)
        widest = max(widest, rows * (j1 - j0), rows * D * D if direct else D * D)
    return plan, max(1, min(pairs, elems // widest))


def _blocks(T, S, window, G, N, device, D, solver):
    """The steps of the forward and backward loops: ``(c, i0, i1, j0, j1, mask)`` with ``c`` a slice
    of the ``N`` folded (batch, key head) pairs (``nb`` of them, see ``_tile_plan``), rows ``i0:i1``,
    the keys ``j0:j1`` they can see and the tile's mask fill; tiles that see no key are skipped."""
    tiles, nb = _tile_plan(T, S, window, G, HEAD_TILE_ELEMS, device, N, D, solver == "direct")
    for c0 in range(0, N, nb):
        c = slice(c0, min(N, c0 + nb))
        for i0, i1, j0, j1, mask in tiles:
            if j1 > j0:
                yield c, i0, i1, j0, j1, mask


def _mask_fill_(logits, fill):
    """Set the masked logits of a tile [R, n] to -inf in place (only the partly masked columns)."""
    if fill is None:
        return
    c0, c1, hidden = fill
    logits[..., c0:c1].masked_fill_(hidden, float("-inf"))


def _softmax_tile(Qs, Kt, mask, G, scratch):
    """Softmax weights of a tile, in a scratch buffer: Qs [..., R, D] (already scaled),
    Kt [..., n, D] -> (s [..., R, n], lse [..., R] of the (shifted) logits)."""
    s = scratch.get("s", (*Qs.shape[:-1], Kt.shape[-2]))
    torch.matmul(Qs, Kt.transpose(-1, -2), out=s)
    _mask_fill_(s, mask)
    mx = s.amax(-1, keepdim=True)  # [B, Hk, R, 1]
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s.sub_(mx).exp_()
    z = s.sum(-1, keepdim=True)
    s.mul_(1.0 / z.clamp_min(torch.finfo(s.dtype).tiny))
    return s, (mx + z.log()).squeeze(-1)


def _prepare(q, k, v, lam):
    """Head-major compute-dtype views, keys shifted by their per-head mean, non-finite keys zeroed.

    Returns Q [B, Hk, G, T, D], Kc [B, Hk, S, D], V [B, Hk, S, Dv], L [B, Hk, G, T], kbar, bad
    where ``bad [B, Hk, S]`` flags keys/values that are not finite (None when all are).
    """
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    Q = q.to(cdt).permute(0, 2, 1, 3).reshape(B, Hk, G, T, D)
    K = k.to(cdt).permute(0, 2, 1, 3)
    V = v.to(cdt).permute(0, 2, 1, 3)
    L = lam.to(cdt).permute(0, 2, 1).reshape(B, Hk, G, T)
    bad = None
    finite = torch.isfinite(K).all(-1) & torch.isfinite(V).all(-1)  # [B, Hk, S]
    if not bool(finite.all()):
        # A non-finite key or value must only reach the rows that see it: zero it (so that 0 * nan
        # in the matmuls cannot leak into rows that mask it out) and poison the rows that see it.
        bad = ~finite
        K = K.masked_fill(bad[..., None], 0.0)
        V = V.masked_fill(bad[..., None], 0.0)
    kbar = K.mean(dim=2, keepdim=True) if K.shape[2] else K.new_zeros(B, Hk, 1, D)  # [B, Hk, 1, D]
    return Q, K - kbar, V, L, kbar, bad


def lla_forward(q, k, v, lam, cfg):
    """Forward pass.  q [B, T, H, D], k [B, S, Hk, D], v [B, S, Hk, Dv], lam [B, T, H].

    Returns ``o [B, T, H, Dv]`` (dtype of q), ``lse [B, T, H]`` float32 (true logits),
    ``stats [3]`` = (CG iterations, worst relative residual, worst amplification) on the CPU, where
    the amplification estimates how much rounding is magnified (see ``LLAAux``), and the saved state
    ``x, m [B, Hk, G, T, D]``, ``lse_c [B, Hk, G, T]`` (compute dtype; lse of the shifted logits).

    Per step (``_blocks``): a chunk of (batch, key head) pairs, each with its ``G`` query heads, and
    a tile of query rows: one logits GEMM and an in-place softmax in a reused buffer; one GEMM for
    the mean ``m``; the solve (CG with a tile-shared dense preconditioner, dropping converged rows as
    it goes); one GEMM for ``y . x`` and one for the output.  A step is at most ``HEAD_TILE_ELEMS``
    weights (4 MiB in float32), which keeps the CG loop's weight tile in cache (measured ~1.5x faster
    per iteration than all heads at once at long T); at short T many pairs share a step.
    """
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    Q, Kc, V, L, kbar, bad = _prepare(q, k, v, lam)
    cdt = Q.dtype
    scratch = _Scratch(Q)
    Qs = Q * cfg.scale  # [B, Hk, G, T, D] scaled once
    Qmu = Q - kbar.unsqueeze(2)  # queries in the shifted key frame (for mu = m - q)
    Kx = torch.cat([Kc, (Kc * Kc).sum(-1, keepdim=True)], dim=-1)  # [B, Hk, S, D + 1]: keys | |k|^2
    O = Q.new_zeros(B, Hk, G, T, Dv)
    X = Q.new_zeros(B, Hk, G, T, D)
    M = Q.new_zeros(B, Hk, G, T, D)
    LSE = Q.new_full((B, Hk, G, T), float("-inf"))
    iters, resid, amp = 0, Q.new_zeros(()), Q.new_zeros(())
    # (batch, key head) pairs folded into one dim N, processed ``nb`` at a time: one pair per step
    # at long T (a tile is already HEAD_TILE_ELEMS), many at short T (training shapes), so that
    # small problems are a few batched GEMMs rather than B * Hk tiny ones.
    N = B * Hk
    Qs, Qmu, Kc, Kx, V, L = (t.reshape(N, *t.shape[2:]) for t in (Qs, Qmu, Kc, Kx, V, L))
    O, X, M, LSE = (t.view(N, *t.shape[2:]) for t in (O, X, M, LSE))
    bad = None if bad is None else bad.reshape(N, S)
    for c, i0, i1, j0, j1, mask in _blocks(T, S, cfg.window, G, N, Q.device, D, cfg.solver):
        t = i1 - i0
        R = G * t
        Kt, Vt = Kc[c, j0:j1], V[c, j0:j1]  # [nb, n, D], [nb, n, Dv]
        s, lse_t = _softmax_tile(Qs[c, :, i0:i1].reshape(-1, R, D), Kt, mask, G, scratch)  # [nb, R, n]
        LSE[c, :, i0:i1] = lse_t.view(-1, G, t)
        msk = s @ Kx[c, j0:j1]  # [nb, R, D + 1]: m and sum_j s_j |k_j|^2 in one GEMM
        m = msk[..., :D]
        lam_t = L[c, :, i0:i1].reshape(-1, R)
        mu = m - Qmu[c, :, i0:i1].reshape(-1, R, D)
        x, it, r = _solve(cfg, s, Kt, m, lam_t, mu, None, scratch)
        iters, resid = max(iters, it), torch.maximum(resid, r)
        # y_j . x, then s_j (y_j . x) in place; the output weights are s_j - s_j (y_j . x)
        syx = scratch.get("k", s.shape)
        torch.baddbmm(-(m * x).sum(-1, keepdim=True), x, Kt.transpose(-1, -2), out=syx).mul_(s)
        # rounding amplification: of the output weights, and of forming A next to the ridge
        amp_rows = torch.linalg.vector_norm(syx, ord=1, dim=-1) + msk[..., D] / lam_t
        amp = torch.maximum(amp, amp_rows.max())
        if bad is not None:
            sees_bad = (s > 0).to(cdt) @ bad[c, j0:j1, None].to(cdt)  # [nb, R, 1]
        o = torch.matmul(torch.sub(s, syx, out=syx), Vt)  # [nb, R, Dv]
        if bad is not None:
            o = o.masked_fill(sees_bad > 0, float("nan"))
        O[c, :, i0:i1] = o.view(-1, G, t, Dv)
        X[c, :, i0:i1] = x.view(-1, G, t, D)
        M[c, :, i0:i1] = m.reshape(-1, G, t, D)
    O, X, M, LSE = (t.view(B, Hk, *t.shape[1:]) for t in (O, X, M, LSE))
    o = O.reshape(B, H, T, Dv).permute(0, 2, 1, 3).to(q.dtype)
    # lse of the true logits: the key shift moved each row's logits by scale * q . kbar
    lse = (LSE + cfg.scale * (Q @ kbar.unsqueeze(2).transpose(-1, -2)).squeeze(-1)).reshape(B, H, T)
    lse = lse.permute(0, 2, 1).float()
    stats = torch.stack([torch.tensor(float(iters), dtype=resid.dtype), resid.cpu(), amp.cpu()])
    return o, lse, stats, X, M, LSE


def lla_backward(do, q, k, v, lam, X, M, LSE, cfg, need_dlam: bool = True):
    """Backward pass from the forward's saved state -> ``(dq, dk, dv, dlam [B, T, H] or None)``.

    The forward's steps (``_blocks``), the ``[nb, R, n]`` intermediates in reused buffers and updated
    in place; the adjoint solve as in the forward.
    """
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    Q, Kc, V, L, _, _ = _prepare(q, k, v, lam)
    cdt = Q.dtype
    scratch = _Scratch(Q)
    scale = cfg.scale
    Qs = Q * scale
    dO = do.to(cdt).permute(0, 2, 1, 3).reshape(B, Hk, G, T, Dv)
    dQ, dK, dV, dL = (t.new_zeros(t.shape) for t in (Q, Kc, V, L))  # contiguous (Q, V, L are views)
    N = B * Hk  # (batch, key head) pairs folded, ``nb`` at a time, as in the forward
    Qs, Q, Kc, V, L, dO = (t.reshape(N, *t.shape[2:]) for t in (Qs, Q, Kc, V, L, dO))
    dQ, dK, dV, dL = (t.view(N, *t.shape[2:]) for t in (dQ, dK, dV, dL))
    X, M, LSE = (t.reshape(N, *t.shape[2:]) for t in (X, M, LSE))
    for c, i0, i1, j0, j1, mask in _blocks(T, S, cfg.window, G, N, Q.device, D, cfg.solver):
        t = i1 - i0
        R = G * t
        Kt, Vt = Kc[c, j0:j1], V[c, j0:j1]  # [nb, n, D], [nb, n, Dv]
        KtT = Kt.transpose(-1, -2)
        nbc, n = Kt.shape[0], Kt.shape[1]
        lse = LSE[c, :, i0:i1].reshape(nbc, R, 1)
        lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
        s = scratch.get("s", (nbc, R, n))
        torch.matmul(Qs[c, :, i0:i1].reshape(nbc, R, D), KtT, out=s)
        _mask_fill_(s, mask)
        s.sub_(lse).exp_()  # [nb, R, n] softmax weights
        x, m = X[c, :, i0:i1].reshape(nbc, R, D), M[c, :, i0:i1].reshape(nbc, R, D)
        q_t = Q[c, :, i0:i1].reshape(nbc, R, D)
        do_t = dO[c, :, i0:i1].reshape(nbc, R, Dv)
        lam_t = L[c, :, i0:i1].reshape(nbc, R)
        g = scratch.get("g", (nbc, R, n))
        torch.matmul(do_t, Vt.transpose(-1, -2), out=g)  # g_j = do . v_j
        a = scratch.get("a", (nbc, R, n))
        torch.mul(s, g, out=a)  # s_j g_j
        gbar = a.sum(-1, keepdim=True)  # [nb, R, 1]
        gx = gbar * m - a @ Kt  # -sum_j s_j g_j y_j
        u, _, _ = _solve(cfg, s, Kt, m, lam_t, gx, None, scratch)  # adjoint solve
        gm = gbar * x + u
        yx = scratch.get("yx", (nbc, R, n))
        torch.matmul(x, KtT, out=yx).sub_((m * x).sum(-1, keepdim=True))  # y_j . x
        torch.matmul(u, KtT, out=a).sub_((m * u).sum(-1, keepdim=True))  # y_j . u
        a.add_(g)  # g_j + y_j . u
        P = scratch.get("P", (nbc, R, n))
        torch.matmul(gm, KtT, out=P).sub_((m * gm).sum(-1, keepdim=True))  # y_j . gm
        P.add_(g).addcmul_(yx, a, value=-1.0)  # P_j = (1 - y.x) g - (y.u)(y.x) + y.gm
        sP = torch.linalg.vecdot(s, P).unsqueeze(-1)  # [nb, R, 1]
        dl = P.sub_(sP).mul_(s)  # softmax backward
        dq = torch.baddbmm(u, dl, Kt, beta=-1.0, alpha=scale)  # scale * dl @ K - u
        dQ[c, :, i0:i1] = dq.view(nbc, G, t, D)
        coef = a.neg_().add_(gbar).mul_(s)  # s_j (gbar - g_j - y_j . u)
        sc = yx.neg_().add_(1.0).mul_(s)  # s_j (1 - y_j . x)
        dKh = dK[c, j0:j1]
        dKh.baddbmm_(coef.transpose(-1, -2), x).baddbmm_(sc.transpose(-1, -2), u)
        dKh.baddbmm_(dl.transpose(-1, -2), q_t, alpha=scale)
        dV[c, j0:j1].baddbmm_(sc.transpose(-1, -2), do_t)
        dL[c, :, i0:i1] = (-(u * x).sum(-1)).view(nbc, G, t)
    dQ, dK, dV, dL = (t.view(B, Hk, *t.shape[1:]) for t in (dQ, dK, dV, dL))
    dq = dQ.reshape(B, H, T, D).permute(0, 2, 1, 3).to(q.dtype)
    dk = dK.permute(0, 2, 1, 3).to(k.dtype)
    dv = dV.permute(0, 2, 1, 3).to(v.dtype)
    dlam = dL.reshape(B, H, T).permute(0, 2, 1).to(lam.dtype) if need_dlam else None
    return dq, dk, dv, dlam


class LLATorchFunction(torch.autograd.Function):
    """Autograd wrapper: ``(q, k, v, lam[B, T, H], cfg) -> (o, lse, stats)``; stats as in ``lla_forward``."""

    @staticmethod
    def forward(ctx, q, k, v, lam, cfg):
        o, lse, stats, X, M, LSE = lla_forward(q, k, v, lam, cfg)
        ctx.save_for_backward(q, k, v, lam, X, M, LSE)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lse, stats)
        return o, lse, stats

    @staticmethod
    def backward(ctx, do, _dlse, _dstats):
        q, k, v, lam, X, M, LSE = ctx.saved_tensors
        dq, dk, dv, dlam = lla_backward(do, q, k, v, lam, X, M, LSE, ctx.cfg, ctx.needs_input_grad[3])
        return dq, dk, dv, dlam, None


def lla_torch(q, k, v, lam, *, scale, window_size, cu_seqlens, solver, max_iters, tol, precondition):
    """PyTorch backend entry: ``(o [B, T, H, Dv], lse [B, T, H], iters, residual, amplification)``.

    Packed sequences (``cu_seqlens``) run one after the other, so nothing crosses a boundary.
    """
    cfg = _Cfg(scale, tuple(window_size), solver, max_iters, tol, precondition)
    if cu_seqlens is None:
        o, lse, stats = LLATorchFunction.apply(q, k, v, lam, cfg)
        iters, resid, amp = stats.tolist()
        return o, lse, int(iters), resid, amp
    outs, lses, iters, resid, amp = [], [], 0, 0.0, 0.0
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:]):
        o, lse, stats = LLATorchFunction.apply(q[:, a:b], k[:, a:b], v[:, a:b], lam[:, a:b], cfg)
        it, r, amp_seq = stats.tolist()
        amp = max(amp, amp_seq)
        outs.append(o)
        lses.append(lse)
        iters = max(iters, int(it))
        resid = r if math.isnan(r) else max(resid, r)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1), iters, resid, amp
