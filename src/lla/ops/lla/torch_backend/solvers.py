"""The two solvers for the per-row system ``A x = b`` of the PyTorch backend.

``A_i = sum_j s_ij (k_j - m_i)(k_j - m_i)^T + lam_i I`` is the ridge-regularised, softmax-weighted
key covariance of row ``i`` (see ``function.py`` for why we solve with it rather than ``Sigma``).
Both solvers take a tile of rows at once: every tensor below is ``[..., R, *]`` with ``R`` rows
sharing the ``n`` keys and the weights ``s [..., R, n]``.

Keys come as ``kc [..., n, D] = k_j - c``: shifted by a vector ``c`` that the caller computed from
keys every row of the tile can see (``m [..., R, D]`` is the weighted mean in the same frame).  The
covariance matvec is *centred per row* (``cov_matvec``): rounding then scales with
``|y_j| |k_j - c|`` instead of ``|k_j - c|^2`` (the uncentred ``E[kk^T] - m m^T``), which is what
keeps a far-away key, or keys far from ``c``, from swamping the ridge.

Every solver returns the *true* relative residual ``||b - A x|| / ||b||`` of each row at exit,
measured with one more matvec (not the CG recurrence, which drifts from it in floating point).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["cov_matvec", "cov_diag", "pcg_compact", "pcg_mixed", "lowp_keys", "Work", "cov_matrix",
           "direct_solve", "chol_solve", "true_residual"]

#: Compact the rows still iterating once at most this fraction of the current rows is active.
COMPACT_FRACTION = 0.75

#: The same for low-precision matvecs (``pcg_mixed``'s inner solves): bf16 GEMMs lose much more of
#: their speed on short row blocks than fp32 ones (16 rows: ~50 vs ~75 GFLOP/s, 256: ~400 vs ~90).
LOWP_COMPACT_FRACTION = 0.5


def cov_matvec(s, kc, m, lam, p, kp=None):
    """``A p = sum_j s_j (y_j . p) y_j + lam p`` (``y_j = k_j - m``), centred per row; two GEMMs.

    ``y_j . p = (k_j - c) . p - m . p`` (the row constant folded into the first GEMM), then
    ``sum_j s_j (y_j.p)(k_j - c) - (sum_j s_j (y_j.p)) m``: the second term is zero in exact arithmetic
    and cancels the rounding of ``y_j . p`` that the first carries (so a row whose weight sits on one
    key gets exactly ``lam p``).
    s [..., R, n], kc [..., n, D] (``k - c``), m [..., R, D], lam [..., R], p [..., R, D] -> [..., R, D].
    ``kp`` (optional) is a ``[..., R, n]`` buffer for the intermediate.
    """
    if isinstance(kc, tuple):  # low-precision keys (``lowp_keys``)
        return _cov_matvec_lowp(s, kc, m, lam, p, kp)
    mp = -torch.linalg.vecdot(m, p).unsqueeze(-1)
    if kp is None:
        kp = torch.baddbmm(mp, p, kc.transpose(-1, -2)) if p.dim() == 3 else p @ kc.transpose(-1, -2) + mp
    else:
        torch.baddbmm(mp, p, kc.transpose(-1, -2), out=kp) if p.dim() == 3 else torch.add(p @ kc.transpose(-1, -2), mp, out=kp)
    kp.mul_(s)
    ap = kp @ kc
    return ap.addcmul_(kp.sum(-1, keepdim=True), m, value=-1.0).addcmul_(p, lam.unsqueeze(-1))


def lowp_keys(kc, dtype=torch.bfloat16, out=None):
    """The keys of ``_cov_matvec_lowp``: ``k - c`` in ``dtype`` twice, ``[..., n, D]`` and its transpose
    ``[..., D, n]``, both contiguous (a bf16 GEMM against a transposed view, or with an odd inner size
    such as ``D + 1``, runs at 55-70 % of the contiguous ``D``-wide one on an AMX CPU).  ``out``
    (optional): such a pair to fill.  -> (keys, keys transposed)"""
    if out is None:
        out = (kc.new_empty(kc.shape, dtype=dtype), kc.new_empty((*kc.shape[:-2], kc.shape[-1], kc.shape[-2]), dtype=dtype))
    k_lo, kt_lo = out
    k_lo.copy_(kc)
    kt_lo.copy_(k_lo.transpose(-1, -2))
    return k_lo, kt_lo


def _cov_matvec_lowp(s, keys, m, lam, p, kp=None):
    """``cov_matvec`` with the weights ``s`` and the keys ``keys = (k - c, (k - c)^T)`` (``lowp_keys``) in a
    low precision (bf16): both GEMMs in that dtype (fp32 accumulation, outputs rounded to it), the vectors
    ``p``, ``m`` and the result in ``p``'s dtype.  Uncentred: ``sum_j s_j ((k_j - c) . p)(k_j - c) -
    (m . p) m`` (the centring term needs no pass: ``sum_j s_j (k_j - c) = m``, held in ``p``'s dtype), so the
    rounding scales with ``|k - c|`` rather than ``|y|`` (the routing estimate of ``pcg_mixed`` uses
    ``E|k - c|^2``).  Relative accuracy ~2^-8: for the inner solves of ``pcg_mixed`` only.  ``kp``
    (optional) is a ``[..., R, n]`` buffer of the keys' dtype.  Batched GEMMs go through ``bmm``
    (``matmul`` with ``out=`` takes a slower bf16 path on the CPU)."""
    k_lo, kt_lo = keys
    pa = p.to(k_lo.dtype)
    mm = torch.bmm if pa.dim() == 3 else torch.mm
    if kp is None:
        kp = mm(pa, kt_lo)
    else:
        mm(pa, kt_lo, out=kp)
    kp.mul_(s)
    ap = mm(kp, k_lo).to(p.dtype)  # sum_j s_j ((k_j - c) . p)(k_j - c)
    return ap.addcmul_(m, torch.linalg.vecdot(m, p).unsqueeze(-1), value=-1.0).addcmul_(p, lam.unsqueeze(-1))


def true_residual(s, kc, m, lam, x, b, kp=None):
    """Per-row true relative residual ``||b - A x|| / ||b||`` (0 where ``b == 0``): [..., R]."""
    r = b - cov_matvec(s, kc, m, lam, x, kp)
    bnorm = b.norm(dim=-1)
    return r.norm(dim=-1) / bnorm.where(bnorm > 0, torch.ones_like(bnorm))


def cov_diag(s, kc, m, lam):
    """Jacobi preconditioner ``diag(A) = sum_j s_j (k_j - c)^2 - (m)^2 + lam`` (``kc = k - c``, ``m``
    in the same frame), clamped at ``lam`` (its exact lower bound): [..., R, D]."""
    return (s @ (kc * kc) - m * m).clamp_min_(0.0) + lam[..., None]


def _take_rows(t, sel):
    """Rows ``sel [..., c]`` of ``t [..., R, *]`` (or of ``t [..., R]``) -> ``[..., c, *]``."""
    if t.dim() == sel.dim():
        return t.gather(-1, sel)
    return t.gather(-2, sel[..., None].expand(*sel.shape, t.shape[-1]))


def _take_weight_rows(s, order, scratch, slots):
    """Rows ``order [..., c]`` of a weight tile ``s [..., R, n]``; with ``scratch``, gathered into whichever of
    the two buffers ``slots`` does not hold ``s`` (ping-pong: the source of a gather is never its destination)."""
    if scratch is None:
        return _take_rows(s, order)
    slot = slots[1] if s.data_ptr() == scratch.get(slots[0], (1,), s.dtype).data_ptr() else slots[0]
    return torch.gather(s, -2, order[..., None].expand(*order.shape, s.shape[-1]),
                        out=scratch.get(slot, (*order.shape, s.shape[-1]), s.dtype))


def _gather_weights(s, idx, scratch):
    """Rows ``idx [..., c]`` of the working-precision weights ``s [..., R, n]`` (into the ``sw`` scratch slot)."""
    if scratch is None:
        return _take_rows(s, idx)
    return torch.gather(s, -2, idx[..., None].expand(*idx.shape, s.shape[-1]),
                        out=scratch.get("sw", (*idx.shape, s.shape[-1])))


def _n_rows(mask):
    """The largest count of True rows of ``mask [..., R]`` over the batch dims (0 when empty)."""
    return int(mask.sum(-1).max()) if mask.numel() else 0


def _unit_rhs(solve):
    """Run a CG ``solve`` on each row's right-hand side scaled by a power of two to ``max |b_i| ~ 1``
    and scale ``x`` back.  CG's dot products square magnitudes: in float32 a row whose ``|b|`` is below
    ~1e-19 (an adjoint right-hand side through nearly one-hot weights, under the flush-to-zero training
    sets) had ``r . z`` underflow to 0 and never moved (true residual 1, a warning in the state
    experiment's training).  Powers of two are exact, so every other row's iterates are unchanged."""

    @functools.wraps(solve)
    def run(s, kc, m, lam, b, diag, *args, x0=None, **kw):
        bmax = b.abs().amax(-1, keepdim=True)  # no squares: cannot underflow
        _, e = torch.frexp(torch.where(bmax > 0, bmax, torch.ones_like(bmax)))
        sc = torch.ldexp(torch.ones_like(bmax), e)  # [..., R, 1]
        if x0 is not None:
            kw["x0"] = x0 / sc
        x, it, res = solve(s, kc, m, lam, b / sc, diag, *args, **kw)
        return x * sc, it, res

    return run


@dataclass(eq=False)
class _CGRows:
    """The per-row state of a tile's CG (``pcg_compact``, ``pcg_mixed``) over its *working rows*.

    The working rows start as all ``R`` rows of the tile, in order (``idx`` None); ``_compact`` gathers them
    down to the rows still iterating.  Every field named in ``_ROW_FIELDS`` is ``[..., Ra, *]`` over the
    working rows, ``idx [..., Ra]`` their rows in the tile; the ``*_out`` fields are ``[..., R, *]`` and
    receive a row's results when it leaves the working rows (``_store``).  ``pcg_mixed``'s fields are
    None in ``pcg_compact``."""

    x: torch.Tensor  # iterate [..., Ra, D]
    r: torch.Tensor  # residual: the recurrence's (``pcg_mixed`` replaces it by the true one now and then)
    s: torch.Tensor  # weights [..., Ra, n] the matvecs run with (``pcg_mixed``: its low-precision copy)
    m: torch.Tensor  # weighted key mean [..., Ra, D] (see ``cov_matvec``)
    lam: torch.Tensor  # ridge [..., Ra]
    bnorm: torch.Tensor  # ||b|| [..., Ra]
    target: torch.Tensor  # tol ||b|| [..., Ra] (``squared``: its square, compared with r . r)
    coef: torch.Tensor | None  # floor coefficient [..., Ra] (``floor_coef``) or None
    inv_diag: torch.Tensor | None  # Jacobi preconditioner 1 / diag(A) [..., Ra, D] or None
    kp: torch.Tensor | None  # [..., Ra, n] buffer of the matvec's intermediate (with ``scratch``)
    x_out: torch.Tensor  # [..., R, D] the rows' iterates once they left the working rows
    tiny: float
    eps: float
    squared: bool  # ``limit`` in squared norms (``pcg_compact``) or norms (``pcg_mixed``)
    p: torch.Tensor | None = None  # search direction [..., Ra, D]
    rz: torch.Tensor | None = None  # r . z, z = M^-1 r [..., Ra]
    live: torch.Tensor | None = None  # bool [..., Ra]: iterating
    idx: torch.Tensor | None = None  # [..., Ra] tile row of each working row (None: all rows, in order)
    # pcg_mixed only
    b: torch.Tensor | None = None  # right-hand side [..., Ra, D] (for the true residuals)
    pend: torch.Tensor | None = None  # bool: recurrence residual at its limit, frozen until the next replacement
    rt: torch.Tensor | None = None  # true residual norm at the row's last replacement [..., Ra]
    stalled: torch.Tensor | None = None  # bool: left for plain CG in the working precision
    gap: torch.Tensor | None = None  # [...] per system group: iterations since its last replacement
    rn_out: torch.Tensor | None = None  # [..., R] ``rt`` of the rows that left
    stalled_out: torch.Tensor | None = None  # [..., R] ``stalled`` of the rows that left

    @classmethod
    def start(cls, x, r, s, m, lam, bnorm, diag, target, coef, kp, *, squared, **mixed):
        """The state of a CG from ``x`` with residual ``r``: its first direction ``z = M^-1 r``."""
        fi = torch.finfo(r.dtype)
        st = cls(x=x, r=r, s=s, m=m, lam=lam, bnorm=bnorm, target=target, coef=coef,
                 inv_diag=None if diag is None else 1.0 / diag, kp=kp, x_out=x.clone(), tiny=fi.tiny, eps=fi.eps,
                 squared=squared, **mixed)
        z = st.precond(r)
        st.p = z.clone()
        st.rz = torch.linalg.vecdot(r, z)
        return st

    def precond(self, r):
        return r if self.inv_diag is None else r * self.inv_diag

    def limit(self):
        """Where a row's residual stops it: ``target``, or its rounding floor ``eps (coef |x| + |b|)`` where
        that is larger (squared with ``squared``)."""
        if self.coef is None:
            return self.target
        floor = self.eps * (self.coef * self.x.norm(dim=-1) + self.bnorm)
        return torch.maximum(self.target, floor ** 2 if self.squared else floor)


#: The ``_CGRows`` fields over the working rows (gathered by ``_compact``; None ones skipped).
_ROW_FIELDS = ("x", "r", "p", "rz", "live", "pend", "rt", "stalled", "m", "lam", "target", "bnorm", "b", "coef",
               "inv_diag")


def _store(st, idx):
    """Write the working rows' results into the ``*_out`` fields at their tile rows ``idx``."""
    st.x_out.scatter_(-2, idx[..., None].expand_as(st.x), st.x)
    if st.rn_out is not None:
        st.rn_out.scatter_(-1, idx, st.rt)
        st.stalled_out.scatter_(-1, idx, st.stalled)


def _gather_out(st):
    """At exit: the ``*_out`` fields hold every row's results (the working tensors themselves while no
    compaction happened)."""
    if st.idx is None:
        st.x_out, st.rn_out, st.stalled_out = st.x, st.rt, st.stalled
    else:
        _store(st, st.idx)


def _compact(st, keep, n_keep, scratch, slots):
    """Compaction: store the working rows' results, then keep the ``n_keep`` first rows of a stable
    ``keep``-first order (``keep [..., Ra]``), so that the rows dropped stop costing key passes.  The
    weights go through the scratch buffers ``slots`` (``_take_weight_rows``)."""
    R = st.x_out.shape[-2]
    full_idx = st.idx if st.idx is not None else torch.arange(R, device=st.x.device).expand(keep.shape)
    _store(st, full_idx)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :n_keep]  # [..., c]
    st.idx = full_idx.gather(-1, order)
    for name in _ROW_FIELDS:
        t = getattr(st, name)
        if t is not None:
            setattr(st, name, _take_rows(t, order))
    st.s = _take_weight_rows(st.s, order, scratch, slots)
    if scratch is not None:
        st.kp = scratch.get("kp", st.s.shape, st.s.dtype)


def _next_direction(st, restart=None):
    """CG's next search direction ``p = z + beta p`` (``z = M^-1 r``); rows ``restart`` take ``z``."""
    z = st.precond(st.r)
    rz_new = torch.linalg.vecdot(st.r, z)
    beta = (rz_new / st.rz.clamp_min(st.tiny)).unsqueeze(-1)
    p = st.p.mul_(beta).add_(z)
    st.p = p if restart is None else torch.where(restart.unsqueeze(-1), z, p)
    st.rz = rz_new


def _cg_iteration(st, kc, work):
    """One iteration of ``pcg_compact`` on the working rows (rows no longer ``live`` take no step)."""
    ap = cov_matvec(st.s, kc, st.m, st.lam, st.p, st.kp)
    if work is not None:
        work.add(st.s)
    pap = torch.linalg.vecdot(st.p, ap)
    # pap > 0 for p != 0 in exact arithmetic (A is SPD); rounding can break that: no step then
    alpha = (st.rz / pap.clamp_min(st.tiny) * (st.live & (pap > 0))).unsqueeze(-1)
    st.x.addcmul_(alpha, st.p)
    st.r.addcmul_(alpha, ap, value=-1.0)
    _next_direction(st)
    st.live = st.live & (torch.linalg.vecdot(st.r, st.r) > st.limit())


@_unit_rhs
def pcg_compact(s, kc, m, lam, b, diag, *, tol: float, max_iters: int, scratch=None, x0=None, floor_coef=None,
                residual: bool = True, work=None):
    """Jacobi-preconditioned CG on ``A x = b`` for a tile of rows, converged rows dropped as it goes.

    One independent system per row (the rows never mix: a row's iterates depend only on its own
    weights and keys).  A row stops updating once its recurrence residual ``||r|| <= tol * ||b||``;
    once at most ``COMPACT_FRACTION`` of the rows still iterate (the largest count over the batch
    dims), the rows are gathered down to the active ones, so that converged rows stop costing key
    passes.  Rows converge at very different rates (a row seeing few keys is ill-conditioned, a row
    seeing thousands is not), so this is where most of the saving is.

    s [..., R, n], kc [..., n, D] (see the module docstring), m [..., R, D], lam [..., R],
    b [..., R, D], diag [..., R, D] or None (no preconditioner), x0 [..., R, D] or None (start).
    ``scratch`` (optional) has ``get(slot, shape)`` returning reusable buffers for the ``[..., R, n]``
    intermediates.  ``floor_coef [..., R]`` (optional): a row also stops once its recurrence residual
    is below the rounding floor ``eps (floor_coef |x| + |b|)`` (see ``function._floor``), where more
    iterations no longer move the true residual.  ``residual=False`` skips the exit matvec (the
    caller measures the true residual from a pass it makes anyway) and returns None for it.
    ``s`` and ``kc`` may be low-precision (``lowp_keys``): the matvecs then run in that dtype
    (``_cov_matvec_lowp``), everything else in ``b``'s.  ``work`` (optional ``Work``) counts the
    row-key products of the matvecs (rows in the working set times keys, per iteration).
    -> (x [..., R, D], iterations of the slowest row, true relative residual per row [..., R])
    """
    kp_buf = None if scratch is None else scratch.get("kp", s.shape, s.dtype)
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.clone()
        r = b - cov_matvec(s, kc, m, lam, x, kp_buf)
    bnorm = b.norm(dim=-1)  # [..., R]
    st = _CGRows.start(x, r, s, m, lam, bnorm, diag, (tol * bnorm) ** 2, floor_coef, kp_buf, squared=True)
    st.live = torch.linalg.vecdot(r, r) > st.limit()  # [..., Ra]
    it = 0
    while it < max_iters:
        n_live = _n_rows(st.live)
        if n_live == 0:
            break
        if n_live <= (COMPACT_FRACTION if s.dtype == b.dtype else LOWP_COMPACT_FRACTION) * st.live.shape[-1]:
            _compact(st, st.live, n_live, scratch, ("s1", "s2"))
        _cg_iteration(st, kc, work)
        it += 1
    _gather_out(st)
    if not residual:
        return st.x_out, it, None
    kp_buf = None if scratch is None else scratch.get("kp", s.shape, s.dtype)
    return st.x_out, it, true_residual(s, kc, m, lam, st.x_out, b, kp_buf)


#: With at most this many rows, ``cov_matrix`` forms each row's moment by its own GEMM (decode: one row
#: per query head) instead of the weights against the keys' outer products (a GEMV then).
FEW_ROWS = 8


class Work:
    """Row-key products of the solves' matvecs (each costs ``4 D`` flops), by precision, and how many
    rows a mixed solve handed to plain CG (``fallback``)."""

    __slots__ = ("fp32", "lowp", "fallback")

    def __init__(self):
        self.fp32, self.lowp, self.fallback = 0, 0, 0

    def add(self, s):
        n = s.numel()
        if s.dtype in (torch.bfloat16, torch.float16):
            self.lowp += n
        else:
            self.fp32 += n


#: ``pcg_mixed``: a row whose true residual, between two replacements, does not shrink by at least this
#: factor (and stays above its target) has stalled: the low-precision operator is too inexact for the
#: row's conditioning, and the row is finished by plain CG in the working precision.
MIXED_STALL = 0.5

#: ``pcg_mixed``: a residual replacement (the true residual in the working precision) is due once
#: half the active rows' recurrence residuals have dropped by this factor since their last one.
MIXED_REPLACE = 1e-2

#: ``pcg_mixed``: rows whose estimated low-precision contraction exceeds this go to plain CG up front.
MIXED_ROUTE = 0.1

#: ``pcg_mixed``: a tile where fewer rows than this fraction go to bf16 runs plain CG.
MIXED_MIN_SHARE = 0.5

#: ``pcg_mixed``: a row whose true residual did not halve over this many iterations has stalled.
MIXED_STALL_GAP = 6


def _fallback(x, rn, rest, s, kc, m, lam, b, bnorm, diag, *, tol, max_iters, scratch, coef, work):
    """Finish the rows ``rest [..., R]`` with ``pcg_compact`` in the working precision from their ``x``;
    ``x`` and the true residual norms ``rn`` are updated in place where that did better."""
    D = b.shape[-1]
    n_rest = _n_rows(rest)
    if not n_rest:
        return 0
    if work is not None:
        work.fallback += int(rest.sum())
    # a row whose low-precision iterate is not finite restarts from 0 (where its residual is |b|)
    sane = torch.isfinite(x).all(-1) & torch.isfinite(rn)
    x.masked_fill_(~sane.unsqueeze(-1), 0.0)
    torch.where(sane, rn, bnorm, out=rn)
    order = torch.argsort((~rest).to(torch.int8), dim=-1, stable=True)[..., :n_rest]
    on = _take_rows(rest, order)
    b_a = _take_rows(b, order) * on.unsqueeze(-1)
    x0 = _take_rows(x, order) * on.unsqueeze(-1)
    s_a = _gather_weights(s, order, scratch)
    x_a, it2, res_a = pcg_compact(s_a, kc, _take_rows(m, order), _take_rows(lam, order), b_a,
                                  None if diag is None else _take_rows(diag, order), tol=tol, max_iters=max_iters,
                                  scratch=scratch, x0=x0, floor_coef=None if coef is None else _take_rows(coef, order),
                                  residual=True, work=work)
    bn_a = _take_rows(bnorm, order)
    rn_a = res_a * bn_a.where(bn_a > 0, torch.ones_like(bn_a))
    better = on & (rn_a < _take_rows(rn, order))
    sel = order[..., None].expand(*order.shape, D)
    x.scatter_(-2, sel, torch.where(better.unsqueeze(-1), x_a, _take_rows(x, order)))
    rn.scatter_(-1, order, torch.where(better, rn_a, _take_rows(rn, order)))
    return it2


def _bucket(n: int) -> int:
    """``n`` rounded up to ``i 2^(e - 3)``, ``2^(e - 1) < n <= 2^e``: 4 sizes per octave, at least 64."""
    if n <= 64:
        return 64
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


def _mixed_start(s, m, lam, b, bnorm, diag, tol, floor_coef):
    """``pcg_mixed``'s state from ``x = 0``: every row with ``|b|`` above its limit iterates."""
    x = torch.zeros_like(b)
    st = _CGRows.start(x, b.clone(), s, m, lam, bnorm, diag, tol * bnorm, floor_coef, None, squared=False, b=b,
                       rt=bnorm.clone(),  # true residual norm at the last replacement (the start: r = b exactly)
                       rn_out=bnorm.clone(), stalled_out=torch.zeros_like(bnorm, dtype=torch.bool))
    st.live = st.rt > st.limit()  # iterating
    st.pend = torch.zeros_like(st.live)  # recurrence residual at the target, frozen until the next replacement
    st.stalled = torch.zeros_like(st.live)
    return st


def _route(st, ekc2, smax, lowp):
    """Up-front routing: rows the low-precision operator cannot serve (the estimate of ``pcg_mixed``'s
    docstring above ``MIXED_ROUTE``) are marked stalled (finished by plain CG), and so are all the
    rows of a system group where fewer than ``MIXED_MIN_SHARE`` of the rows would iterate in bf16."""
    est = torch.finfo(lowp).eps * ekc2 / st.lam * (1.0 if smax is None else smax.clamp_min(0.0).sqrt())
    st.stalled = st.live & (est > MIXED_ROUTE)
    st.live = st.live & ~st.stalled
    # too few of a (batch, head)'s rows for bf16 (short bf16 GEMMs are slow, and the tile's bf16
    # copy is not free): its rows go to fp32; decided per system group, never across the batch,
    # so that a row's arithmetic does not depend on which other sequences share the step
    few = st.live.sum(-1, keepdim=True) < MIXED_MIN_SHARE * st.live.shape[-1]
    st.stalled = st.stalled | (st.live & few)
    st.live = st.live & ~few


def _lowp_tile(st, kc, scratch, lowp):
    """The low-precision copies of the weights (into ``st.s``) and the keys -> keys (``lowp_keys``'s pair).

    The bf16 GEMMs (oneDNN on the CPU) keep memory per distinct shape: at T = 16384 the tiles' key
    counts (256 of them) times the compacted row counts took the forward's peak RSS from ~310 to
    ~580 MiB.  So the key axis is padded (zero weights, zero keys) to one of 4 sizes per octave
    (<= 25 % more columns) and the compacted row count rounded up to a multiple of 16; every
    [R, n] tensor lives in a reused buffer."""
    s, D = st.s, kc.shape[-1]
    n = s.shape[-1]
    n_pad = _bucket(n)
    shape = (*s.shape[:-1], n_pad)
    s_lo = s.new_empty(shape, dtype=lowp) if scratch is None else scratch.get("lo1", shape, lowp)
    s_lo[..., :n].copy_(s)
    s_lo[..., n:].zero_()
    kshape, tshape = (*kc.shape[:-2], n_pad, D), (*kc.shape[:-2], D, n_pad)
    ka = (kc.new_empty(kshape, dtype=lowp), kc.new_empty(tshape, dtype=lowp)) if scratch is None else \
        (scratch.get("ka", kshape, lowp), scratch.get("kt", tshape, lowp))
    ka[0][..., n:, :].zero_()
    ka[0][..., :n, :].copy_(kc)
    ka[1].copy_(ka[0].transpose(-1, -2))
    st.s = s_lo
    st.kp = None if scratch is None else scratch.get("kp", shape, lowp)
    return ka


def _mixed_iterations(st, s_all, kc, keys, *, max_iters, scratch, work, residual):
    """``pcg_mixed``'s low-precision loop, with its residual replacements -> the iterations run."""
    it = 0
    st.gap = torch.zeros(st.live.shape[:-1], dtype=torch.long, device=st.x.device)
    while it < max_iters:
        busy = st.live | st.pend
        n_busy = _n_rows(busy)
        if n_busy == 0:
            break
        Ra = busy.shape[-1]
        n_keep = min(Ra, -(-n_busy // 16) * 16)  # (a few idle rows ride along: fewer distinct GEMM shapes)
        if n_keep <= LOWP_COMPACT_FRACTION * Ra:
            _compact(st, busy, n_keep, scratch, ("lo1", "lo2"))
        _lowp_iteration(st, keys, work)
        it += 1
        st.gap += 1
        rec, lim, trig, sel, n_live, n_sel = _replacements_due(st)
        if n_live == 0 and not residual:
            break  # the caller checks the pending rows
        if n_sel > 0:
            _replace_residuals(st, s_all, kc, rec, lim, trig, sel, scratch, work)
            continue
        _next_direction(st)
    return it


def _lowp_iteration(st, keys, work):
    """One CG step of ``pcg_mixed`` with the low-precision matvec (the search direction is updated
    after, by ``_replace_residuals`` or ``_next_direction``)."""
    ap = _cov_matvec_lowp(st.s, keys, st.m, st.lam, st.p, st.kp)
    if work is not None:
        work.add(st.s)
    pap = torch.linalg.vecdot(st.p, ap)
    # the bf16 operator is not exactly symmetric positive definite: no step where p.Ap is not a
    # sane positive number (a row stuck that way stalls and is finished in fp32)
    alpha = st.rz / pap.clamp_min(st.tiny)
    alpha = (alpha * (st.live & (pap > 0) & torch.isfinite(alpha))).nan_to_num_(0.0, 0.0, 0.0).unsqueeze(-1)
    st.x.addcmul_(alpha, st.p)
    st.r.addcmul_(alpha, ap, value=-1.0)


def _replacements_due(st):
    """After a low-precision step: rows whose recurrence residual reached their limit leave ``live``
    for ``pend`` (frozen); then which rows get a residual replacement now.
    -> (rec: recurrence residual norms, lim: the rows' limits, trig [...]: the system groups due,
    sel [..., Ra]: the rows due, n_live and n_sel: how many rows iterate and how many are due)"""
    rec = st.r.norm(dim=-1)
    lim = st.limit()
    low = st.live & (rec <= lim)
    st.pend = st.pend | low
    st.live = st.live & ~low
    dropped = st.live & (rec <= MIXED_REPLACE * st.rt)
    # replacements are due per system group (batch dims), so that groups never time each other's
    n_live_g = st.live.sum(-1)
    trig = (n_live_g == 0) | (2 * dropped.sum(-1) >= n_live_g) | (st.gap >= MIXED_STALL_GAP)
    sel = (st.live | st.pend) & trig.unsqueeze(-1)
    n_live, n_sel = torch.stack([n_live_g.sum(), sel.sum()]).tolist()
    return rec, lim, trig, sel, n_live, n_sel


def _stalls(st, rec, lim, sel, rtn):
    """Stall detection at a replacement of the rows ``sel``, from their new true residual norms ``rtn``
    -> (near: within 2x of the limit, stall_now: rows to finish in the working precision)."""
    # the recurrence promised a 4x drop, the true residual did not halve: bf16 is too inexact here
    # (within 2x of the target counts as there, as in ``function._cg_exit``: at the rounding floor
    # the true residual no longer drops)
    near = rtn <= 2.0 * lim
    stall_now = sel & ((rec <= 0.25 * st.rt) | (st.gap >= MIXED_STALL_GAP).unsqueeze(-1)) & (rtn > MIXED_STALL * st.rt)
    stall_now = (stall_now & ~near) | (sel & ~torch.isfinite(rtn))
    return near, stall_now


def _replace_residuals(st, s_all, kc, rec, lim, trig, sel, scratch, work):
    """Reliable update: the rows ``sel`` (of the groups ``trig``) take their true residual, in the working
    precision; the stalled ones stop, the rest of the groups' rows iterate again unless they are near
    their limit; the rows that sat frozen restart from the steepest-descent direction."""
    s_w = s_all if st.idx is None else _gather_weights(s_all, st.idx, scratch)
    r_true = st.b - cov_matvec(s_w, kc, st.m, st.lam, st.x, None if scratch is None else scratch.get("kp", s_w.shape))
    if work is not None:
        work.add(s_w)
    rtn = r_true.norm(dim=-1)
    near, stall_now = _stalls(st, rec, lim, sel, rtn)
    st.gap = torch.where(trig, torch.zeros_like(st.gap), st.gap)
    st.r = torch.where(sel.unsqueeze(-1), r_true, st.r)
    st.rt = torch.where(sel, rtn, st.rt)
    st.stalled = st.stalled | stall_now
    was_pend = st.pend & trig.unsqueeze(-1)
    st.live = torch.where(trig.unsqueeze(-1), sel & ~near & ~stall_now, st.live)
    st.pend = st.pend & ~trig.unsqueeze(-1)
    # rows that sat frozen restart from the steepest-descent direction; the others keep theirs
    _next_direction(st, restart=was_pend)


def _leftover_rows(st, residual):
    """At the end of the low-precision loop: the ``*_out`` fields filled, -> the rows [..., R] plain CG
    must finish: the stalled ones, and those still iterating (with ``residual``: or pending)."""
    short = (st.live | st.pend) if residual else st.live
    _gather_out(st)
    if st.idx is not None:
        short = torch.zeros_like(st.stalled_out).scatter_(-1, st.idx, short)
    return st.stalled_out | short


@_unit_rhs
def pcg_mixed(s, kc, m, lam, b, diag, *, tol: float, max_iters: int, scratch=None, floor_coef=None,
              lowp=torch.bfloat16, work=None, ekc2=None, smax=None, residual: bool = True):
    """Mixed-precision Jacobi-CG on ``A x = b``: low-precision matvecs, working-precision residuals.

    The CG of ``pcg_compact`` (converged rows dropped as it goes) with every matvec's two GEMMs in
    ``lowp`` (bf16 copies of the weights and shifted keys made once, ``_cov_matvec_lowp``: ~3.4x
    faster than fp32 on a 256 x 4096 tile of an AVX512-BF16 CPU) and the vectors in ``b``'s dtype,
    plus *reliable updates* (residual replacement): once half the iterating rows' recurrence residuals
    have dropped by ``MIXED_REPLACE`` since their last replacement, or none iterates (the others'
    recurrence residuals are at their targets: they wait, frozen, for this check), or
    ``MIXED_STALL_GAP`` iterations after the last one, the true residual ``b - A x`` is computed in the working precision (``cov_matvec``,
    centred) and replaces the recurrence residual, keeping the search directions (so the Krylov
    progress is not lost, as it is by restarting: the restarted refinement was measured slower and
    dropped, ``docs/performance.md``).  The bf16 rounding of the
    matvecs then only perturbs the directions; the iterate converges to the working precision's
    accuracy.  A row leaves only on a true residual below ``max(tol, floor)``,
    ``floor = eps (floor_coef |x| + |b|)`` (``function._floor``).  A row whose true residual shrank
    by less than ``MIXED_STALL`` between two replacements (too ill-conditioned for ``lowp``) stops,
    and, with rows the iteration cap left short, is finished by ``pcg_compact`` in the working
    precision from its current ``x`` (up to ``max_iters`` more iterations, held to the same
    ``floor_coef``): the answer is never worse than plain CG's.  So is a row whose true residual did
    not halve over ``MIXED_STALL_GAP`` iterations.  Rows the low-precision operator cannot serve
    are sent to plain CG up front: ``ekc2 [..., R]`` (``E_s |k - c|^2``) and ``smax [..., R]`` (the
    largest weight) give the estimate ``eps_lowp E|k - c|^2 / lam * sqrt(s_max)`` of the matvec's
    relative error seen through ``A^-1`` (the key rounding's error averages over the about
    ``1 / s_max`` keys a row weighs); rows above ``MIXED_ROUTE`` skip the bf16 loop.

    ``residual=False``: once every row still iterating has a recurrence residual at its target, stop
    without the last replacement and return None for the residual (the caller measures the true
    residual from a pass it makes anyway and finishes rows that missed in the working precision,
    ``function._cg_exit``); rows that stalled or were routed to plain CG are still finished here.

    The iteration cap applies to each precision: at most ``max_iters`` low-precision iterations, and
    at most ``max_iters`` working-precision ones for the rows finished by plain CG.

    Shapes as in ``pcg_compact``.  -> (x [..., R, D], iterations (the larger of the low-precision
    loop's and the fallback's), true relative residual per row [..., R] at exit or None)
    """
    bnorm = b.norm(dim=-1)
    st = _mixed_start(s, m, lam, b, bnorm, diag, tol, floor_coef)
    if ekc2 is not None:
        _route(st, ekc2, smax, lowp)
        if not bool(st.live.any()):  # plain CG, as precision="fp32" runs it
            if work is not None:
                work.fallback += int((st.live | st.stalled).sum())
            return pcg_compact(s, kc, m, lam, b, diag, tol=tol, max_iters=max_iters, scratch=scratch,
                               floor_coef=floor_coef, residual=residual,
                               work=work)
    keys = _lowp_tile(st, kc, scratch, lowp)
    it = _mixed_iterations(st, s, kc, keys, max_iters=max_iters, scratch=scratch, work=work, residual=residual)
    # stalled rows, and rows the cap left short (their last true residual is stale): plain CG
    rest = _leftover_rows(st, residual)
    if bool(rest.any()):
        it = max(it, _fallback(st.x_out, st.rn_out, rest, s, kc, m, lam, b, bnorm, diag, tol=tol,
                               max_iters=max_iters, scratch=scratch, coef=floor_coef, work=work))
    if not residual:
        return st.x_out, it, None
    return st.x_out, it, st.rn_out / bnorm.where(bnorm > 0, torch.ones_like(bnorm))


def cov_matrix(s, kc, m, lam, *, chunk_elems: int = 1 << 22):
    """``A`` formed explicitly: ``[..., R, D, D]`` (``kc = k - c`` and ``m`` in the shifted frame; for
    at most ``FEW_ROWS`` rows ``m`` is the weighted mean ``s @ kc / sum(s)``, else ``s @ kc``).

    The second moment ``sum_j s_j (k_j - c)(k_j - c)^T`` is one GEMM of the weights against the keys'
    outer products (upper triangle only, mirrored after), or, for at most ``FEW_ROWS`` rows, one
    ``[D, n] x [n, D]`` GEMM per row of its weighted keys; either streamed over key chunks so that
    no temporary larger than ``chunk_elems`` exists.  Its rounding scales with ``|k_j - c|^2``;
    ``direct_solve`` refines the solution with the centred matvec.
    """
    D = kc.shape[-1]
    n = kc.shape[-2]
    R = s.shape[-2]
    batch = kc[..., :1, :1].numel()
    eye = torch.eye(D, dtype=kc.dtype, device=kc.device)
    mm = m[..., :, None] * m[..., None, :]
    if R <= FEW_ROWS:
        # sum_j s_j (k_j - m)(k_j - m)^T = second moment - (sum_j s_j) m m^T for m the weighted mean over the
        # weights' computed sum (1 only to rounding; the few-row callers divide by it)
        mm = s.sum(-1)[..., None, None] * mm
        step = max(1, chunk_elems // max(1, batch * R * D))
        full = None
        for j0 in range(0, n, step):
            kj = kc[..., None, j0 : j0 + step, :]  # [..., 1, c, D]
            part = (s[..., j0 : j0 + step, None] * kj).transpose(-1, -2) @ kj  # [..., R, D, D]
            full = part if full is None else full + part
        full = 0.5 * (full + full.transpose(-1, -2))  # exactly symmetric
        return full - mm + lam[..., None, None] * eye
    iu = torch.triu_indices(D, D, device=kc.device)  # [2, D(D+1)/2]
    P = iu.shape[1]
    step = max(1, chunk_elems // max(1, batch * P))
    second = None
    for j0 in range(0, n, step):
        kj = kc[..., j0 : j0 + step, :]
        outer = kj[..., iu[0]] * kj[..., iu[1]]  # [..., c, P]
        part = s[..., j0 : j0 + step] @ outer  # [..., R, P]
        second = part if second is None else second + part
    full = second.new_zeros(*second.shape[:-1], D, D)
    full[..., iu[0], iu[1]] = second
    full[..., iu[1], iu[0]] = second
    return full - mm + lam[..., None, None] * eye


def _cholesky(A):
    """Row-wise Cholesky factor; rows whose factorisation fails in the working dtype are factorised
    in float64, with a diagonal jitter as a last resort: ``1e-12 max diag(A)``, times 100 per try
    while a row still fails (a float32 ``A`` formed from huge keys can be indefinite by its rounding,
    ``eps32 * trace(A)``, far above ``1e-12``); the caller's true residual, measured against the
    centred matvec, reports the effect.  -> (L in A's dtype, L64 rows or None, bad)"""
    L, info = torch.linalg.cholesky_ex(A)
    bad = info != 0
    if not bool(bad.any()):
        return L, None, bad
    A64 = A[bad].double()
    L64, info64 = torch.linalg.cholesky_ex(A64)
    jitter = 1e-12 * A64.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-300)
    eye = torch.eye(A.shape[-1], dtype=A64.dtype, device=A.device)
    for _ in range(8):
        if not bool((info64 != 0).any()):
            break
        L64, info64 = torch.linalg.cholesky_ex(A64 + (jitter * (info64 != 0))[:, None, None] * eye)
        jitter = jitter * 100.0
    return L, L64, bad


def _chol_apply(L, L64, bad, b):
    x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    if L64 is not None:
        x[bad] = torch.cholesky_solve(b[bad].double().unsqueeze(-1), L64).squeeze(-1).to(x.dtype)
    return x


def direct_solve(s, kc, m, lam, b, *, tol: float, refine: int = 4, factor: bool = False):
    """Solve ``A x = b`` row-wise: ``A`` formed (``cov_matrix``), Cholesky, then up to ``refine``
    steps of iterative refinement with the centred matvec (the formed ``A`` carries the rounding of
    the shifted second moment; refinement brings ``x`` to the accuracy of the centred ``A``).
    A step is taken only while some row's true residual exceeds ``tol``.

    -> (x [..., R, D], true relative residual per row [..., R]), and with ``factor=True`` also the
    Cholesky factor ``(L, L64, bad)`` of the formed ``A`` (see ``_cholesky``, ``chol_solve``).
    """
    L, L64, bad = _cholesky(cov_matrix(s, kc, m, lam))
    x = _chol_apply(L, L64, bad, b)
    bnorm = b.norm(dim=-1)
    bnorm = bnorm.where(bnorm > 0, torch.ones_like(bnorm))
    r = b - cov_matvec(s, kc, m, lam, x)
    res = r.norm(dim=-1) / bnorm
    for _ in range(refine):
        if not bool((res > tol).any()):
            break
        x_new = x + _chol_apply(L, L64, bad, r)
        r_new = b - cov_matvec(s, kc, m, lam, x_new)
        res_new = r_new.norm(dim=-1) / bnorm
        # keep a refinement step only where it helped (it cannot when A's rounding dominates)
        better = res_new < res
        x = torch.where(better.unsqueeze(-1), x_new, x)
        r = torch.where(better.unsqueeze(-1), r_new, r)
        res = torch.where(better, res_new, res)
    return (x, res, (L, L64, bad)) if factor else (x, res)


def chol_solve(chol, B):
    """``A^-1 B`` for a matrix right-hand side ``B [..., R, D, k]`` from ``direct_solve``'s factor."""
    L, L64, bad = chol
    X = torch.cholesky_solve(B, L)
    if L64 is not None:
        X[bad] = torch.cholesky_solve(B[bad].double(), L64).to(X.dtype)
    return X
