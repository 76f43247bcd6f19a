"""The measurements behind ``solver="auto"`` (``lla.ops.common.policy.resolve_solver``) on the CPU.

For each (D, ridge, T) it times one forward + backward of ``lla.local_linear_attention`` (causal,
fp32, H = Hk = 4, B = 4096 // T so every point holds 4096 tokens) with ``solver="direct"`` and with
``solver="cg"`` (median of ``--reps``), and prints the ratio direct / CG (> 1: CG is faster) next to
what ``auto`` picks.  Usage: ``python benchmarks/solver_rule.py [--threads 2] [--reps 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lla
from lla.ops.common.policy import resolve_solver

GRID = [(16, 1.0), (16, 0.05), (32, 1.0), (32, 0.05), (64, 0.01)]
LENGTHS = [16, 64, 256, 1024]


def fwd_bwd_ms(B, T, H, D, solver, ridge, reps):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).requires_grad_() for _ in range(3))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        o = lla.local_linear_attention(q, k, v, ridge=ridge, causal=True, solver=solver, backend="torch")
        o.square().sum().backward()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'D':>3} {'ridge':>6} {'B':>4} {'T':>5} {'direct ms':>10} {'cg ms':>8} {'direct/cg':>9}  auto")
    for D, ridge in GRID:
        for T in LENGTHS:
            B = max(1, 4096 // T)
            td = fwd_bwd_ms(B, T, 4, D, "direct", ridge, args.reps)
            tc = fwd_bwd_ms(B, T, 4, D, "cg", ridge, args.reps)
            auto = resolve_solver("auto", ridge, D, torch.float32, S=T)
            print(f"{D:>3} {ridge:>6} {B:>4} {T:>5} {td:>10.1f} {tc:>8.1f} {td / tc:>9.2f}  {auto}", flush=True)


if __name__ == "__main__":
    main()
