"""A/B (dropped): CG warm start from the tile-mean system's solution, counted in iterations and row-key work.

    python benchmarks/warm_start_ab.py 4096

Per tile, the mean of the rows' weights defines one D x D system (formed, Cholesky); each row starts
from its solution where that lowers the row's residual, else from 0.  Counts (slowest row's
iterations, fp32 row-key products of the CG matvecs) do not depend on the machine's load; the warm
start's own cost (the residual check and CG's initial residual: two matvecs over every row) is not in
the count.  B = 1, H = 8, D = 64, causal, fp32, 1 thread.
"""
import torch, warnings, sys, lla
torch.set_num_threads(1)
from lla.ops.lla.torch_backend import function as fn, solvers
from lla.bench import _ref_rows, _sample_rows
warnings.simplefilter("ignore")
orig_pcg = fn.pcg_compact
MODE = {"warm": False}
def pcg_warm(s, kc, m, lam, b, diag, **kw):
    if MODE["warm"] and kw.get("x0") is None and s.shape[-2] > 8:
        sbar = s.mean(-2, keepdim=True)  # [nb, 1, n]
        mbar = sbar @ kc  # [nb, 1, D]
        A = (kc.transpose(-1, -2) * sbar) @ kc - mbar.transpose(-1, -2) @ mbar  # [nb, D, D]
        A = A + lam.mean(-1)[..., None, None] * torch.eye(kc.shape[-1], dtype=kc.dtype)
        L, info = torch.linalg.cholesky_ex(A)
        x0 = torch.cholesky_solve(b.transpose(-1, -2), L).transpose(-1, -2)  # [nb, R, D]
        ok = (info == 0)[..., None, None] & torch.isfinite(x0)
        x0 = torch.where(ok, x0, torch.zeros_like(x0))
        # keep the warm start only where it lowers the row's residual
        r0 = b - solvers.cov_matvec(s, kc, m, lam, x0)
        better = (r0.norm(dim=-1) < b.norm(dim=-1)).unsqueeze(-1)
        kw["x0"] = torch.where(better, x0, torch.zeros_like(x0))
    return orig_pcg(s, kc, m, lam, b, diag, **kw)
fn.pcg_compact = pcg_warm
T, H, D = int(sys.argv[1]), 8, 64
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, T, H, D, generator=g) for _ in range(3))
rows = _sample_rows(T)
for ridge in [1.0, 0.01]:
    ref = _ref_rows(q, k, v, ridge, rows)
    for warm in [False, True]:
        MODE["warm"] = warm
        st = fn.lla_forward(q, k, v, torch.full((1, T, H), ridge), fn._Cfg(D ** -0.5, (-1, 0), "cg", 2 * D, 1e-6, True, precision="fp32"))
        o = st[0]
        err = float((o[:, rows].double() - ref).norm() / ref.norm())
        print(f"T={T} ridge {ridge} warm={warm}: slowest row {int(st[2][0])} iters, fp32 row-key work {st[2][7]/1e6:.0f}M, err {err:.1e}", flush=True)
