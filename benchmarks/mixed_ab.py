"""A/B of the PyTorch backend's solve precision (``precision="fp32"`` vs ``"mixed"``) on the targets'
shape: B = 1, H = 8, D = 64, causal, fp32, ``q, k, v ~ N(0, 1)``, SDPA timed in the same process.

For each variant: median wall time of ``--repeats`` runs (forward, or forward + backward with
``--bwd``), the ratio to SDPA's median measured in between (and the ratio of CPU times, which the
other jobs on a shared machine disturb less), the relative error of the output against
the float64 reference on 8 sampled rows (``lla.bench._ref_rows``), the slowest row's iterations,
and the matvec work (row-key products, bf16 / fp32) from the backend's stats.

    python benchmarks/mixed_ab.py --T 4096 --ridge 1 0.01 --threads 1
    python benchmarks/mixed_ab.py --bwd --T 256 1024 4096 --D 16 64 --H 4   # "auto"'s size rule
    python benchmarks/mixed_ab.py --T 4096 --ridge 1 --bwd --set MIXED_REPLACE=3e-3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import lla
from lla.bench import _ref_rows, _sample_rows
from lla.ops.lla.torch_backend import function as fn
from lla.ops.lla.torch_backend import solvers


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, nargs="+", default=[4096])
    p.add_argument("--D", type=int, nargs="+", default=[64])
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--ridge", type=float, nargs="+", default=[1.0])
    p.add_argument("--precision", nargs="+", default=["fp32", "mixed"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bwd", action="store_true")
    p.add_argument("--set", nargs="*", default=[], help="NAME=value: override a solvers/function module constant")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    for kv in a.set:
        name, val = kv.split("=")
        mod = solvers if hasattr(solvers, name) else fn
        setattr(mod, name, type(getattr(mod, name))(float(val)))
    warnings.simplefilter("ignore")
    for T in a.T:
        for D in a.D:
            ab(a, T, D)


def ab(a, T, D):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, T, a.H, D, generator=g) for _ in range(4))

    def sdpa():
        qq, kk, vv = (t.detach().transpose(1, 2).requires_grad_(a.bwd) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        if a.bwd:
            o.backward(do.transpose(1, 2))

    def run(ridge, prec):
        qq, kk, vv = (t.detach().requires_grad_(a.bwd) for t in (q, k, v))
        o, aux = lla.local_linear_attention(qq, kk, vv, ridge=ridge, precision=prec, backend="torch", return_aux=True)
        if a.bwd:
            o.backward(do)
        return o.detach(), aux

    sdpa()
    print(f"T={T} D={D} H={a.H} threads={torch.get_num_threads()} {'fwd+bwd' if a.bwd else 'fwd'} set={a.set}")
    rows = _sample_rows(T)
    for ridge in a.ridge:
        ref = _ref_rows(q, k, v, ridge, rows)
        for prec in a.precision:
            ts, ss, tc, sc = [], [], [], []
            for _ in range(a.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                sdpa()
                ss.append(time.perf_counter() - t0)
                sc.append(time.process_time() - c0)
                t0, c0 = time.perf_counter(), time.process_time()
                o, aux = run(ridge, prec)
                ts.append(time.perf_counter() - t0)
                tc.append(time.process_time() - c0)
            err = float((o[:, rows].double() - ref).norm() / ref.norm())
            st = fn.lla_forward(q, k, v, torch.full((1, T, a.H), ridge), fn._Cfg(
                D ** -0.5, (-1, 0), "cg", 2 * D, 1e-6, True, precision=prec))[2].tolist() if not a.bwd else None
            t, s = statistics.median(ts), statistics.median(ss)
            cpu = statistics.median(tc) / statistics.median(sc)
            work = "" if st is None else f" work bf16 {st[6] / 1e6:.0f}M fp32 {st[7] / 1e6:.0f}M fallback {st[5]:.0f}"
            print(f"ridge {ridge:g} {prec:6s} {t * 1e3:8.0f} ms  sdpa {s * 1e3:6.0f} ms  x{t / s:5.2f} (CPU time x{cpu:5.2f})  err {err:.1e}  "
                  f"iters {aux.iters} res {aux.residual:.1e} ran {aux.precision}{work}", flush=True)


if __name__ == "__main__":
    main()
