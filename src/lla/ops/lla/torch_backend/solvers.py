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

import torch

__all__ = ["cov_matvec", "cov_diag", "pcg_compact", "cov_matrix", "direct_solve", "chol_solve", "true_residual"]

#: Compact the rows still iterating once at most this fraction of the current rows is active.
COMPACT_FRACTION = 0.75


def cov_matvec(s, kc, m, lam, p, kp=None):
    """``A p = sum_j s_j (y_j . p) y_j + lam p`` (``y_j = k_j - m``), centred per row; two GEMMs.

    ``y_j . p = (k_j - c) . p - m . p`` (the row constant folded into the first GEMM), then
    ``sum_j s_j (y_j.p)(k_j - c) - (sum_j s_j (y_j.p)) m``: the second term is zero in exact arithmetic
    and cancels the rounding of ``y_j . p`` that the first carries (so a row whose weight sits on one
    key gets exactly ``lam p``).
    s [..., R, n], kc [..., n, D] (``k - c``), m [..., R, D], lam [..., R], p [..., R, D] -> [..., R, D].
    ``kp`` (optional) is a ``[..., R, n]`` buffer for the intermediate.
    """
    mp = -torch.linalg.vecdot(m, p).unsqueeze(-1)
    if kp is None:
        kp = torch.baddbmm(mp, p, kc.transpose(-1, -2)) if p.dim() == 3 else p @ kc.transpose(-1, -2) + mp
    else:
        torch.baddbmm(mp, p, kc.transpose(-1, -2), out=kp) if p.dim() == 3 else torch.add(p @ kc.transpose(-1, -2), mp, out=kp)
    kp.mul_(s)
    ap = kp @ kc
    return ap.addcmul_(kp.sum(-1, keepdim=True), m, value=-1.0).addcmul_(p, lam.unsqueeze(-1))


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


def pcg_compact(s, kc, m, lam, b, diag, *, tol: float, max_iters: int, scratch=None, x0=None, floor_coef=None,
                residual: bool = True):
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
    -> (x [..., R, D], iterations of the slowest row, true relative residual per row [..., R])
    """
    R = b.shape[-2]
    s_all, m_all, lam_all = s, m, lam
    kp_buf = None if scratch is None else scratch.get("kp", s.shape)
    bnorm = b.norm(dim=-1)  # [..., R]
    thresh = (tol * bnorm) ** 2
    inv_diag = None if diag is None else 1.0 / diag
    tiny = torch.finfo(b.dtype).tiny
    eps = torch.finfo(b.dtype).eps

    def limit(x):
        if floor_coef is None:
            return thresh
        return torch.maximum(thresh, (eps * (floor_coef * x.norm(dim=-1) + bnorm)) ** 2)

    def precond(r):
        return r if inv_diag is None else r * inv_diag

    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - cov_matvec(s, kc, m, lam, x, kp_buf)
    x_out = x.clone()
    idx = None  # [..., Ra] original row of each working row (None: all rows, in order)
    z = precond(r)
    p = z.clone()
    rz = torch.linalg.vecdot(r, z)
    active = torch.linalg.vecdot(r, r) > limit(x)  # [..., Ra]
    it = 0
    while it < max_iters:
        n_active = int(active.sum(-1).max()) if active.numel() else 0
        if n_active == 0:
            break
        Ra = active.shape[-1]
        if n_active <= COMPACT_FRACTION * Ra:
            # store the working rows, then keep the n_active first rows of a stable active-first order
            full_idx = idx if idx is not None else torch.arange(R, device=b.device).expand(active.shape)
            x_out.scatter_(-2, full_idx[..., None].expand_as(x), x)
            order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[..., :n_active]  # [..., c]
            idx = full_idx.gather(-1, order)
            x, r, p, rz, active = (_take_rows(t, order) for t in (x, r, p, rz, active))
            if scratch is None:
                s = _take_rows(s, order)
            else:  # ping-pong between two buffers: the source of a gather is never its destination
                slot = "s1" if s.data_ptr() != scratch.get("s1", (1,)).data_ptr() else "s2"
                s = torch.gather(s, -2, order[..., None].expand(*order.shape, s.shape[-1]),
                                 out=scratch.get(slot, (*order.shape, s.shape[-1])))
                kp_buf = scratch.get("kp", s.shape)
            m, lam, thresh, bnorm = (_take_rows(t, order) for t in (m, lam, thresh, bnorm))
            if floor_coef is not None:
                floor_coef = _take_rows(floor_coef, order)
            if inv_diag is not None:
                inv_diag = _take_rows(inv_diag, order)
        ap = cov_matvec(s, kc, m, lam, p, kp_buf)
        pap = torch.linalg.vecdot(p, ap)
        # pap > 0 for p != 0 in exact arithmetic (A is SPD); rounding can break that: no step then
        alpha = (rz / pap.clamp_min(tiny) * (active & (pap > 0))).unsqueeze(-1)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        z = precond(r)
        rz_new = torch.linalg.vecdot(r, z)
        beta = (rz_new / rz.clamp_min(tiny)).unsqueeze(-1)
        p = p.mul_(beta).add_(z)
        rz = rz_new
        active = active & (torch.linalg.vecdot(r, r) > limit(x))
        it += 1
    if idx is None:
        x_out = x
    else:
        x_out.scatter_(-2, idx[..., None].expand_as(x), x)
    if not residual:
        return x_out, it, None
    kp_buf = None if scratch is None else scratch.get("kp", s_all.shape)
    return x_out, it, true_residual(s_all, kc, m_all, lam_all, x_out, b, kp_buf)


#: With at most this many rows, ``cov_matrix`` forms each row's moment by its own GEMM (decode: one row
#: per query head) instead of the weights against the keys' outer products (a GEMV then).
FEW_ROWS = 8


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
