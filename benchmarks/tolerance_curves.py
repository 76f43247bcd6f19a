"""Error-vs-iterations curves of the PyTorch backend's CG (issue 11, item 5).

For float32 inputs, a few ridges and head sizes: the output and every gradient (q, k, v, ridge) against
the float64 reference, as the CG tolerance (forward and adjoint) is tightened with a fixed, large
iteration cap, with the rounding-floor stop (``CG_FLOOR_STOP``) on and off.  A tolerance below the
point where the errors stop improving only spends iterations; the floor stop ends each row there.

    python benchmarks/tolerance_curves.py            # prints a markdown table
"""

from __future__ import annotations

import argparse
import time

import torch

import lla
from lla.ops.lla.torch_backend import function as fn


def _err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = ["| D | ridge | floor stop | tol | CG iters (fwd) | output | dq | dk | dv | dridge | s |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    stop0 = fn.CG_FLOOR_STOP
    for D, ridge in ((64, 1.0), (64, 0.01), (16, 0.01)):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.T, 2, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        lam = torch.tensor(ridge, dtype=torch.float64, requires_grad=True)
        ref = lla.local_linear_attention_ref(q, k, v, ridge=lam)
        do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        gref = torch.autograd.grad(ref, (q, k, v, lam), do)
        for stop in (stop0, 0.0):
            fn.CG_FLOOR_STOP = stop
            for tol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
                qq, kk, vv = (t.detach().float().requires_grad_() for t in (q, k, v))
                ll = lam.detach().float().requires_grad_()
                t0 = time.perf_counter()
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    o, aux = lla.local_linear_attention(qq, kk, vv, ridge=ll, solver="cg", backend="torch", tol=tol,
                                                        max_iters=8 * D, return_aux=True)
                    grads = torch.autograd.grad(o, (qq, kk, vv, ll), do.float())
                dt = time.perf_counter() - t0
                errs = " | ".join(f"{_err(a, b):.1e}" for a, b in zip(grads, gref))
                rows.append(f"| {D} | {ridge:g} | {'on' if stop else 'off'} | {tol:g} | {aux.iters} | {_err(o, ref):.1e} | "
                            f"{errs} | {dt:.2f} |")
        fn.CG_FLOOR_STOP = stop0
    text = (f"# CG tolerance curves\n\nCommand: `python benchmarks/tolerance_curves.py` (T = {args.T}, H = 2, float32 inputs, "
            f"causal, {args.threads} thread(s), iteration cap 8 D; errors: relative RMS vs the float64 reference, "
            "forward and adjoint at the same tol; 'floor stop' = rows also stop at the rounding floor).\n\n"
            + "\n".join(rows) + "\n")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
