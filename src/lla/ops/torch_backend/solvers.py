"""The two solvers for the per-row system ``A x = b`` of the PyTorch backend.

``A_i = sum_j s_ij (k_j - m_i)(k_j - m_i)^T + lam_i I`` is the ridge-regularised, softmax-weighted
key covariance of row ``i`` (see ``function.py`` for why we solve with it rather than ``Sigma``).
Both solvers take a tile of rows at once: every tensor below is ``[..., R, *]`` with ``R`` rows
sharing the ``n`` keys ``kc [..., n, D]`` and the weights ``s [..., R, n]``.
"""

from __future__ import annotations

import torch

__all__ = ["cov_matvec", "cov_diag", "pcg", "cov_matrix", "cholesky_solve"]


def cov_matvec(s, kc, m, lam, p):
    """``A p`` matrix-free: ``sum_j s_j (k_j . p) k_j - (m . p) m + lam p``; two key-sized matmuls.

    s [..., R, n], kc [..., n, D], m [..., R, D], lam [..., R], p [..., R, D] -> [..., R, D]
    """
    kp = p @ kc.transpose(-1, -2)  # [..., R, n]
    return (s * kp) @ kc - (m * p).sum(-1, keepdim=True) * m + lam[..., None] * p


def cov_diag(s, kc, m, lam):
    """Jacobi preconditioner ``diag(A) = sum_j s_j k_j^2 - m^2 + lam``: [..., R, D]."""
    return s @ (kc * kc) - m * m + lam[..., None]


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
