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

from .solvers import cholesky_solve, cov_diag, cov_matrix, cov_matvec, pcg

__all__ = ["lla_torch", "lla_forward", "lla_backward", "LLATorchFunction", "TILE_ELEMS"]

#: Upper bound on the elements of one ``[B, H, tile, n_keys]`` score tile (float32: 16 MiB).
TILE_ELEMS = 1 << 22


class _Cfg:
    __slots__ = ("scale", "window", "solver", "max_iters", "tol", "precondition")

    def __init__(self, scale, window, solver, max_iters, tol, precondition):
        self.scale, self.window, self.solver = scale, window, solver
        self.max_iters, self.tol, self.precondition = max_iters, tol, precondition


def _tiles(T: int, S: int, window, rows_per_q: int):
    """Yield (i0, i1, j0, j1, mask[t, n] or None): query tiles and the key range they can see."""
    left, right = window
    off = S - T
    t = max(16, min(T, TILE_ELEMS // max(1, rows_per_q * S)))
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


def _scores(Qt, Kt, mask, scale):
    """Masked logits of a tile: Qt [B, Hk, G, t, D], Kt [B, Hk, n, D] -> [B, Hk, G, t, n]."""
    logits = scale * (Qt @ Kt.unsqueeze(2).transpose(-1, -2))
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
    return logits


def _flat(x):
    """[B, Hk, G, t, *] -> [B, Hk, G * t, *] (rows of a key head share its keys)."""
    return x.flatten(2, 3)


def _solve(cfg, s, kc, m, lam, b):
    """Solve A x = b for a tile's rows with the configured solver -> (x, iters, residual)."""
    if cfg.solver == "direct":
        x, resid = cholesky_solve(cov_matrix(s, kc, m, lam), b)
        return x, 0, resid
    diag = cov_diag(s, kc, m, lam) if cfg.precondition else None
    return pcg(lambda p: cov_matvec(s, kc, m, lam, p), b, diag, tol=cfg.tol, max_iters=cfg.max_iters)


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
    """
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    Q, Kc, V, L, kbar, bad = _prepare(q, k, v, lam)
    cdt = Q.dtype
    O = Q.new_zeros(B, Hk, G, T, Dv)
    X = Q.new_zeros(B, Hk, G, T, D)
    M = Q.new_zeros(B, Hk, G, T, D)
    LSE = Q.new_full((B, Hk, G, T), float("-inf"))
    iters, resid, amp = 0, Q.new_zeros(()), Q.new_zeros(())
    for i0, i1, j0, j1, mask in _tiles(T, S, cfg.window, B * H):
        if j1 == j0:
            continue
        Qt, Kt, Vt = Q[:, :, :, i0:i1], Kc[:, :, j0:j1], V[:, :, j0:j1]
        logits = _scores(Qt, Kt, mask, cfg.scale)  # [B, Hk, G, t, n]
        mx = logits.amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(logits - mx)
        z = p.sum(-1, keepdim=True)
        s = _flat(p / z.clamp_min(torch.finfo(cdt).tiny))  # [B, Hk, R, n]
        LSE[:, :, :, i0:i1] = (mx + z.log()).squeeze(-1)
        m = s @ Kt  # [B, Hk, R, D]
        lam_t = _flat(L[:, :, :, i0:i1])
        x, it, r = _solve(cfg, s, Kt, m, lam_t, m - _flat(Qt - kbar.unsqueeze(2)))  # mu = m - q, both shifted
        iters, resid = max(iters, it), torch.maximum(resid, r)
        yx = x @ Kt.transpose(-1, -2) - (m * x).sum(-1, keepdim=True)  # [B, Hk, R, n]  y_j . x
        # rounding amplification: of the output weights, and of forming A next to the ridge
        ksq = (Kt * Kt).sum(-1, keepdim=True)  # [B, Hk, n, 1]
        amp_rows = (s * yx.abs()).sum(-1) + (s @ ksq).squeeze(-1) / lam_t  # [B, Hk, R]
        amp = torch.maximum(amp, amp_rows.max())
        w = s * (1.0 - yx)
        o = w @ Vt
        if bad is not None:
            sees_bad = (s > 0).to(cdt) @ bad[:, :, j0:j1, None].to(cdt)  # [B, Hk, R, 1]
            o = o.masked_fill(sees_bad > 0, float("nan"))
        shape = (B, Hk, G, i1 - i0)
        O[:, :, :, i0:i1] = o.view(*shape, Dv)
        X[:, :, :, i0:i1] = x.view(*shape, D)
        M[:, :, :, i0:i1] = m.view(*shape, D)
    o = O.reshape(B, H, T, Dv).permute(0, 2, 1, 3).to(q.dtype)
    # lse of the true logits: the key shift moved each row's logits by scale * q . kbar
    lse = (LSE + cfg.scale * (Q @ kbar.unsqueeze(2).transpose(-1, -2)).squeeze(-1)).reshape(B, H, T)
    lse = lse.permute(0, 2, 1).float()
    stats = torch.stack([torch.tensor(float(iters), dtype=resid.dtype), resid.cpu(), amp.cpu()])
    return o, lse, stats, X, M, LSE


def lla_backward(do, q, k, v, lam, X, M, LSE, cfg, need_dlam: bool = True):
    """Backward pass from the forward's saved state -> ``(dq, dk, dv, dlam [B, T, H] or None)``."""
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    Q, Kc, V, L, _, _ = _prepare(q, k, v, lam)
    cdt = Q.dtype
    dO = do.to(cdt).permute(0, 2, 1, 3).reshape(B, Hk, G, T, Dv)
    dQ = torch.zeros_like(Q)
    dK = torch.zeros_like(Kc)
    dV = torch.zeros_like(V)
    dL = torch.zeros_like(L)
    for i0, i1, j0, j1, mask in _tiles(T, S, cfg.window, B * H):
        if j1 == j0:
            continue
        Qt, Kt, Vt = Q[:, :, :, i0:i1], Kc[:, :, j0:j1], V[:, :, j0:j1]
        lse = LSE[:, :, :, i0:i1, None]
        lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
        s = _flat(torch.exp(_scores(Qt, Kt, mask, cfg.scale) - lse))  # [B, Hk, R, n]
        x, m = _flat(X[:, :, :, i0:i1]), _flat(M[:, :, :, i0:i1])  # [B, Hk, R, D]
        q_t, do_t, lam_t = _flat(Qt), _flat(dO[:, :, :, i0:i1]), _flat(L[:, :, :, i0:i1])
        g = do_t @ Vt.transpose(-1, -2)  # [B, Hk, R, n]   g_j = do . v_j
        yx = x @ Kt.transpose(-1, -2) - (m * x).sum(-1, keepdim=True)  # y_j . x
        sg = s * g
        gbar = sg.sum(-1, keepdim=True)  # [B, Hk, R, 1]
        gx = gbar * m - sg @ Kt  # -sum_j s_j g_j y_j
        u, _, _ = _solve(cfg, s, Kt, m, lam_t, gx)  # adjoint solve
        gm = gbar * x + u
        ugm = torch.cat([u, gm], dim=-2) @ Kt.transpose(-1, -2)  # [B, Hk, 2R, n]
        R = u.shape[-2]
        yu = ugm[..., :R, :] - (m * u).sum(-1, keepdim=True)
        ygm = ugm[..., R:, :] - (m * gm).sum(-1, keepdim=True)
        c = 1.0 - yx
        P = c * g - yu * yx + ygm
        dl = s * (P - (s * P).sum(-1, keepdim=True))
        dq = cfg.scale * (dl @ Kt) - u
        dQ[:, :, :, i0:i1] = dq.view(B, Hk, G, i1 - i0, D)
        sc = s * c
        coef = torch.cat([s * (gbar - g - yu), sc, cfg.scale * dl], dim=-2)  # [B, Hk, 3R, n]
        dK[:, :, j0:j1] += coef.transpose(-1, -2) @ torch.cat([x, u, q_t], dim=-2)
        dV[:, :, j0:j1] += sc.transpose(-1, -2) @ do_t
        dL[:, :, :, i0:i1] = (-(u * x).sum(-1)).view(B, Hk, G, i1 - i0)
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
        it, r, a = stats.tolist()
        amp = max(amp, a)
        outs.append(o)
        lses.append(lse)
        iters = max(iters, int(it))
        resid = r if math.isnan(r) else max(resid, r)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1), iters, resid, amp
