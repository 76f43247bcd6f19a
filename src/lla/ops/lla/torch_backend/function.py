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
and ``delta`` is never formed by cancellation.  Logits come from the raw keys.  For the moments and
the solve, the keys of a query tile are shifted by a vector taken only from keys that every row of
the tile sees (``A``, ``mu`` and the weights are invariant to a common shift; the shift only keeps
the products small), and the covariance matvec is applied centred per row: no statistic over keys a
row cannot see enters its arithmetic.

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

import copy
import math

import torch

from ...common.diagnostics import adjoint_tol, check_conditioning, check_solve
from ...common.masks import zero_nonfinite
from ...common.policy import resolve_precision
from ...common.result import BackendResult
from ...common.varlen import Varlen, longest_keys, segments, with_queries
from ..config import LLAConfig
from .solvers import FEW_ROWS, Work, _fallback, chol_solve, direct_solve, pcg_compact, pcg_mixed

__all__ = ["lla_torch", "lla_forward", "lla_backward", "LLATorchFunction", "TILE_ELEMS"]

#: When a list, every forward and backward appends ``(stage, solvers.Work)``: the row-key products its
#: solves' matvecs really ran (bf16 and working precision), for ``lla bench``'s FLOP count.
WORK_LOG = None

#: Upper bound on the elements of one ``[B, H, tile, n_keys]`` score tile (float32: 16 MiB).
TILE_ELEMS = 1 << 22

#: Upper bound on the elements of one ``[G * tile, n_keys]`` weight tile of one key head in the
#: forward (float32: 4 MiB).  Small enough for the CG loop's passes to stay in cache.
HEAD_TILE_ELEMS = 1 << 20

#: Upper bound on the elements of one step's ``[nb, G * tile, n_keys]`` weight tiles when several
#: (batch, key head) pairs share a step at long T (float32: 16 MiB): the hot loop's small ops are then
#: issued once for ``nb`` pairs.
STEP_ELEMS = 1 << 22


class _Cfg:
    __slots__ = ("scale", "window", "solver", "max_iters", "tol", "precondition", "adj_tol", "precision")

    def __init__(self, scale, window, solver, max_iters, tol, precondition, adj_tol=None, precision="auto"):
        self.scale, self.window, self.solver = scale, window, solver
        self.max_iters, self.tol, self.precondition = max_iters, tol, precondition
        self.adj_tol = adjoint_tol(tol) if adj_tol is None else adj_tol
        self.precision = precision


def _row_range(i, T, S, window):
    """Keys ``[lo, hi]`` (inclusive; empty when ``lo > hi``) visible to query row ``i``."""
    left, right = window
    off = S - T
    lo = 0 if left < 0 else max(0, i + off - left)
    hi = S - 1 if right < 0 else min(S - 1, i + off + right)
    return lo, hi


def _common_keys(i0, i1, T, S, window):
    """Keys every row of ``i0:i1`` that sees any key can see, as a half-open ``(a, b)`` range of at most
    ``SHIFT_SAMPLE`` keys (the ones nearest the tile's first row), or None when there is none.

    Visible ranges ``[lo_i, hi_i]`` are non-decreasing in ``i``, so the common range of rows
    ``ia..ib`` (the first and last row that see a key) is ``[lo_ib, hi_ia]``."""
    def sees(i):
        lo, hi = _row_range(i, T, S, window)
        return lo <= hi

    ia = next((i for i in range(i0, i1) if sees(i)), None)
    if ia is None:
        return None
    ib = next(i for i in range(i1 - 1, ia - 1, -1) if sees(i))
    a, b = _row_range(ib, T, S, window)[0], _row_range(ia, T, S, window)[1]
    if a > b:
        return None
    return max(a, b + 1 - SHIFT_SAMPLE), b + 1


#: How many keys (nearest the tile's first row, all visible to every row of the tile) the tile's
#: key shift is the coordinate-wise median of.
SHIFT_SAMPLE = 64


def _tiles(T: int, S: int, window, rows_per_q: int, elems: int = TILE_ELEMS):
    """Yield (i0, i1, j0, j1, mask[t, n] or None): query tiles and the key range they can see.

    A tile has ``t`` query positions, ``rows_per_q * t * S <= elems`` (at least 16 positions).
    With a bounded window, a tile is also no taller than the window is wide (when that is at least
    16 rows), so that its rows share keys (the key shift needs some, see ``_common_keys``)."""
    left, right = window
    off = S - T
    t = max(16, min(T, elems // max(1, rows_per_q * S)))
    if left >= 0:
        span = left + (right if right >= 0 else S) + 1
        if span >= 16:
            t = min(t, span)
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


def _floor(eps, x, b, lam, ekc2, m):
    """Per-row rounding floor of the true relative residual ``||b - A x|| / ||b||`` in working precision.

    The centred matvec forms ``y_j . x`` as ``(k_j - c) . x - m . x``, with an error of about
    ``eps |k_j - c| |x|`` that reaches ``A x`` multiplied by ``s_j y_j``: in all about
    ``eps sqrt(E|k - c|^2  tr C) |x|`` (Cauchy-Schwarz, ``C`` the weighted key covariance), plus the
    ridge and right-hand side terms.  x, b, m [..., R, D], lam, ekc2 [..., R] -> [..., R]
    """
    xn = x.norm(dim=-1)
    bn = b.norm(dim=-1)
    trc = (ekc2 - torch.linalg.vecdot(m, m)).clamp_min(0.0)
    return FLOOR_FACTOR * eps * ((trc * ekc2).sqrt() * xn + lam * xn + bn) / bn.where(bn > 0, torch.ones_like(bn))


#: The residual a solve can be held to is ``FLOOR_FACTOR`` times the estimate in ``_floor``
#: (accumulated rounding of the key-length sums; measured in ``benchmarks/tolerance_curves.py``).
FLOOR_FACTOR = 1.0

#: The backward warns when ``BACKWARD_LOGIT_FACTOR * eps * scale |q| E|k|`` (the logits' rounding,
#: which the gradients through nearly one-hot weights do not average out) exceeds the conditioning
#: threshold (measured on ``benchmarks/robustness.py``).
BACKWARD_LOGIT_FACTOR = 4.0

#: CG stops a row once its recurrence residual is below ``CG_FLOOR_STOP`` times the floor estimate
#: (measured: the true residual then sits at ~1x the estimate, and output and gradient errors match a
#: solve run to the iteration cap; ``benchmarks/tolerance_curves.py``).
CG_FLOOR_STOP = 0.25


def _cg_floor_coef(ekc2, m, lam):
    """The floor coefficient CG stops at (``FLOOR_FACTOR * CG_FLOOR_STOP`` times ``_floor``'s
    ``sqrt(tr C E|k - c|^2) + lam``), from ``ekc2 = E_s |k - c|^2``, ``m`` [..., R, D] and ``lam``."""
    trc = (ekc2 - torch.linalg.vecdot(m, m)).clamp_min(0.0)
    return FLOOR_FACTOR * CG_FLOOR_STOP * ((trc * ekc2).sqrt() + lam)


def _solve(cfg, s, k1, m, lam, b, diag, scratch, tol, ekc2, aim=None, work=None, smax=None):
    """Solve A x = b for a tile's rows with the configured solver -> (x, iters, residual, floor).

    ``aim`` (optional, a float or per-row ``[..., R]``) is a tighter tolerance to iterate to, where
    ``tol`` is the contract the result is checked against (the floor stop still ends a row whose
    residual reached its rounding floor).

    The direct solve returns its true relative residual per row and the attainable floor; CG returns
    None for both: the caller measures the true residual from the ``y . x`` pass it makes anyway
    (``_cg_exit``), which saves the exit matvec's first GEMM.
    """
    if cfg.solver == "direct":
        x, res = direct_solve(s, k1, m, lam, b, tol=tol if aim is None else aim)
        return x, 0, res, _floor(torch.finfo(b.dtype).eps, x, b, lam, ekc2, m)
    coef = _cg_floor_coef(ekc2, m, lam)
    if resolve_precision(cfg.precision, b.dtype, b.device) == "mixed":
        # held to the same floor as plain CG (the CG_FLOOR_STOP margin): at the floor itself the true
        # residuals met it, but the outputs were 3-7x less accurate than fp32 CG's (AMX CPU, T = 63-100,
        # D = 16-80, every row in bf16; 1.6-1.8x with the margin; tests/numerics/test_precision.py)
        x, it, _ = pcg_mixed(s, k1, m, lam, b, diag if cfg.precondition else None, tol=tol, max_iters=cfg.max_iters,
                             scratch=scratch, floor_coef=coef, work=work,
                             ekc2=ekc2, smax=s.amax(-1) if smax is None else smax, residual=False)
        return x, it, None, None  # the true residual comes from the y . x pass (``_cg_exit``)
    x, it, _ = pcg_compact(s, k1, m, lam, b, diag if cfg.precondition else None, tol=tol if aim is None else aim,
                           max_iters=cfg.max_iters, scratch=scratch, floor_coef=coef, residual=False, work=work)
    return x, it, None, None


def _cg_exit(cfg, s, k1, m, lam, b, diag, scratch, tol, ekc2, x, it, sy, aim=None, work=None):
    """True residual of a CG solve from ``sy = s_j y_j . x`` ``[nb, R, n]`` (one GEMM instead of a matvec).

    A row whose true residual misses ``max(tol, floor)`` (the recurrence residual drifted from the
    true one) is restarted from its iterate, once, within the iteration cap; then ``redone`` is True
    and the caller recomputes what it derived from ``x``.  After a mixed solve (``pcg_mixed``, which
    leaves its last rows to this check) only the rows that missed are finished, in the working
    precision, with a full iteration budget (the bf16 iterations do not count against it).
    -> (x, iters, residual, floor, redone)
    """
    ax = (sy @ k1).addcmul_(sy.sum(-1, keepdim=True), m, value=-1.0).addcmul_(x, lam.unsqueeze(-1))
    bn = b.norm(dim=-1)
    res = (b - ax).norm(dim=-1) / bn.where(bn > 0, torch.ones_like(bn))
    eps = torch.finfo(b.dtype).eps
    fl = _floor(eps, x, b, lam, ekc2, m)
    miss = res > torch.maximum(fl, torch.full_like(fl, tol)) * 2.0
    mixed = resolve_precision(cfg.precision, b.dtype, b.device) == "mixed"
    if mixed:
        miss |= ~torch.isfinite(res)
    if (it >= cfg.max_iters and not mixed) or not bool(miss.any()):
        return x, it, res, fl, False
    coef = _cg_floor_coef(ekc2, m, lam)
    if mixed:
        bn1 = bn.where(bn > 0, torch.ones_like(bn))
        rn = res * bn1
        it2 = _fallback(x, rn, miss, s, k1, m, lam, b, bn, diag if cfg.precondition else None, tol=tol,
                        max_iters=cfg.max_iters, scratch=scratch, coef=coef, work=work)
        return x, max(it, it2), rn / bn1, _floor(eps, x, b, lam, ekc2, m), True
    x2, it2, res2 = pcg_compact(s, k1, m, lam, b, diag if cfg.precondition else None, tol=tol if aim is None else aim,
                                max_iters=cfg.max_iters - it, scratch=scratch, x0=x, floor_coef=coef)
    better = res2 < res
    x = torch.where(better.unsqueeze(-1), x2, x)
    res = torch.where(better, res2, res)
    return x, it + it2, res, _floor(eps, x, b, lam, ekc2, m), True


class _Scratch:
    """Reusable flat buffers, so that the ``[B, Hk, R, n]`` tiles of the hot loop are not freshly
    allocated (and page-faulted) on every use.  ``get(slot, shape)`` returns a contiguous view."""

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.bufs: dict = {}

    def get(self, slot: str, shape, dtype=None) -> torch.Tensor:
        n = math.prod(shape)
        key = slot if dtype is None or dtype == self.like.dtype else (slot, dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.like.new_empty(max(n, 1), dtype=dtype)
            self.bufs[key] = buf
        return buf[:n].view(*shape)


def _tile_plan(T, S, window, G, elems, device, pairs: int = 1, D: int = 0, direct: bool = False):
    """``_tiles`` with each mask reduced, once, to what ``_mask_fill_`` needs: ``(c0, c1, hidden)``
    with ``hidden [G * t, c1 - c0]`` the masked entries of the only partly visible columns, and each
    tile's shift sample (``_common_keys``).

    Also returns ``nb``: how many of the ``pairs`` (batch, key head) pairs to process together so
    that a step's largest intermediates stay within ``elems`` (1 once one pair fills it): the
    ``[nb, G * t, n]`` weight tile, and, for head size ``D``, the solver's per-row systems
    (``[nb, G * t, D, D]`` for the direct solve).
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
        rows = G * (i1 - i0)
        size = max(rows * (j1 - j0), rows * D * D if direct else D * D, 1)
        plan.append((i0, i1, j0, j1, fill, _common_keys(i0, i1, T, S, window), size))
        widest = max(widest, size)
    return plan, max(1, min(pairs, elems // widest))


def _blocks(T, S, window, G, N, device, D, solver):
    """The steps of the forward and backward loops: ``(c, i0, i1, j0, j1, mask, common)`` with ``c``
    a slice of the ``N`` folded (batch, key head) pairs (``nb`` of them, see ``_tile_plan``), rows
    ``i0:i1``, the keys ``j0:j1`` they can see, the tile's mask fill and its shift sample; tiles that
    see no key are skipped."""
    tiles, nb = _tile_plan(T, S, window, G, HEAD_TILE_ELEMS, device, N, D, solver == "direct")
    if nb < N and solver != "direct":
        # long sequences: a tile already fills HEAD_TILE_ELEMS for one pair; batching pairs per step
        # (up to STEP_ELEMS weights) shares the hot loop's per-op cost among them
        for i0, i1, j0, j1, mask, common, size in tiles:
            if j1 > j0:
                step = max(1, min(N, STEP_ELEMS // size))
                for c0 in range(0, N, step):
                    yield slice(c0, min(N, c0 + step)), i0, i1, j0, j1, mask, common
        return
    for c0 in range(0, N, nb):
        c = slice(c0, min(N, c0 + nb))
        for i0, i1, j0, j1, mask, common, _ in tiles:
            if j1 > j0:
                yield c, i0, i1, j0, j1, mask, common


def _mask_fill_(logits, fill):
    """Set the masked logits of a tile [R, n] to -inf in place (only the partly masked columns)."""
    if fill is None:
        return
    c0, c1, hidden = fill
    logits[..., c0:c1].masked_fill_(hidden, float("-inf"))


def _softmax_tile(Qs, Kt, mask, G, scratch):
    """Softmax weights of a tile, in a scratch buffer: Qs [..., R, D] (already scaled),
    Kt [..., n, D] (raw keys) -> (s [..., R, n], lse [..., R] of the logits, largest weight [..., R])."""
    s = scratch.get("s", (*Qs.shape[:-1], Kt.shape[-2]))
    torch.matmul(Qs, Kt.transpose(-1, -2), out=s)
    _mask_fill_(s, mask)
    mx = s.amax(-1, keepdim=True)  # [B, Hk, R, 1]
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s.sub_(mx).exp_()
    z = s.sum(-1, keepdim=True)
    s.mul_(1.0 / z.clamp_min(torch.finfo(s.dtype).tiny))
    smax = torch.where(z > 0, 1.0 / z, torch.zeros_like(z))  # a row that sees no key has no largest weight
    return s, (mx + z.log()).squeeze(-1), smax.squeeze(-1)


def _shifted_keys(K, c, common, j0, j1, extra: bool):
    """The tile's keys in its own frame, ``kc = k_j - c_t`` (``[nb, n, D]``, contiguous), and with
    ``extra`` also ``[1 | (k_j - c_t)^2 | |k_j - c_t| | |k_j|]`` (``[nb, n, D + 3]``, else None).
    ``c_t`` (``[nb, 1, D]``) is the coordinate-wise median of the tile's shift sample (keys every row
    of the tile sees), zero when there is none.  -> (kc, extras, c_t)"""
    Kr = K[c, j0:j1]
    D = Kr.shape[-1]
    if common is None:
        shift = Kr.new_zeros(Kr.shape[0], 1, D)
    else:
        shift = K[c, common[0]:common[1]].median(dim=-2, keepdim=True).values
    kc = Kr - shift
    if not extra:
        return kc, None, shift
    ext = Kr.new_empty(*Kr.shape[:-1], D + 3)
    ext[..., 0] = 1.0
    torch.mul(kc, kc, out=ext[..., 1 : D + 1])
    ext[..., D + 1] = ext[..., 1 : D + 1].sum(-1).sqrt_()
    ext[..., D + 2] = Kr.norm(dim=-1)
    return kc, ext, shift


def _prepare(q, k, v, lam):
    """Head-major compute-dtype views, non-finite keys zeroed.

    Returns Q [B, Hk, G, T, D], K [B, Hk, S, D], V [B, Hk, S, Dv], L [B, Hk, G, T], bad
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
    K, V, bad = zero_nonfinite(K, V)  # [B, Hk, S]: the rows that see one are poisoned by the caller
    return Q, K, V, L, bad


def _solve_stats(res, fl, tol):
    """(worst true residual, the residual and floor of the row furthest past ``max(tol, floor)``)."""
    ratio = res / torch.maximum(fl, torch.full_like(fl, tol))
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, float("inf")), ratio)
    k = ratio.reshape(-1).argmax()
    return res.max(), res.reshape(-1)[k], fl.reshape(-1)[k], ratio.reshape(-1)[k]


def _merge(acc, new):
    """Keep the worse of two ``_solve_stats`` tuples (NaN residuals propagate)."""
    if acc is None:
        return new
    worst = torch.maximum(acc[0], new[0])
    worst = torch.where(torch.isnan(acc[0]) | torch.isnan(new[0]), torch.full_like(worst, float("nan")), worst)
    take = new[3] > acc[3]
    return (worst, *(torch.where(take, b, a) for a, b in zip(acc[1:], new[1:])))


#: A row whose working-precision solve is hopeless is recomputed in float64 from its own tile
#: (``_tile_fp64``; the backward redoes such a tile in float64, ``lla_backward``): a non-finite residual
#: or output from finite inputs, a rounding floor (``_floor``) above this, or a direct solve whose true
#: residual stays above it after refinement (the fp32 system cannot represent it, e.g. fp16 keys x100 at
#: ridge 1e-6, cond(A) ~ 1e10).  A CG row short of iterations is not hopeless (more iterations would
#: do): it keeps the working precision and warns, as do rows that are merely inexact.
HOPELESS_RESIDUAL = 1e-2


def _hopeless_rows(solver, res, fl):
    """Rows (``[..., R]`` bool) the working precision cannot solve (see ``HOPELESS_RESIDUAL``)."""
    out = ~torch.isfinite(res) | ~(fl <= HOPELESS_RESIDUAL)
    return out | (res > HOPELESS_RESIDUAL) if solver == "direct" else out


def _tile_fp64(Q, K, V, L, c, i0, i1, j0, j1, mask, common, G, scale, tol):
    """A tile's rows recomputed in float64 from the keys and values they see (the same shift sample,
    weights from raw keys, formed moments, ``direct_solve``): Q [N, G, T, D], K [N, S, D], V [N, S, Dv],
    L [N, G, T] in the working precision (upcast exactly).
    -> (o [nb, R, Dv], x, m [nb, R, D] (m in the tile's key frame), lse [nb, R], true residual [nb, R]),
    all float64."""
    R, D = G * (i1 - i0), Q.shape[-1]
    Q64 = Q[c, :, i0:i1].reshape(-1, R, D).double()
    K64 = K[c].double()
    s, lse, _ = _softmax_tile(Q64 * scale, K64[:, j0:j1], mask, G, _Scratch(Q64))
    k1, _, shift = _shifted_keys(K64, slice(None), common, j0, j1, extra=False)
    m = s @ k1
    lam = L[c, :, i0:i1].reshape(-1, R).double()
    mu = torch.where(torch.isfinite(lse).unsqueeze(-1), m - (Q64 - shift), torch.zeros_like(m))
    x, res = direct_solve(s, k1, m, lam, mu, tol=tol)
    w = _centred(x, k1, s, torch.empty_like(s)).mul_(s).neg_().add_(s)
    return w @ V[c, j0:j1].double(), x, m, lse, res


def lla_forward(q, k, v, lam, cfg):
    """Forward pass.  q [B, T, H, D], k [B, S, Hk, D], v [B, S, Hk, Dv], lam [B, T, H] (the ridge).

    Returns ``o [B, T, H, Dv]`` (dtype of q), ``lse [B, T, H]`` float32, ``stats [8]`` on the CPU =
    (CG iterations, worst true relative residual, worst amplification, the residual and
    attainable floor of the row furthest past its tolerance (see ``diagnostics.check_solve``), rows a
    mixed solve finished in fp32, and the matvecs' row-key products in bf16 and in the working
    precision (``solvers.Work``: ``4 D`` flops each)), where
    the amplification estimates how much rounding is magnified (see ``LLAAux``), and the saved state
    ``x, m [B, Hk, G, T, D]`` (``m`` in its tile's key frame), ``lse_c [B, Hk, G, T]`` (compute dtype;
    NaN marks a row the working precision could not solve, recomputed in float64 by ``_tile_fp64``,
    whose tile the backward then redoes in float64: see ``HOPELESS_RESIDUAL``).

    Per step (``_blocks``): a chunk of (batch, key head) pairs, each with its ``G`` query heads, and
    a tile of query rows, in four named steps: ``_tile_moments`` (one logits GEMM on raw keys, an
    in-place softmax in a reused buffer, the tile's keys shifted by a vector from keys all its rows
    see, one GEMM for the mean ``m`` and the moments the preconditioner and diagnostics need),
    ``_tile_solve`` (CG dropping converged rows as it goes, or direct; the output weights from one
    ``y . x`` GEMM), ``_tile_output`` (one GEMM for the output, its error scale) and
    ``_tile_rescue`` (hopeless rows in float64).  A step is at most ``HEAD_TILE_ELEMS`` weights
    (4 MiB in float32), which keeps the CG loop's weight tile in cache; at short T many pairs share
    a step.
    """
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    Q, K, V, L, bad = _prepare(q, k, v, lam)
    cdt = Q.dtype
    scratch = _Scratch(Q)
    Qs = Q * cfg.scale  # [B, Hk, G, T, D] scaled once
    O = Q.new_zeros(B, Hk, G, T, Dv)
    X = Q.new_zeros(B, Hk, G, T, D)
    M = Q.new_zeros(B, Hk, G, T, D)
    LSE = Q.new_full((B, Hk, G, T), float("-inf"))
    iters, amp, acc, work, redo = 0, Q.new_zeros(()), None, Work(), None
    # (batch, key head) pairs folded into one dim N, processed ``nb`` at a time: one pair per step
    # at long T (a tile is already HEAD_TILE_ELEMS), many at short T (training shapes), so that
    # small problems are a few batched GEMMs rather than B * Hk tiny ones.
    N = B * Hk
    Q, Qs, K, V, L = (t.reshape(N, *t.shape[2:]) for t in (Q, Qs, K, V, L))
    O, X, M, LSE = (t.view(N, *t.shape[2:]) for t in (O, X, M, LSE))
    bad = None if bad is None else bad.reshape(N, S)
    for c, i0, i1, j0, j1, mask, common in _blocks(T, S, cfg.window, G, N, Q.device, D, cfg.solver):
        t = i1 - i0
        tile = _tile_moments(Q, Qs, K, L, c, i0, i1, j0, j1, mask, common, G, scratch)
        LSE[c, :, i0:i1] = tile.lse.view(-1, G, t)
        x, it, res, fl, w, chol = _tile_solve(cfg, tile, scratch, work)
        iters = max(iters, it)
        Vt = V[c, j0:j1]  # [nb, n, Dv]
        sees_bad = None if bad is None else (tile.s > 0).to(cdt) @ bad[c, j0:j1, None].to(cdt)  # [nb, R, 1]
        o, rel, sens = _tile_output(tile, w, Vt, x, res, chol)
        m, hopeless = tile.m, None
        if cdt != torch.float64:
            o, x, m, res, fl, hopeless = _tile_rescue(cfg, tile, o, x, res, fl, sees_bad,
                                                      (Q, K, V, L, c, i0, i1, j0, j1, mask, common, G))
            if hopeless is not None:
                if redo is None:
                    redo = torch.zeros(LSE.shape, dtype=torch.bool, device=LSE.device)
                redo[c, :, i0:i1] = hopeless.view(-1, G, t)
        acc = _merge(acc, _solve_stats(res, fl, cfg.tol))
        amp = torch.maximum(amp, _amplification(w, x, m, tile.qc, tile.lam, tile.mom, D, cfg.scale,
                                                Q[c, :, i0:i1].reshape(-1, tile.R, D), tile.smax, rel, sens,
                                                skip=hopeless))
        if sees_bad is not None:  # rows that see a non-finite key or value are poisoned
            o = o.masked_fill(sees_bad > 0, float("nan"))
        O[c, :, i0:i1] = o.view(-1, G, t, Dv)
        X[c, :, i0:i1] = x.view(-1, G, t, D)
        M[c, :, i0:i1] = m.reshape(-1, G, t, D)
    if WORK_LOG is not None:
        WORK_LOG.append(("fwd", work))
    O, X, M, LSE = (t.view(B, Hk, *t.shape[1:]) for t in (O, X, M, LSE))
    o = O.reshape(B, H, T, Dv).permute(0, 2, 1, 3).to(q.dtype)
    lse = LSE.reshape(B, H, T).permute(0, 2, 1).float().clone()
    if redo is not None:  # the saved state marks the rows computed in float64 (NaN lse), which the
        LSE.view(-1).masked_fill_(redo.view(-1), float("nan"))  # backward redoes in float64 too
    return o, lse, _forward_stats(iters, acc, amp, work, Q), X, M, LSE


class _TileMoments:
    """One forward step's tile in its key frame (``nb`` pairs, ``R = G * t`` rows, ``n`` keys):

    s [nb, R, n] softmax weights (a scratch buffer), lse / smax [nb, R] (log-sum-exp, largest weight),
    k1 [nb, n, D] the keys shifted by ``shift [nb, 1, D]``, mom [nb, R, 2 D + 3] the weighted moments
    (``m | sum s | diagonal second moments | E|k - c| | E|k|``), m [nb, R, D] the weighted mean,
    ssum [nb, R] the weights' computed sum (few-row tiles only, else None), ekc2 [nb, R] ``E_s |k - c|^2``,
    diag [nb, R, D] the Jacobi diagonal of ``A``, lam [nb, R] the ridge, qc [nb, R, D] the queries in the
    key frame, mu [nb, R, D] the right-hand side ``m - q`` (0 for a row that sees no key), few: a
    decode-like tile (``R <= FEW_ROWS``)."""

    __slots__ = ("R", "s", "lse", "smax", "k1", "shift", "mom", "m", "ssum", "ekc2", "diag", "lam", "qc", "mu",
                 "few")

    def __init__(self, **kw):
        for name, value in kw.items():
            setattr(self, name, value)


def _tile_moments(Q, Qs, K, L, c, i0, i1, j0, j1, mask, common, G, scratch) -> _TileMoments:
    """The weights, shift and weighted moments of one forward tile (see ``_TileMoments``)."""
    D = Q.shape[-1]
    R = G * (i1 - i0)
    cdt = Q.dtype
    few = R <= FEW_ROWS  # decode-like tiles: y . x relative to each row's pivot key (``_centred``)
    s, lse_t, smax = _softmax_tile(Qs[c, :, i0:i1].reshape(-1, R, D), K[c, j0:j1], mask, G, scratch)  # [nb, R, n]
    k1, ext, shift = _shifted_keys(K, c, common, j0, j1, extra=True)
    mom = torch.cat([s @ k1, s @ ext], dim=-1)  # [nb, R, 2 D + 3]: m | sum s | diag moments | E|k - c| | E|k|
    # few-row tiles: the weighted mean with the weights' computed sum as denominator (float32 weights sum
    # to 1 only to rounding, and a mean off by that reaches a nearly one-hot row's output amplified by
    # |x|); many-row tiles keep the plain sum (unchanged numerics there)
    ssum = mom[..., D].clamp_min(torch.finfo(cdt).tiny) if few else None
    m = mom[..., :D] / ssum.unsqueeze(-1) if few else mom[..., :D]
    ekc2 = mom[..., D + 1 : 2 * D + 1].sum(-1)  # E_s |k - c|^2
    diag = (mom[..., D + 1 : 2 * D + 1] - m * m).clamp_min_(0.0)
    lam_t = L[c, :, i0:i1].reshape(-1, R)
    diag.add_(lam_t.unsqueeze(-1))
    qc = Q[c, :, i0:i1].reshape(-1, R, D) - shift
    seen = torch.isfinite(lse_t).unsqueeze(-1)  # rows that see a key (others output 0)
    mu = torch.where(seen, m - qc, torch.zeros_like(m))
    return _TileMoments(R=R, s=s, lse=lse_t, smax=smax, k1=k1, shift=shift, mom=mom, m=m, ssum=ssum, ekc2=ekc2,
                        diag=diag, lam=lam_t, qc=qc, mu=mu, few=few)


def _tile_solve(cfg, tile: _TileMoments, scratch, work):
    """Solve ``A x = mu`` for a tile's rows and form the output weights ``w_j = s_j (1 - y_j . x)``
    (``s_j y_j . x`` on the way gives CG's true residual, ``_cg_exit``).
    -> (x, iters, true residual [nb, R], floor [nb, R], w [nb, R, n], Cholesky factor or None)"""
    s, k1, m, lam_t, mu, ekc2 = tile.s, tile.k1, tile.m, tile.lam, tile.mu, tile.ekc2
    chol = None
    if tile.few and cfg.solver == "direct":  # keep the factor for the few-row estimate (``_sensitivity``)
        x, res, chol = direct_solve(s, k1, m, lam_t, mu, tol=cfg.tol, factor=True)
        it, fl = 0, _floor(torch.finfo(s.dtype).eps, x, mu, lam_t, ekc2, m)
    else:
        x, it, res, fl = _solve(cfg, s, k1, m, lam_t, mu, tile.diag, scratch, cfg.tol, ekc2, work=work,
                                smax=tile.smax)
    w = _centred(x, k1, s, scratch.get("k", s.shape), tile.ssum, tile.few).mul_(s)
    if res is None:
        x, it, res, fl, redone = _cg_exit(cfg, s, k1, m, lam_t, mu, tile.diag, scratch, cfg.tol, ekc2, x, it, w,
                                          work=work)
        if redone:
            w = _centred(x, k1, s, scratch.get("k", s.shape), tile.ssum, tile.few).mul_(s)
    w.neg_().add_(s)
    return x, it, res, fl, w, chol


def _tile_output(tile: _TileMoments, w, Vt, x, res, chol):
    """The tile's output ``o = w @ V`` [nb, R, Dv], its relative error scale ``rel`` [nb, R] (``E_s |v|``
    over the output's norm) and, after a few-row direct solve, the sensitivity estimate (else None)."""
    cdt = w.dtype
    D = x.shape[-1]
    o = torch.matmul(w, Vt)  # [nb, R, Dv]
    ev = (tile.s @ Vt.norm(dim=-1, keepdim=True)).squeeze(-1)  # E_s |v|: the scale of the error bounds
    on = o.norm(dim=-1)
    rel = ev / torch.maximum(on, on.mean(-1, keepdim=True)).clamp_min(torch.finfo(cdt).tiny)
    sens = None
    if chol is not None:
        sens = _sensitivity(tile.s, tile.k1, Vt, tile.m, chol, tile.mu, res, tile.mom[..., 2 * D + 1], tile.qc, ev)
    return o, rel, sens


def _tile_rescue(cfg, tile: _TileMoments, o, x, res, fl, sees_bad, where):
    """Rows the working precision cannot solve (``_hopeless_rows``, or a non-finite output), and only
    those, recomputed in float64 from the keys they see (``_tile_fp64``); the others stay bit for bit.
    Rows that see a non-finite key stay poisoned.  ``where``: ``(Q, K, V, L, c, i0, i1, j0, j1, mask,
    common, G)`` of the tile.  -> (o, x, m, res, fl, hopeless [nb, R] or None when no row was)"""
    cdt = o.dtype
    m = tile.m
    hopeless = _hopeless_rows(cfg.solver, res, fl) | ~torch.isfinite(o).all(-1)  # [nb, R]
    if sees_bad is not None:
        hopeless &= sees_bad.squeeze(-1) == 0
    if not bool(hopeless.any()):
        return o, x, m, res, fl, None
    o64, x64, m64, _lse64, res64 = _tile_fp64(*where, cfg.scale, cfg.tol)
    h = hopeless.unsqueeze(-1)
    o, x, m = (torch.where(h, a.to(cdt), b) for a, b in ((o64, o), (x64, x), (m64, m)))
    res, fl = torch.where(hopeless, res64.to(cdt), res), fl.masked_fill(hopeless, 0.0)
    return o, x, m, res, fl, hopeless


def _forward_stats(iters, acc, amp, work, Q):
    """``lla_forward``'s ``stats [8]`` on the CPU (see its docstring)."""
    cdt = Q.dtype
    if acc is None:
        z = Q.new_zeros(())
        acc = (z, z, z, z)
    return torch.stack([torch.tensor(float(iters), dtype=cdt), acc[0].cpu(), amp.cpu(), acc[1].cpu(), acc[2].cpu(),
                        *(torch.tensor(float(w), dtype=cdt) for w in (work.fallback, work.lowp, work.fp32))])


def _centred(p, kc, s, out, ssum=None, pivot: bool = False):
    """``y_j . p`` for every key of a tile (``kc = k - c`` [nb, n, D], p [nb, R, D] -> out [nb, R, n]),
    centred with the weighted mean of the *computed* ``(k_j - c) . p``, so that ``sum_j s_j y_j . p``
    is zero to rounding of that sum: a row whose weight sits on one key gets ``y . p = 0`` for it
    exactly, however large ``|p| |k - c|`` (the rounding of each product cancels with itself).
    ``ssum [nb, R]`` (optional): the weights' computed sum, the mean's denominator (else 1): with it
    ``sum_j s_j (1 - y_j . p) = sum_j s_j`` exactly, not off by ``(sum_j s_j - 1) m . p``.
    ``pivot``: the products are first taken relative to the row's pivot key (its largest weight),
    ``(k_j - c) . p - (k_piv - c) . p``, so that a nearly one-hot row's mean (``s_piv`` near 1, not 1)
    no longer carries the rounding ``eps |k_piv - c| |p|`` of the pivot's own product into every
    weight: it is exactly 0 there (float32, D = 4, ridge 1e-3, a key x10: 4.9e-3 -> 4.9e-8 relative
    output error).  Two more passes over ``[nb, R, n]``; the few-row tiles (decode, T = 1) use it."""
    out = torch.matmul(p, kc.transpose(-1, -2), out=out)
    if pivot:
        out.sub_(out.gather(-1, s.argmax(-1, keepdim=True)))
    mean = torch.linalg.vecdot(s, out)
    return out.sub_((mean if ssum is None else mean / ssum).unsqueeze(-1))


def amplification_rows(aw, ekc, ek, ekc2, mn, xn, qcn, qn, smax, lam, D, scale, eps, sens=None):
    """The terms of ``_amplification`` per row, before the ``rel`` factor, from per-row numbers (shared with
    the Triton backend, whose kernels write them): ``|w|_1``, ``E|k - c|``, ``E|k|``, ``E|k - c|^2``,
    ``|m - c|``, ``|x|``, ``|q - c|``, ``|q|``, ``s_max``, ``lam`` (all ``[...]``), the head dim, the logit
    scale, the working precision's ``eps`` and the optional few-row sensitivity.  -> ``[...]``"""
    trc = (ekc2 - mn * mn).clamp_min(0.0)
    # typical (isotropic) case of sqrt(c) / (c + lam) over the covariance's eigenvalues c ~ tr C / D;
    # the worst case min(1 / (2 sqrt(lam)), sqrt(tr C) / lam) over-warned by 10-1000x on the grid
    ci = trc / D
    f = ci.sqrt() / (ci + lam)
    spread = 2.0 * (1.0 - smax).clamp_min(0.0)
    logit = abs(scale) * qn * ek  # |logits| scale: their rounding is eps times this
    # a logit error dl can move weight onto keys within dl of the largest logit (weight ~ (1 - s_max) e^dl):
    # once that is not small, the errors no longer cancel
    dl = (eps * logit).clamp_max(50.0)
    flip = ((1.0 - smax).clamp_min(0.0) * dl.exp() * dl).clamp_max(1.0)
    # rounding of y . x (a D-term dot product per key, errors of either sign summed over the keys with
    # weights s_j): typically sqrt(sum_j s_j^2 / D) <= sqrt(s_max / D) of the worst case E|k - c| |x|
    typ = (smax / D).sqrt()
    a = aw * (1.0 + torch.maximum(spread, flip) * logit) + typ * spread * ekc * xn
    if sens is not None:  # few-row direct tiles: the row's actual sensitivity replaces the isotropic terms
        return FEW_ROWS_FACTOR * (a + sens)
    # the centred matvec's rounding lies along the keys' spread (its components scale with sqrt(c)), so
    # after A^-1 it reaches the output like the rounding of y . x does: E|k - c| |x|
    return a + typ * ekc * xn * (ci / (ci + lam)) + f * (ekc + qcn)


def _amplification(w, x, m, qc, lam, mom, D, scale, q, smax, rel, sens=None, skip=None):
    """Worst row's rounding magnifier (see ``LLAAux.amplification``): w [nb, R, n] the output weights.

    Per row, with ``E`` the softmax mean over its keys, ``c`` the tile's key shift, ``C`` the
    weighted key covariance, ``f = sqrt(c) / (c + lam)`` with ``c = tr C / D`` (how much of an error
    ``e`` in ``A x`` or in ``m - q`` reaches the output, ``sqrt(e^T A^-1 C A^-1 e) ~ f |e|``, for an
    isotropic covariance; the bound over all eigenvalues, ``1 / (2 sqrt(lam))``, over-warns) and
    ``1 - s_max`` (the weight not on the row's largest key; errors common to all keys cancel):
    ``|w|_1 (1 + 2 (1 - s_max) scale |q| E|k|)``  the output sum, and logit rounding moving weights,
    ``2 (1 - s_max) E|k - c| |x| sqrt(s_max / D)``  forming ``y . x`` (typical, not worst-case, rounding),
    ``E|k - c| |x| c / (c + lam) sqrt(s_max / D)`` the centred matvec's rounding (it lies along the
                                                  keys' spread, so ``A^-1`` does not magnify it),
    ``f (E|k - c| + |q - c|)``                    the right-hand side ``m - q``,
    all in units of ``E|v|``, so times ``rel = E|v| / max(|o|, mean_tile |o|)`` to be relative to the output.
    ``sens [nb, R]`` (optional, few-row direct tiles): ``_sensitivity``, which replaces the last two
    (isotropic) terms, and the sum is scaled by ``FEW_ROWS_FACTOR``.  ``skip [nb, R]`` (optional): rows
    recomputed in float64 (``_tile_fp64``), which the working precision's rounding does not reach.
    """
    aw = torch.linalg.vector_norm(w, ord=1, dim=-1)
    a = amplification_rows(aw, mom[..., 2 * D + 1], mom[..., 2 * D + 2], mom[..., D + 1 : 2 * D + 1].sum(-1),
                           m.norm(dim=-1), x.norm(dim=-1), qc.norm(dim=-1), q.norm(dim=-1), smax, lam, D, scale,
                           torch.finfo(w.dtype).eps, sens) * rel
    a = torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a)
    if skip is not None:
        a = a.masked_fill(skip, 0.0)
    return a.max() if a.numel() else a.new_zeros(())


#: Few-row direct tiles (decode, T = 1): the amplification is ``FEW_ROWS_FACTOR`` times the terms of
#: ``_amplification`` that do not assume an isotropic covariance plus ``_sensitivity``.  Calibrated on
#: ``benchmarks/decode_numerics.py`` (600 float32 cases): no silent miss from 0.03 to 1 (false alarms
#: 5 / 5 / 9 / 20 at 0.03 / 0.1 / 0.3 / 1), 2 misses at 0.01, 3 at 0.003.
FEW_ROWS_FACTOR = 0.1


def _sensitivity(s, kc, V, m, chol, b, res, ekc, qc, ev, *, chunk_elems: int = 1 << 22):
    """Per-row first-order sensitivity of the output to the solve's rounding, few-row direct tiles.

    The output is ``o = vbar - M' x`` with ``M' = sum_j s_j v_j (k_j - m)^T`` (``vbar = sum_j s_j v_j``),
    so an error ``e`` in ``A x = b`` moves it by ``M' A^-1 e``: ``G = M' A^-1`` (the slope of the
    row's local linear fit of the values) is the actual magnifier, whatever the covariance's shape
    (the isotropic ``sqrt(c) / (c + lam)``, ``c = tr C / D``, misses it when the weight sits on one key
    or the keys drift).  ``e``: the rounding of the right-hand side ``m - q`` (``eps (E|k - c| + |q - c|)``)
    and the solve's true residual ``res |b|``.  ``G`` from the Cholesky factor the direct solve formed
    (``[D, Dv]`` per row: one ``[D, n] x [n, Dv]`` GEMM per row over key chunks, ``D`` triangular
    solves), bounded by its Frobenius norm.  In units of ``E|v|`` (as ``_amplification``'s terms).
    s [..., R, n], kc [..., n, D], V [..., n, Dv], m, b, qc [..., R, D], res, ekc, ev [..., R] -> [..., R]
    """
    R, n, D, Dv = s.shape[-2], kc.shape[-2], kc.shape[-1], V.shape[-1]
    batch = kc[..., :1, :1].numel()
    step = max(1, chunk_elems // max(1, batch * R * max(D, Dv)))
    N = None  # sum_j s_j (k_j - c) v_j^T  [..., R, D, Dv]
    for j0 in range(0, n, step):
        part = (s[..., j0 : j0 + step, None] * kc[..., None, j0 : j0 + step, :]).transpose(-1, -2) @ V[..., None, j0 : j0 + step, :]
        N = part if N is None else N + part
    N = N - m[..., :, None] * (s @ V)[..., None, :]  # M'^T
    g = torch.linalg.matrix_norm(chol_solve(chol, N))  # |A^-1 M'^T|_F >= |G|_2
    eps = torch.finfo(b.dtype).eps
    e = ekc + qc.norm(dim=-1) + res * b.norm(dim=-1) / eps
    return g * e / ev.clamp_min(torch.finfo(b.dtype).tiny)


def _ridge_grad_aim(tol, lam, m, ekc2, D):
    """Per-row tolerance the float64 adjoint solve iterates to when the ridge gradient is needed.

    ``dlam = -u . x`` carries ``u``'s error, which is up to ``cond(A) ~ (c + lam) / lam`` (``c = tr C / D``)
    times its relative residual: the output does not see it, the ridge gradient (summed over rows, with
    cancellation) does (fp64, ridge 1e-6: 4.1e-3 off at ``tol``, 3.7e-7 with the residual scaled by
    ``lam / (c + lam)``; ``benchmarks/robustness.py``).  The floor stop ends the rows that cannot get there,
    and the check stays against ``tol``.  lam, ekc2 [..., R], m [..., R, D] -> [..., R]"""
    ci = (ekc2 - torch.linalg.vecdot(m, m)).clamp_min(0.0) / D
    return tol * (lam / (ci + lam)).clamp_max(1.0)


def _backward_tile(ins, c, i0, i1, j0, j1, mask, common, G, cfg, scratch, work, need_dlam):
    """One step of the backward (rows ``i0:i1`` of the pairs ``c``, keys ``j0:j1``).

    ``ins = (Qs, Q, K, V, L, dO, X, M, LSE)``, folded (batch, key head) pairs first, in one precision.
    -> (dq [nb, R, D], dlam [nb, R], the key-side factors ``(coef, sc, dl [nb, R, n], x, u, q_t [nb, R, D],
    do_t [nb, R, Dv])`` that ``_accumulate_keys`` adds into dK and dV, CG iterations, the adjoint's true
    residual and floor [nb, R], the largest logit scale of a row with several weights)."""
    Qs, Q, K, V, L, dO, X, M, LSE = ins
    scale, D, Dv = cfg.scale, Q.shape[-1], V.shape[-1]
    t = i1 - i0
    R = G * t
    Vt = V[c, j0:j1]  # [nb, n, Dv]
    nbc, n = Vt.shape[0], Vt.shape[1]
    lse = LSE[c, :, i0:i1].reshape(nbc, R, 1)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    s = scratch.get("s", (nbc, R, n))
    torch.matmul(Qs[c, :, i0:i1].reshape(nbc, R, D), K[c, j0:j1].transpose(-1, -2), out=s)
    _mask_fill_(s, mask)
    s.sub_(lse).exp_()  # [nb, R, n] softmax weights
    k1, _, _ = _shifted_keys(K, c, common, j0, j1, extra=False)
    Kt = k1
    x, m = X[c, :, i0:i1].reshape(nbc, R, D), M[c, :, i0:i1].reshape(nbc, R, D)
    q_t = Q[c, :, i0:i1].reshape(nbc, R, D)
    do_t = dO[c, :, i0:i1].reshape(nbc, R, Dv)
    lam_t = L[c, :, i0:i1].reshape(nbc, R)
    g = scratch.get("g", (nbc, R, n))
    torch.matmul(do_t, Vt.transpose(-1, -2), out=g)  # g_j = do . v_j
    gbar = torch.linalg.vecdot(s, g).unsqueeze(-1)  # [nb, R, 1]
    a = scratch.get("a", (nbc, R, n))
    torch.sub(g, gbar, out=a).mul_(s)  # s_j (g_j - gbar): centred, so one-hot rows give exactly 0
    gx = -(a @ Kt)  # -sum_j s_j g_j y_j = -sum_j s_j (g_j - gbar)(k_j - c)
    # logit scale of each row (scale |q| E_s|k|): rounding of the logits reaches the gradients
    logit = abs(scale) * q_t.norm(dim=-1) * (s @ K[c, j0:j1].norm(dim=-1).unsqueeze(-1)).squeeze(-1)
    # a row whose weight is exactly on one key (the others underflow to 0) has exact logit gradients;
    # otherwise gradients through nearly one-hot weights are tiny and relatively as inexact as the logits
    # (``s_max < 1`` is not the test: weights below eps / 2 leave ``s_max == 1`` but carry the gradient)
    several = ((s > 0).sum(-1) > 1).to(logit.dtype)
    sk2 = s @ (Kt * Kt)
    ekc2 = sk2.sum(-1)
    diag = (sk2 - m * m).clamp_min_(0.0).add_(lam_t.unsqueeze(-1))
    aim = _ridge_grad_aim(cfg.adj_tol, lam_t, m, ekc2, D) if need_dlam and Q.dtype == torch.float64 else None
    u, it, res, fl = _solve(cfg, s, k1, m, lam_t, gx, diag, scratch, cfg.adj_tol, ekc2, aim, work=work)  # adjoint solve
    _centred(u, Kt, s, a)  # y_j . u
    if res is None:  # CG: the true residual from s_j y_j . u
        su = torch.mul(a, s, out=scratch.get("yx", (nbc, R, n)))
        u, it, res, fl, redone = _cg_exit(cfg, s, k1, m, lam_t, gx, diag, scratch, cfg.adj_tol, ekc2, u, it, su, aim,
                                          work=work)
        if redone:
            _centred(u, Kt, s, a)
    gm = gbar * x + u
    a.add_(g)  # g_j + y_j . u
    yx = _centred(x, Kt, s, scratch.get("yx", (nbc, R, n)))  # y_j . x
    P = _centred(gm, Kt, s, scratch.get("P", (nbc, R, n)))  # y_j . gm
    P.add_(g).addcmul_(yx, a, value=-1.0)  # P_j = (1 - y.x) g - (y.u)(y.x) + y.gm
    sP = torch.linalg.vecdot(s, P).unsqueeze(-1)  # [nb, R, 1]
    dl = P.sub_(sP).mul_(s)  # softmax backward
    dq = torch.baddbmm(u, dl, Kt, beta=-1.0, alpha=scale)  # scale * dl @ (K - c) - u  (sum_j dl_j = 0)
    coef = a.neg_().add_(gbar).mul_(s)  # s_j (gbar - g_j - y_j . u)
    sc = yx.neg_().add_(1.0).mul_(s)  # s_j (1 - y_j . x)
    return dq, -(u * x).sum(-1), (coef, sc, dl, x, u, q_t, do_t), it, res, fl, (several * logit).max()


def _accumulate_keys(dK, dV, parts, scale):
    """Add a tile's key-side gradients: dK [nb, n, D] += coef^T x + sc^T u + scale dl^T q,
    dV [nb, n, Dv] += sc^T do (``parts`` from ``_backward_tile``, cast to dK's dtype)."""
    coef, sc, dl, x, u, q_t, do_t = (p.to(dK.dtype) for p in parts)
    dK.baddbmm_(coef.transpose(-1, -2), x).baddbmm_(sc.transpose(-1, -2), u)
    dK.baddbmm_(dl.transpose(-1, -2), q_t, alpha=scale)
    dV.baddbmm_(sc.transpose(-1, -2), do_t)


def _hopeless(solver, res, fl, dq, dlam, parts) -> bool:
    """Whether a working-precision backward tile cannot be used (see ``HOPELESS_RESIDUAL``)."""
    if bool(_hopeless_rows(solver, res, fl).any()):
        return True
    sums = torch.stack([dq.sum(), dlam.sum(), parts[0].sum(), parts[1].sum(), parts[2].sum()])
    return not bool(torch.isfinite(sums).all())


def _backward_tile_fp64(ins, c, i0, i1, j0, j1, mask, common, G, cfg, need_dlam):
    """``_backward_tile`` in float64 for a tile whose working-precision pass is hopeless: the tile's
    forward state (x, m, lse) recomputed in float64 first (``_tile_fp64``), the adjoint solved directly."""
    Qs, Q, K, V, L, dO, X, M, LSE = ins
    _o, x64, m64, lse64, _ = _tile_fp64(Q, K, V, L, c, i0, i1, j0, j1, mask, common, G, cfg.scale, cfg.tol)
    nb, D = x64.shape[0], x64.shape[-1]
    X64, M64, LSE64 = X[c].double(), M[c].double(), LSE[c].double()
    X64[:, :, i0:i1] = x64.view(nb, G, -1, D)
    M64[:, :, i0:i1] = m64.view(nb, G, -1, D)
    LSE64[:, :, i0:i1] = lse64.view(nb, G, -1)
    Q64 = Q[c].double()
    ins64 = (Q64 * cfg.scale, Q64, K[c].double(), V[c].double(), L[c].double(), dO[c].double(), X64, M64, LSE64)
    cfg64 = copy.copy(cfg)
    cfg64.solver = "direct"
    return _backward_tile(ins64, slice(None), i0, i1, j0, j1, mask, common, G, cfg64, _Scratch(Q64), Work(), need_dlam)


def lla_backward(do, q, k, v, lam, X, M, LSE, cfg, need_dlam: bool = True, report=None):
    """Backward pass from the forward's saved state -> ``(dq, dk, dv, dlam [B, T, H] or None)``.

    The forward's steps (``_blocks``, the same tiles and key shifts), the ``[nb, R, n]`` intermediates
    in reused buffers and updated in place; the adjoint solve as in the forward, to ``cfg.adj_tol``.
    ``report`` (optional list) receives ``(worst true residual, residual and floor of the row
    furthest past its tolerance, CG iterations)`` of the adjoint solves, as host floats.
    """
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    Q, K, V, L, bad = _prepare(q, k, v, lam)
    scratch = _Scratch(Q)
    scale = cfg.scale
    Qs = Q * scale
    dO = do.to(Q.dtype).permute(0, 2, 1, 3).reshape(B, Hk, G, T, Dv)
    dQ, dK, dV, dL = (t.new_zeros(t.shape) for t in (Q, K, V, L))  # contiguous (Q, V, L are views)
    N = B * Hk  # (batch, key head) pairs folded, ``nb`` at a time, as in the forward
    Qs, Q, K, V, L, dO = (t.reshape(N, *t.shape[2:]) for t in (Qs, Q, K, V, L, dO))
    dQ, dK, dV, dL = (t.view(N, *t.shape[2:]) for t in (dQ, dK, dV, dL))
    X, M, LSE = (t.reshape(N, *t.shape[2:]) for t in (X, M, LSE))
    iters, acc, amp_b, work = 0, None, Q.new_zeros(()), Work()
    ins = (Qs, Q, K, V, L, dO, X, M, LSE)
    for c, i0, i1, j0, j1, mask, common in _blocks(T, S, cfg.window, G, N, Q.device, D, cfg.solver):
        t = i1 - i0
        marked = Q.dtype != torch.float64 and bool(torch.isnan(LSE[c, :, i0:i1]).any())  # rows the forward redid
        if not marked:
            dq, dl, parts, it, res, fl, logit = _backward_tile(ins, c, i0, i1, j0, j1, mask, common, G, cfg, scratch,
                                                               work, need_dlam)
        if marked or (Q.dtype != torch.float64 and bad is None and _hopeless(cfg.solver, res, fl, dq, dl, parts)):
            # the working precision cannot represent this tile's systems: redo it in float64
            dq, dl, parts, it, res, fl, logit = _backward_tile_fp64(ins, c, i0, i1, j0, j1, mask, common, G, cfg,
                                                                    need_dlam)
            res, fl, logit = res.to(Q.dtype), fl.to(Q.dtype), Q.new_zeros(())  # no logit rounding left
        iters = max(iters, it)
        acc = _merge(acc, _solve_stats(res, fl, cfg.adj_tol))
        amp_b = torch.maximum(amp_b, logit)
        dQ[c, :, i0:i1] = dq.view(-1, G, t, D)
        _accumulate_keys(dK[c, j0:j1], dV[c, j0:j1], parts, scale)
        dL[c, :, i0:i1] = dl.view(-1, G, t)
    if WORK_LOG is not None:
        WORK_LOG.append(("bwd", work))
    if report is not None and acc is not None:
        canc = 0.0
        if need_dlam:  # dlam's cancellation in the sums autograd makes of it (over lam's broadcast dims):
            # rounding errors of the terms add up like sqrt(sum t^2), the sum is |sum t|
            dLs = dL.view(B, Hk, G, T).permute(0, 3, 1, 2).reshape(B, T, H)
            dims = [d for d in range(3) if lam.stride(d) == 0 and lam.shape[d] > 1]
            num = float(dLs.norm())
            den = float((dLs.sum(dims) if dims else dLs).norm())
            canc = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
        report.append((float(acc[0]), float(acc[1]), float(acc[2]), iters, float(amp_b), canc, work))
    dQ, dK, dV, dL = (t.view(B, Hk, *t.shape[1:]) for t in (dQ, dK, dV, dL))
    dq = dQ.reshape(B, H, T, D).permute(0, 2, 1, 3).to(q.dtype)
    dk = dK.permute(0, 2, 1, 3).to(k.dtype)
    dv = dV.permute(0, 2, 1, 3).to(v.dtype)
    dlam = dL.reshape(B, H, T).permute(0, 2, 1).to(lam.dtype) if need_dlam else None
    return dq, dk, dv, dlam


class LLATorchFunction(torch.autograd.Function):
    """Autograd wrapper: ``(q, k, v, lam[B, T, H], cfg) -> (o, lse, stats)``; stats as in ``lla_forward``.

    The backward checks its adjoint solves (``diagnostics.check_solve(stage="backward")``)."""

    @staticmethod
    def forward(ctx, q, k, v, lam, cfg):
        o, lse, stats, X, M, LSE = lla_forward(q, k, v, lam, cfg)
        ctx.save_for_backward(q, k, v, lam, X, M, LSE)
        ctx.cfg = cfg
        ctx.amp = stats[2]
        ctx.mark_non_differentiable(lse, stats)
        return o, lse, stats

    @staticmethod
    def backward(ctx, do, _dlse, _dstats):
        q, k, v, lam, X, M, LSE = ctx.saved_tensors
        report = []
        dq, dk, dv, dlam = lla_backward(do, q, k, v, lam, X, M, LSE, ctx.cfg, ctx.needs_input_grad[3], report=report)
        if report:
            _worst, res, floor, iters, logit, canc, _work = report[0]
            check_solve(stage="backward", solver=ctx.cfg.solver, residual=res, tol=ctx.cfg.adj_tol, iters=iters,
                        ridge_min=float(lam.detach().min()) if lam.numel() else float("nan"), floor=floor)
            # gradients through nearly one-hot weights are relatively as inexact as the logits
            check_conditioning(BACKWARD_LOGIT_FACTOR * logit, q.dtype, op="local_linear_attention (backward)")
            # the ridge gradient -u.x, summed by autograd over lam's broadcast dims, is relatively as inexact
            # as the output (the forward's estimate) times the sums' cancellation ||u.x|| / ||sum u.x||
            if canc > 0:
                check_conditioning(float(ctx.amp) * canc, q.dtype, op="local_linear_attention (ridge gradient)")
        return dq, dk, dv, dlam, None


def lla_torch(q, k, v, ridge, varlen: Varlen | None, config: LLAConfig) -> tuple[torch.Tensor, BackendResult]:
    """PyTorch backend entry: ``q [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]``, ``ridge [B, T, H]``
    (differentiable) -> ``(o [B, T, H, Dv], BackendResult)`` with ``lse``, ``iters``, ``residual``, the
    worst row for ``diagnostics.check_solve``, ``amplification`` and ``precision``.

    Packed sequences (``varlen``, ``B == 1``) run one after the other, each bottom-right aligned on its
    own keys, so nothing crosses a boundary.  An empty query sequence contributes nothing; queries of a
    sequence without keys output zeros.
    """
    T, S = q.shape[1], k.shape[1]
    all_segs = segments(varlen, T, S)  # one host read of the offsets
    segs = with_queries(all_segs)
    precision = resolve_precision(config.precision, q.dtype, q.device, longest_keys(all_segs))  # once per call
    cfg = _Cfg(config.scale, tuple(config.window), config.solver, config.max_iters, config.tol, config.precondition,
               precision=precision)
    outs, lses, iters, resid, amp, chk, ran = [], [], 0, 0.0, 0.0, (0.0, 0.0), [0.0, 0.0, 0.0]
    for sq, sk in segs:
        whole = varlen is None
        o, lse, stats = LLATorchFunction.apply(q if whole else q[:, sq], k if whole else k[:, sk],
                                               v if whole else v[:, sk], ridge if whole else ridge[:, sq], cfg)
        it, r, amp_seq, r_chk, f_chk, *more = stats.tolist()
        ran = [a + b for a, b in zip(ran, more)]
        amp = max(amp, amp_seq)
        outs.append(o)
        lses.append(lse)
        iters = max(iters, int(it))
        resid = r if (math.isnan(r) or math.isnan(resid)) else max(resid, r)
        if _excess(r_chk, f_chk, config.tol) > _excess(*chk, config.tol):
            chk = (r_chk, f_chk)
    if len(outs) == 1:
        o, lse = outs[0], lses[0]
    elif not outs:  # every packed query sequence is empty
        o, lse = q.new_zeros(*q.shape[:3], v.shape[3]), q.new_zeros(q.shape[:3], dtype=torch.float32)
    else:
        o, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)
    return o, BackendResult(lse=lse, iters=iters, residual=resid, worst_residual=chk[0], worst_floor=chk[1],
                            amplification=amp, precision=_ran(precision, q, config.solver, ran))


def _ran(precision, q, solver, counts):
    """What the forward solve ran, for ``LLAAux.precision``: ``"fp64"``, ``"fp32"``, ``"mixed"`` or
    ``"mixed+fp32 (N rows)"`` when N rows stalled in bf16 and were finished in fp32."""
    p = resolve_precision(precision, q.dtype, q.device) if solver == "cg" else ("fp64" if q.dtype == torch.float64 else "fp32")
    fallback = int(counts[0])
    return f"mixed+fp32 ({fallback} rows)" if p == "mixed" and fallback else p


def _excess(res, floor, tol):
    return float("inf") if math.isnan(res) else res / max(tol, floor)
