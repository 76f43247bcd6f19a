"""The two solvers for the per-row system ``A x = b`` of the PyTorch backend.

``A_i = sum_j s_ij (k_j - m_i)(k_j - m_i)^T + lam_i I`` is the ridge-regularised, softmax-weighted
key covariance of row ``i`` (see ``function.py`` for why we solve with it rather than ``Sigma``).
Both solvers take a tile of rows at once: every tensor below is ``[..., R, *]`` with ``R`` rows
sharing the ``n`` keys ``kc [..., n, D]`` and the weights ``s [..., R, n]``.
"""

from __future__ import annotations

import torch

__all__ = ["cov_matvec", "cov_diag", "tile_preconditioner", "pcg", "pcg_compact", "cov_matrix", "cholesky_solve"]

#: Compact the rows still iterating once at most this fraction of the current rows is active.
COMPACT_FRACTION = 0.75


def cov_matvec(s, kc, m, lam, p):
    """``A p`` matrix-free: ``sum_j s_j (k_j . p) k_j - (m . p) m + lam p``; two key-sized matmuls.

    s [..., R, n], kc [..., n, D], m [..., R, D], lam [..., R], p [..., R, D] -> [..., R, D]
    """
    kp = p @ kc.transpose(-1, -2)  # [..., R, n]
    return (s * kp) @ kc - (m * p).sum(-1, keepdim=True) * m + lam[..., None] * p


def cov_diag(s, kc, m, lam):
    """Jacobi preconditioner ``diag(A) = sum_j s_j k_j^2 - m^2 + lam``: [..., R, D]."""
    return s @ (kc * kc) - m * m + lam[..., None]


def tile_preconditioner(s, kc, m, lam):
    """A dense preconditioner shared by a tile's rows: the inverse of their mean system matrix,
    ``M = mean_i A_i = K^T diag(mean_i s_i) K - mean_i m_i m_i^T + mean_i lam_i I``.

    Rows of a tile see almost the same keys, so ``M`` captures the key covariance (scales and
    correlations of the features, which Jacobi only sees on the diagonal) for ``O(n D^2)`` per
    tile: about ``D / R`` of one key pass.  Symmetric positive definite (a mean of SPD matrices).
    s [..., R, n], kc [..., n, D], m [..., R, D], lam [..., R] -> M^{-1} [..., D, D], or None when
    the Cholesky factorisation fails in the working dtype (the caller falls back to Jacobi).
    """
    R, D = m.shape[-2], m.shape[-1]
    w = s.mean(-2)  # [..., n]
    M = (kc * w[..., None]).transpose(-1, -2) @ kc - (m.transpose(-1, -2) @ m) / R
    M.diagonal(dim1=-2, dim2=-1).add_(lam.mean(-1, keepdim=True))
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()):
        return None
    return torch.cholesky_inverse(L)


def pcg(matvec, b, diag, *, tol: float, max_iters: int):
    """Batched (Jacobi-preconditioned) conjugate gradient, one independent system per row.

    matvec(p) -> A p for p [..., R, D]; b [..., R, D]; diag [..., R, D] or None.
    A row stops updating once ``||r|| <= tol * ||b||``; the loop ends when every row has.
    Returns (x, iterations run, worst relative residual as a 0-dim tensor).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    bnorm = b.norm(dim=-1)  # [..., R]
    thresh = (tol * bnorm) ** 2
    inv_diag = None if diag is None else 1.0 / diag.clamp_min(torch.finfo(b.dtype).tiny)
    z = r if inv_diag is None else r * inv_diag
    p = z.clone()
    rz = (r * z).sum(-1)
    active = (r * r).sum(-1) > thresh
    it = 0
    while it < max_iters and bool(active.any()):
        ap = matvec(p)
        pap = (p * ap).sum(-1)
        alpha = torch.where(active & (pap > 0), rz / pap.where(pap > 0, torch.ones_like(pap)), torch.zeros_like(pap))
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * ap
        z = r if inv_diag is None else r * inv_diag
        rz_new = (r * z).sum(-1)
        beta = torch.where(rz > 0, rz_new / rz.where(rz > 0, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta[..., None] * p
        rz = rz_new
        active = active & ((r * r).sum(-1) > thresh)
        it += 1
    resid = r.norm(dim=-1) / bnorm.where(bnorm > 0, torch.ones_like(bnorm))
    return x, it, resid.max() if resid.numel() else resid.new_zeros(())


def _take_rows(t, sel):
    """Rows ``sel [..., c]`` of ``t [..., R, *]`` (or of ``t [..., R]``) -> ``[..., c, *]``."""
    if t.dim() == sel.dim():
        return t.gather(-1, sel)
    return t.gather(-2, sel[..., None].expand(*sel.shape, t.shape[-1]))


def pcg_compact(s, kc, m, lam, b, diag, *, tol: float, max_iters: int, scratch=None, minv=None):
    """Jacobi-preconditioned CG on ``A x = b`` for a tile of rows, converged rows dropped as it goes.

    Same systems and stopping rule as ``pcg`` with ``cov_matvec``, but once at most
    ``COMPACT_FRACTION`` of the rows still iterate (the largest count over the batch dims), the
    rows are gathered down to the active ones, so that converged rows stop costing key passes.
    Rows converge at very different rates (a row seeing few keys is ill-conditioned, a row seeing
    thousands is not), so this is where most of the saving is.

    s [..., R, n], kc [..., n, D], m [..., R, D], lam [..., R], b [..., R, D], diag [..., R, D] or None
    ``minv [..., D, D]`` (optional) is a preconditioner shared by the rows (``tile_preconditioner``),
    used instead of ``diag``.  ``scratch`` (optional) has ``get(slot, shape)`` returning reusable buffers for the ``[..., R, n]``
    intermediates.
    -> (x [..., R, D], iterations of the slowest row, worst relative residual 0-dim tensor)
    """
    R = b.shape[-2]
    kcT = kc.transpose(-1, -2)
    x_out = torch.zeros_like(b)
    r_out = b.clone()
    bnorm = b.norm(dim=-1)  # [..., R]
    thresh = (tol * bnorm) ** 2
    inv_diag = None if diag is None or minv is not None else 1.0 / diag.clamp_min(torch.finfo(b.dtype).tiny)

    def precond(r):
        if minv is not None:
            return r @ minv
        return r if inv_diag is None else r * inv_diag

    idx = None  # [..., Ra] original row of each working row (None: all rows, in order)
    tiny = torch.finfo(b.dtype).tiny
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum(-1)
    active = (r * r).sum(-1) > thresh  # [..., Ra]
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
            r_out.scatter_(-2, full_idx[..., None].expand_as(r), r)
            order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[..., :n_active]  # [..., c]
            idx = full_idx.gather(-1, order)
            x, r, p, rz, active = (_take_rows(t, order) for t in (x, r, p, rz, active))
            if scratch is None:
                s = _take_rows(s, order)
            else:  # ping-pong between two buffers: the source of a gather is never its destination
                slot = "s1" if s.data_ptr() != scratch.get("s1", (1,)).data_ptr() else "s2"
                s = torch.gather(s, -2, order[..., None].expand(*order.shape, s.shape[-1]),
                                 out=scratch.get(slot, (*order.shape, s.shape[-1])))
            m, lam, thresh = (_take_rows(t, order) for t in (m, lam, thresh))
            if inv_diag is not None:
                inv_diag = _take_rows(inv_diag, order)
        if scratch is None:
            ap = cov_matvec(s, kc, m, lam, p)
        else:
            kp = scratch.get("kp", s.shape)
            torch.matmul(p, kcT, out=kp)
            ap = torch.matmul(kp.mul_(s), kc)
            ap.addcmul_(m, torch.linalg.vecdot(m, p).unsqueeze(-1), value=-1.0).addcmul_(p, lam.unsqueeze(-1))
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
        active = active & (torch.linalg.vecdot(r, r) > thresh)
        it += 1
    if idx is None:
        x_out, r_out = x, r
    else:
        x_out.scatter_(-2, idx[..., None].expand_as(x), x)
        r_out.scatter_(-2, idx[..., None].expand_as(r), r)
    resid = r_out.norm(dim=-1) / bnorm.where(bnorm > 0, torch.ones_like(bnorm))
    return x_out, it, resid.max() if resid.numel() else resid.new_zeros(())


def cov_matrix(s, kc, m, lam, *, chunk_elems: int = 1 << 22):
    """``A`` formed explicitly: ``[..., R, D, D]``.

    The uncentred moment ``sum_j s_j k_j k_j^T`` is one GEMM of the weights against the keys'
    outer products (upper triangle only, mirrored after), streamed over key chunks so that no
    ``[n, D, D]`` tensor larger than ``chunk_elems`` exists.
    """
    D = kc.shape[-1]
    n = kc.shape[-2]
    iu = torch.triu_indices(D, D, device=kc.device)  # [2, D(D+1)/2]
    P = iu.shape[1]
    batch = kc[..., :1, :1].numel()
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
    eye = torch.eye(D, dtype=kc.dtype, device=kc.device)
    return full - m[..., :, None] * m[..., None, :] + lam[..., None, None] * eye


def cholesky_solve(A, b):
    """Solve ``A x = b`` row-wise by Cholesky; rows whose factorisation fails in the working dtype
    are redone in float64 (with a tiny diagonal jitter as a last resort).

    A [..., R, D, D], b [..., R, D] -> (x [..., R, D], worst relative residual 0-dim tensor)
    """
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    bad = info != 0
    if bool(bad.any()):
        A64 = A[bad].double()
        L64, info64 = torch.linalg.cholesky_ex(A64)
        if bool((info64 != 0).any()):
            D = A.shape[-1]
            jitter = 1e-12 * A64.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-300)
            L64, _ = torch.linalg.cholesky_ex(A64 + jitter[:, None, None] * torch.eye(D, dtype=A64.dtype, device=A.device))
        x[bad] = torch.cholesky_solve(b[bad].double().unsqueeze(-1), L64).squeeze(-1).to(x.dtype)
    r = (A @ x.unsqueeze(-1)).squeeze(-1) - b
    bnorm = b.norm(dim=-1)
    resid = r.norm(dim=-1) / bnorm.where(bnorm > 0, torch.ones_like(bnorm))
    return x, resid.max() if resid.numel() else resid.new_zeros(())
