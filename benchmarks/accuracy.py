"""Accuracy of every path of the op against the float64 reference.

    python benchmarks/accuracy.py [--backend torch]

Max relative RMS error (||a - b|| / ||b||) of the output and of the gradients of q, k, v and a
per-head ridge, over T in {1, 63, 100}, D in {16, 48, 80}, causal and not, GQA (H=4, Hk=2),
Dv = D, ridge 1 (and 0.1 for the direct solver), per solver and input dtype.  The reference gets
the same (rounded) inputs in float64.
"""

from __future__ import annotations

import argparse
import itertools

import torch

import lla


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1.0)).item()  # floor 1: dq, dridge are exactly 0 at T = 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args(argv)
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
    print(f"backend={args.backend}: max relative error vs the float64 reference")
    print("| solver | ridge | dtype | output | dq | dk | dv | dridge |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for solver, ridge in [("cg", 1.0), ("direct", 1.0), ("direct", 0.1)]:
        for dt in dtypes:
            worst = [0.0] * 5
            for T, D, causal in itertools.product([1, 63, 100], [16, 48, 80], [True, False]):
                g = torch.Generator().manual_seed(T * D)
                q, k, v = (torch.randn(1, T, h, D, generator=g, dtype=torch.float64).to(dt) for h in (4, 2, 2))
                lam = torch.full((4,), ridge, dtype=torch.float64)
                do = torch.randn(1, T, 4, D, generator=g, dtype=torch.float64)
                ins = [t.double().requires_grad_() for t in (q, k, v)] + [lam.clone().requires_grad_()]
                ref = lla.local_linear_attention_ref(*ins[:3], ridge=ins[3], causal=causal)
                gref = torch.autograd.grad((ref * do).sum(), ins)
                xs = [t.detach().clone().requires_grad_() for t in (q, k, v)] + [lam.to(torch.float32 if dt != torch.float64 else dt).requires_grad_()]
                o = lla.local_linear_attention(*xs[:3], ridge=xs[3], causal=causal, solver=solver, backend=args.backend)
                gs = torch.autograd.grad((o.double() * do).sum(), xs)
                errs = [rel(o, ref)] + [rel(a, b) for a, b in zip(gs, gref)]
                worst = [max(w, e) for w, e in zip(worst, errs)]
            print(f"| {solver} | {ridge} | {str(dt).replace('torch.', '')} | " + " | ".join(f"{w:.1e}" for w in worst) + " |")


if __name__ == "__main__":
    main()
