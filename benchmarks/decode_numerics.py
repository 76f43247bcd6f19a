"""Single-token decode numerics: float32 decode steps on a grid of hard inputs, against float64.

    python benchmarks/decode_numerics.py [--mpmath 3] [--op]

Grid: head dim D in (4, 16, 64), ridge in (1e-6, 1e-3, 0.1, 1, 100), a key scale of 1 .. 1e4 applied
to one key (the newest, or the oldest), to all keys, or as a drift (key j shifted by j/S times the
scale), two seeds; S = 48 cached entries, one query head.  Each case runs
``lla.local_linear_attention_with_kvcache`` in float32 and in float64 (the truth: centred on the
row's mean, see docs/inference.md) and records the relative error and whether an
``LLAConvergenceWarning`` fired.  Reported: cases, non-finite outputs, misses (error > 1e-3 without a
warning), false alarms (warning with error < 1e-4), warned.

``--op`` runs the public op at ``T = 1`` (``solver="direct"``, PyTorch backend) on the same grid.
``--mpmath N`` (needs mpmath) also evaluates the formula at 80 digits for the N cases where the float64
reference ``lla.local_linear_attention_ref`` and the float64 decode disagree most, and prints both
errors against it.
"""

from __future__ import annotations

import argparse
import itertools
import warnings

import torch

import lla

S = 48


def _case(D, mult, where, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, 1, D, generator=g, dtype=torch.float64) for n in (1, S, S))
    if where == "newest":
        k[:, -1] *= mult
    elif where == "oldest":
        k[:, 0] *= mult
    elif where == "all":
        k *= mult
    else:  # drift
        k += torch.linspace(0, mult, S, dtype=torch.float64)[None, :, None, None]
    return tuple(t.float() for t in (q, k, v))  # the float32 inputs; float64 runs use them exactly


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


OP = False  # --op: the public op at T = 1 (solver="direct", PyTorch backend) instead of the decode


def _step(q, k, v, ridge):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if OP:
            o = lla.local_linear_attention(q, k, v, ridge=ridge, solver="direct", backend="torch")
        else:
            o = lla.local_linear_attention_with_kvcache(q, k, v, cache_seqlens=S, ridge=ridge)
    return o, any(issubclass(w.category, lla.LLAConvergenceWarning) for w in caught)


def _mpmath_output(q, k, v, ridge):
    import mpmath

    mpmath.mp.dps = 80
    D = q.shape[-1]
    Q = [mpmath.mpf(float(x)) for x in q[0, 0, 0]]
    K = [[mpmath.mpf(float(x)) for x in k[0, j, 0]] for j in range(S)]
    V = [[mpmath.mpf(float(x)) for x in v[0, j, 0]] for j in range(S)]
    scale = mpmath.mpf(D) ** -0.5
    logits = [scale * mpmath.fsum(Q[i] * K[j][i] for i in range(D)) for j in range(S)]
    top = max(logits)
    e = [mpmath.exp(x - top) for x in logits]
    total = mpmath.fsum(e)
    s = [x / total for x in e]
    z = [[K[j][i] - Q[i] for i in range(D)] for j in range(S)]
    mu = mpmath.matrix([mpmath.fsum(s[j] * z[j][i] for j in range(S)) for i in range(D)])
    sigma = mpmath.matrix(D, D)
    for a in range(D):
        for b in range(D):
            sigma[a, b] = mpmath.fsum(s[j] * z[j][a] * z[j][b] for j in range(S)) + (ridge if a == b else 0)
    rho = mpmath.lu_solve(sigma, mu)
    delta = 1 - mpmath.fsum(mu[i] * rho[i] for i in range(D))
    w = [s[j] * (1 - mpmath.fsum(z[j][i] * rho[i] for i in range(D))) / delta for j in range(S)]
    o = [mpmath.fsum(w[j] * V[j][c] for j in range(S)) for c in range(D)]
    return torch.tensor([float(x) for x in o], dtype=torch.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mpmath", type=int, default=0, help="check the N worst reference/decode disagreements at 80 digits")
    ap.add_argument("--op", action="store_true", help="run lla.local_linear_attention at T = 1 (direct) instead")
    args = ap.parse_args()
    global OP
    OP = args.op
    torch.set_num_threads(1)
    rows = []
    grid = itertools.product((4, 16, 64), (1e-6, 1e-3, 0.1, 1.0, 100.0), (1, 10, 1e2, 1e3, 1e4), ("newest", "all", "oldest", "drift"), (0, 1))
    for D, ridge, mult, where, seed in grid:
        q, k, v = _case(D, mult, where, seed)
        o32, warned = _step(q, k, v, ridge)
        o64, _ = _step(q.double(), k.double(), v.double(), ridge)
        ref = lla.local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=ridge)
        rows.append(dict(case=(D, ridge, mult, where, seed), err=_rel(o32, o64), warned=warned,
                         finite=bool(torch.isfinite(o32).all()), ref_vs_decode=_rel(ref, o64)))
    n = len(rows)
    nonfinite = sum(not r["finite"] for r in rows)
    misses = [r for r in rows if r["err"] > 1e-3 and not r["warned"]]
    alarms = [r for r in rows if r["warned"] and r["err"] < 1e-4]
    what = "op at T = 1" if OP else "decode"
    print(f"float32 {what} vs float64 {what}: {n} cases, {nonfinite} non-finite, {len(misses)} misses "
          f"(error > 1e-3, silent), {len(alarms)} false alarms (warned, error < 1e-4), "
          f"{sum(r['warned'] for r in rows)} warned, {sum(r['err'] > 1e-3 for r in rows)} with error > 1e-3")
    for r in misses:
        print("  miss", r["case"], f"{r['err']:.2e}")
    print(f"float64 reference vs float64 decode: {sum(r['ref_vs_decode'] > 1e-6 for r in rows)} cases differ by > 1e-6, "
          f"worst {max(r['ref_vs_decode'] for r in rows):.2e}")
    for r in sorted(rows, key=lambda r: -r["ref_vs_decode"])[: args.mpmath]:
        q, k, v = _case(*[r["case"][i] for i in (0, 2, 3, 4)])
        exact = _mpmath_output(q, k, v, r["case"][1])
        o64, _ = _step(q.double(), k.double(), v.double(), r["case"][1])
        ref = lla.local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=r["case"][1])
        print("  80 digits", r["case"], f"reference err {_rel(ref.flatten(), exact):.2e}, float64 decode err {_rel(o64.flatten(), exact):.2e}")


if __name__ == "__main__":
    main()
