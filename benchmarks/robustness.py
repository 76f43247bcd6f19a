"""Robustness grid for ``lla.local_linear_attention``: finite in -> finite out, silent means accurate.

Every case runs the op (forward and backward) on finite inputs and compares the output (per row) and
every gradient (q, k, v, ridge; per tensor) with ``lla.local_linear_attention_ref`` in float64 on the
*same rounded inputs* (its autograd for the gradients).  It records: non-finite outputs/gradients,
the largest error, and whether an ``LLAConvergenceWarning`` fired (forward or backward).

Counts: ``silent miss`` = an error above 1e-3 with no warning; ``false alarm`` = a warning while
every error is below 1e-4.  For bf16/fp16 inputs both limits are raised to 4x the error of the
float64 reference itself rounded to that dtype (a result cannot be stored more exactly).

Design (not the Cartesian product): one factor at a time around a base case (fp32, T = 64, H = 2,
D = 16, ridge 1, causal, CG, Gaussian q/k/v), then random combinations with a fixed seed.  Paths:
the PyTorch backend (every case), the Triton backend under ``TRITON_INTERPRET=1`` (small shapes, in
a subprocess, since the interpreter must be set before Triton is imported) and single-token decode
(``lla.local_linear_attention_with_kvcache``, compared with the reference's last row).

    python benchmarks/robustness.py --out docs/robustness.md          # full grid (<= 10 min, 2 cores)
    python benchmarks/robustness.py --quick                           # a small version
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
import warnings

import torch

MISS, CLEAN = 1e-3, 1e-4
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASE = dict(path="torch", dtype="fp32", T=64, H=2, Hk=2, D=16, ridge=1.0, causal=True, window=(-1, -1), solver="cg",
            keys="normal", kmag=1.0, qmag=1.0, logits=None, varlen=False, seed=0)

# one factor at a time: (field, values); "keys" entries are (kind, magnitude)
OFAT = [
    ("keys", [("outlier", 1e2), ("outlier", 1e3), ("outlier", 1e4), ("all", 1e1), ("all", 1e2), ("all", 1e3),
              ("all", 1e4), ("drift", 1e1), ("drift", 1e2), ("drift", 1e3), ("drift", 1e4), ("offset", 1e2),
              ("offset", 1e4)]),
    ("qmag", [1e2, 1e3, 1e4]),
    ("logits", [1e1, 1e2, 1e3, 1e4]),
    ("ridge", [1e-6, 1e-4, 1e-2, 1e2, 1e4, 1e6]),
    ("T", [1, 7, 256, 1024]),
    ("D", [1, 4, 64, 256]),
    ("dtype", ["fp64", "bf16", "fp16"]),
    ("solver", ["direct"]),
    ("window", [(8, -1), (32, -1), ("nc", 16, 16)]),
    ("H", [(4, 1)]),
    ("varlen", [True]),
]
RANDOM_FIELDS = dict(
    dtype=["fp64", "fp32", "fp32", "bf16", "fp16"],
    T=[1, 16, 64, 100, 256],
    D=[1, 8, 16, 48, 64],
    ridge=[1e-6, 1e-3, 1e-2, 0.1, 1.0, 10.0, 1e4],
    solver=["cg", "direct"],
    keys=[("normal", 1.0), ("outlier", 1e3), ("outlier", 1e4), ("all", 1e2), ("all", 1e3), ("drift", 1e2),
          ("drift", 1e3), ("offset", 1e3)],
    logits=[None, None, 1e2, 1e3],
    window=[(-1, -1), (16, -1), ("nc", -1, -1), ("nc", 8, 8)],
    H=[(2, 2), (4, 2), (4, 1)],
    varlen=[False, False, True],
)


def _apply(case, field, val):
    c = dict(case)
    if field == "keys":
        c["keys"], c["kmag"] = val
    elif field == "window":
        if val[0] == "nc":
            c["causal"], c["window"] = False, (val[1], val[2])
        else:
            c["window"] = val
    elif field == "H":
        c["H"], c["Hk"] = val
    else:
        c[field] = val
    return c


def design(quick: bool, n_random: int, seed: int = 0):
    cases = [dict(BASE)]
    for field, vals in OFAT:
        for val in vals:
            cases.append(_apply(BASE, field, val))
    for field, vals in [("solver", ["direct"]), ("dtype", ["fp64"])]:  # the OFAT keys/ridge rows again
        for f2, v2 in [("keys", ("outlier", 1e4)), ("keys", ("all", 1e3)), ("keys", ("drift", 1e3)), ("ridge", 1e-6)]:
            cases.append(_apply(_apply(BASE, field, vals[0]), f2, v2))
    rng = random.Random(seed)
    for i in range(n_random):
        c = dict(BASE, seed=i + 1)
        for field, vals in RANDOM_FIELDS.items():
            c = _apply(c, field, rng.choice(vals))
        cases.append(c)
    if quick:
        cases = [c for c in cases if c["T"] <= 256 and c["D"] <= 64][:: 3]
    for c in cases:
        if c["T"] >= 512 or c["D"] >= 128:  # keep the float64 reference affordable
            c["H"], c["Hk"] = 1, 1
    return cases


def make_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, T, H, Hk, D = 1, c["T"], c["H"], c["Hk"], c["D"]
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64) * c["qmag"]
    k = torch.randn(B, T, Hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, Hk, D, generator=g, dtype=torch.float64)
    kind, mag = c["keys"], c["kmag"]
    if kind == "outlier":  # one key in the middle of the sequence
        k[:, T // 2] *= mag
    elif kind == "all":
        k = k * mag
    elif kind == "drift":  # keys drift along a direction, reaching ``mag`` at the last position
        direction = torch.randn(D, generator=g, dtype=torch.float64)
        k = k + (torch.arange(T, dtype=torch.float64) / max(1, T - 1) * mag)[None, :, None, None] * direction / direction.norm()
    elif kind == "offset":  # a common offset of keys and queries
        off = torch.randn(D, generator=g, dtype=torch.float64)
        off = off / off.norm() * mag
        k, q = k + off, q + off
    dt = DTYPES[c["dtype"]]
    return q.to(dt), k.to(dt), v.to(dt)


def _rowerr(o, r):
    """Per-row relative error, normalised by max(|r_i|, mean_i |r_i|): [rows]."""
    o, r = o.double().reshape(-1, o.shape[-1]), r.double().reshape(-1, r.shape[-1])
    den = r.norm(dim=-1)
    den = torch.maximum(den, den.mean().expand_as(den)).clamp_min(1e-300)
    return (o - r).norm(dim=-1) / den


def _relerr(a, b):
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def run_case(c):
    import lla

    q, k, v = make_inputs(c)
    dt = q.dtype
    T = c["T"]
    kw = dict(scale=None if c["logits"] is None else c["logits"] / math.sqrt(c["D"]), causal=c["causal"],
              window_size=c["window"])
    cu = None
    if c["varlen"] and T >= 3:
        cu = torch.tensor([0, T // 3, T // 3 + max(1, T // 4), T])
        kw["cu_seqlens"] = cu
    # the reference gets the ridge the op gets (float32 for half and float32 inputs): at cond ~1e10 the
    # rounding of 1e-6 to float32 alone moves the ridge gradient by 5e-4
    lam_dt = torch.float64 if dt == torch.float64 else torch.float32
    ridge = torch.tensor(c["ridge"], dtype=lam_dt).double()
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    lr = ridge.clone().requires_grad_()
    try:
        ref = lla.local_linear_attention_ref(qr, kr, vr, ridge=lr, **kw)
        do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        gref = torch.autograd.grad(ref, (qr, kr, vr, lr), do, allow_unused=True)
    except RuntimeError as e:  # the float64 reference itself cannot solve it: nothing to compare with
        return dict(case=c, ref_error=f"{type(e).__name__}: {e}"[:120])
    # guard against a broken reference (seen before ``lla.ops.common.linalg.solve``: MKL's batched LU failing or
    # hanging at D = 256 with 2 threads, "DLASWP parameter 6"): a second float64 computation, the op's
    # direct solver, must agree with it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check = lla.local_linear_attention(qr.detach(), kr.detach(), vr.detach(), ridge=c["ridge"], solver="direct",
                                           backend="torch", **kw)
    if _rowerr(check, ref.detach()).max() > 1e-6 and c["ridge"] >= 1e-3:
        try:
            ref2 = lla.local_linear_attention_ref(qr.detach(), kr.detach(), vr.detach(), ridge=c["ridge"], **kw)
        except RuntimeError:
            ref2 = torch.full_like(ref, float("nan"))
        if not bool(_rowerr(ref2, ref.detach()).max() <= 1e-9):
            return dict(case=c, ref_error="the float64 reference is not reproducible (LAPACK failure)")
    gref = [torch.zeros_like(t) if g is None else g for g, t in zip(gref, (qr, kr, vr, lr))]
    out = dict(case=c)
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ll = ridge.to(lam_dt).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if c["path"] == "decode":
                o = lla.local_linear_attention_with_kvcache(qq[:, -1:], kk, vv, cache_seqlens=T, ridge=ll,
                                                            scale=kw["scale"], solver=c["solver"])
                ref_o, do_o = ref[:, -1:], None
            else:
                o, aux = lla.local_linear_attention(qq, kk, vv, ridge=ll, solver=c["solver"], backend=c["path"],
                                                    return_aux=True, **kw)
                out["amplification"], out["residual"] = aux.amplification, aux.residual
                ref_o, do_o = ref, do
            grads = None if do_o is None else torch.autograd.grad(o, (qq, kk, vv, ll), do_o.to(o.dtype), allow_unused=True)
        except Exception as e:  # an error is a result too (it is not a silent wrong answer)
            out["error"] = f"{type(e).__name__}: {e}"[:200]
            return out
    out["warned"] = any(issubclass(w.category, lla.LLAConvergenceWarning) for w in caught)
    out["messages"] = sorted({str(w.message)[:90] for w in caught})
    out["nonfinite"] = not bool(torch.isfinite(o).all()) or (
        grads is not None and any(g is not None and not bool(torch.isfinite(g).all()) for g in grads))
    err_o = _rowerr(o, ref_o)
    out["err_out"] = float(err_o.detach().max()) if err_o.numel() else 0.0
    out["floor_out"] = float(_rowerr(ref_o.detach().to(dt), ref_o.detach()).max()) if dt != torch.float64 and err_o.numel() else 0.0
    if grads is not None:
        errs, floors = {}, {}
        big = max(float(b.norm()) for b in gref[:3])
        for name, a, b in zip(("dq", "dk", "dv", "dridge"), grads, gref):
            a = torch.zeros_like(b) if a is None else a
            # a gradient that is (near) zero in exact arithmetic: error relative to the largest one
            den = max(float(b.norm()), 1e-6 * big)
            errs[name] = float((a.double() - b).norm()) / den if den > 0 else float(a.double().norm())
            floors[name] = _relerr(b.to(dt), b) if dt != torch.float64 and name != "dridge" else 0.0
        out["err_grad"], out["floor_grad"] = errs, floors
        if classify(out)["miss"]:
            out["dispute"] = _dispute(qr, kr, vr, ridge, kw, do, gref, errs)
    return out


def _dispute(qr, kr, vr, ridge, kw, do, gref, errs):
    """A would-be silent miss in a gradient: is the float64 reference itself reliable there?  A second,
    independent float64 computation (the op's direct solver in float64: per-tile key shift, centred
    moments, refinement) is compared with the reference; the gradients where the reference and it differ
    by more than half the op's own error are *disputed* (at that conditioning float64 is not enough for
    the reference's formulation: e.g. its output is not smooth in the ridge, a finite difference gives
    +-3e5 where both float64 solves of the op give 8.7e4).  -> {name: (error vs reference, reference vs
    the float64 op)} of the disputed gradients (empty: the miss stands)."""
    import lla

    q2, k2, v2, l2 = (t.detach().clone().requires_grad_() for t in (qr, kr, vr, ridge))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o2 = lla.local_linear_attention(q2, k2, v2, ridge=l2, solver="direct", backend="torch", **kw)
        g2 = torch.autograd.grad(o2, (q2, k2, v2, l2), do, allow_unused=True)
    out = {}
    for name, a, b in zip(("dq", "dk", "dv", "dridge"), g2, gref):
        a = torch.zeros_like(b) if a is None else a
        gap = float((a - b).norm()) / max(float(b.norm()), 1e-300)
        if errs[name] > MISS and gap > 0.5 * errs[name]:
            out[name] = (errs[name], gap)
    return out


def classify(r):
    if "error" in r or "ref_error" in r:
        return dict(bad=False, miss=False, alarm=False, cond_alarm=False, err=float("nan"))
    lo = r["case"]["dtype"] in ("bf16", "fp16")
    pairs = [(r["err_out"], r["floor_out"])]
    if r.get("err_grad"):
        pairs += [(r["err_grad"][n], r["floor_grad"][n]) for n in r["err_grad"]]
    excess = [e / max(MISS, 4 * f) if lo else e / MISS for e, f in pairs]
    clean = [e / max(CLEAN, 4 * f) if lo else e / CLEAN for e, f in pairs]
    bad = r["nonfinite"]
    miss = (bad or max(excess) > 1 or any(math.isnan(x) for x in excess)) and not r["warned"]
    if miss and not bad and r.get("dispute"):  # the float64 reference is the doubtful side (``_dispute``)
        rest = [e / max(MISS, 4 * f) if lo else e / MISS for (e, f), name in zip(pairs, ["out", *r["err_grad"]])
                if name not in r["dispute"]]
        miss = max(rest) > 1
    alarm = r["warned"] and not bad and max(clean) < 1
    cond = any("ill-conditioned" in m for m in r.get("messages", []))
    return dict(bad=bad, miss=miss, alarm=alarm, cond_alarm=alarm and cond, err=max(e for e, _ in pairs))


def _label(c):
    keys = "" if c["keys"] == "normal" else f" keys={c['keys']}x{c['kmag']:g}"
    extra = []
    if c["qmag"] != 1:
        extra.append(f"|q|x{c['qmag']:g}")
    if c["logits"]:
        extra.append(f"logits~{c['logits']:g}")
    if not c["causal"]:
        extra.append("noncausal")
    if c["window"] != (-1, -1):
        extra.append(f"window={c['window']}")
    if c["Hk"] != c["H"]:
        extra.append(f"GQA {c['H']}/{c['Hk']}")
    if c["varlen"]:
        extra.append("varlen")
    return (f"{c['path']} {c['dtype']} {c['solver']} T={c['T']} D={c['D']} ridge={c['ridge']:g}{keys} "
            + " ".join(extra)).strip()


def run_all(cases, threads):
    torch.set_num_threads(threads)
    res = []
    for c in cases:
        t0 = time.perf_counter()
        r = run_case(c)
        r["seconds"] = time.perf_counter() - t0
        res.append(r)
    return res


def report(results, header, elapsed):
    lines = [header, ""]
    groups = {}
    skipped = [r for r in results if "ref_error" in r]
    results = [r for r in results if "ref_error" not in r]
    for r in results:
        c = r["case"]
        for stage in ("forward+backward",):
            key = (c["path"], c["dtype"], stage if c["path"] != "decode" else "forward")
            groups.setdefault(key, []).append((r, classify(r)))
    lines += ["| path | dtype | stage | cases | errors raised | non-finite | silent misses | false alarms "
              "| of which conditioning | warned |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    tot = [0, 0, 0, 0, 0, 0, 0]
    for key in sorted(groups):
        rs = groups[key]
        row = [len(rs), sum("error" in r for r, _ in rs), sum(k["bad"] for _, k in rs), sum(k["miss"] for _, k in rs),
               sum(k["alarm"] for _, k in rs), sum(k["cond_alarm"] for _, k in rs), sum(bool(r.get("warned")) for r, _ in rs)]
        tot = [a + b for a, b in zip(tot, row)]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(str(x) for x in row) + " |")
    lines.append("| **all** | | | " + " | ".join(f"**{x}**" for x in tot) + " |")
    lines += ["", f"{tot[0]} cases in {elapsed:.0f} s ({len(skipped)} more where the float64 reference itself failed).  Silent miss: an error > {MISS:g} (output row or gradient) "
              f"without a warning; false alarm: warned while every error < {CLEAN:g} (bf16/fp16: both limits raised to "
              "4x the reference's own rounding to that dtype); 'of which conditioning': the false alarms that include "
              "an ill-conditioning warning (the others are solves that missed their tolerance, which warn by contract "
              "whatever the error); 'reference disputed' (listed below, not a miss): a gradient off the float64 "
              "reference by more than the limit where the reference is itself that far from a second float64 "
              "computation (the op's direct solver in float64).", ""]
    flagged = [(r, k) for r, k in ((r, classify(r)) for r in results)
               if k["bad"] or k["miss"] or k["alarm"] or "error" in r or r.get("dispute")]
    worst = sorted(((r, k) for r, k in ((r, classify(r)) for r in results) if "error" not in r),
                   key=lambda rk: -rk[1]["err"] if not math.isnan(rk[1]["err"]) else -1e300)[:12]
    lines += ["Cases that are non-finite, silent misses, false alarms or raised:", ""]
    if not flagged:
        lines.append("(none)")
    else:
        lines += ["| case | verdict | largest error | warned | detail |", "|---|---|---:|---|---|"]
        for r, k in flagged:
            verdict = "raised" if "error" in r else ("non-finite" if k["bad"] else ("silent miss" if k["miss"] else (
                "false alarm" if k["alarm"] else "reference disputed")))
            detail = r.get("error") or "; ".join(r.get("messages", []))[:160]
            if r.get("dispute"):
                detail = "; ".join(f"{n}: {e:.1e} off the float64 reference, which is {g:.1e} off the op's float64 "
                                   "direct solve" for n, (e, g) in r["dispute"].items())
            lines.append(f"| {_label(r['case'])} | {verdict} | {k['err']:.2g} | {r.get('warned')} | {detail} |")
    lines += ["", "Largest errors:", "", "| case | largest error | warned | amplification | residual |", "|---|---:|---|---:|---:|"]
    for r, k in worst:
        lines.append(f"| {_label(r['case'])} | {k['err']:.2g} | {r['warned']} | {r.get('amplification', float('nan')):.3g} | "
                     f"{r.get('residual', float('nan')):.3g} |")
    return "\n".join(lines) + "\n"


NOTES = """
## Before this work (main at 84216b4, the same grid)

`PYTHONPATH=<main>/src python benchmarks/robustness.py` on 2026-11-30 (same design, 165 cases; the false-alarm
split did not exist yet): **165 cases, 0 raised, 19 non-finite, 16 silent misses, 2 false alarms, 50 warned**;
PyTorch path alone: 111 cases, 19 non-finite (fp32 CG NaN with one key x1e3/x1e4, all keys x1e3/x1e4, drifting
keys x1e4, ridge 1e-6; fp16/bf16), 13 silent misses (|q| x1e2..1e4 and logits ~1e2..1e4 up to 3.2 relative error,
fp32 ridge 0.01, fp64 ridge 1e-6), 0 false alarms.

## What changed in the PyTorch backend

- **Locality.** No statistic over all keys: logits from the raw keys (no lse correction); the keys of a query
  tile are shifted by the coordinate-wise median of up to 64 keys every row of the tile sees (no shift when
  there are none; windowed tiles are no taller than the window); the covariance matvec is centred per row;
  `y . p` for the output weights and the backward is centred with the weighted mean of the computed products
  (a row whose weight sits on one key gets exactly that key's value); the adjoint right-hand side is centred
  the same way; the tile-mean preconditioner (it mixed rows) is replaced by per-row Jacobi.  Outlier key
  (fp32, causal, T = 128, H = 2, D = 32, ridge 0.1, last key x1e3 / x1e4): the earlier rows move by exactly 0
  (main: 2.1e-4 / 2.0e-2 with CG), the last row is finite and 1.0e-6 (CG) / 1.6e-7 (direct) from the float64
  reference (main: NaN with CG).  `tests/test_numerics.py` checks x1e3 and x1e4 on a key row i cannot see,
  both solvers, causal and windowed, fp32 and fp64, output and gradients (<= 1e-5).
- **True residuals.** Every solve (forward and adjoint, CG and direct) reports the true relative residual
  at exit and a per-row rounding floor `eps (sqrt(E|k-c|^2 tr C) |x| + lam |x| + |b|) / |b|` (measured: the
  true residual of a converged solve is <= 1.3x it); CG rows stop at 0.25x the floor, so a tight `tol` costs
  no iteration below what the dtype can deliver (`benchmarks/tolerance_curves.py`); the direct solve is
  refined with the centred matvec; `check_solve` warns above `RESIDUAL_FACTOR * max(tol, floor)`.
- **Conditioning estimate** (`torch_backend.function._amplification`), calibrated on this grid: warn when
  `amplification * eps > diagnostics.CONDITIONING_THRESHOLD = 2e-4` (PyTorch path: 1e-4 gave 4 silent misses
  and 5 false alarms but warned on well-posed fp32 solves at ridge 0.01; 2e-4..1e-3 give 7 misses and 4 false
  alarms); the backward adds a check of the logits' rounding for rows with more than one nonzero weight.
  Main's estimate cried wolf (drifting keys, window 16: 3.6e5 with a real error of 1e-5; now silent, tested).
- **Tolerances.** `default_tol` stays 1e-6 (fp32/bf16/fp16) and 1e-11 (fp64): with the floor stop a tight
  tolerance no longer costs iterations below the dtype's floor (T = 4096, D = 64, ridge 0.01: 101 iterations
  instead of 123 for the slowest row); curves in `docs/tolerance_curves.md`
  (`python benchmarks/tolerance_curves.py --out docs/tolerance_curves.md`).

## Known gaps (PyTorch path)

- Silent misses and non-finite results: the table above has this run's counts (none in the 2026-12-02 run, `docs/robustness.md`).
- The fp64 adjoint solves that used to miss tol 1e-11 within `4 D` iterations (keys x1e3, ridge 1e4; six
  "false alarms" in earlier tables) converge now; the false alarms left are conditioning warnings on fp16/bf16
  inputs whose realised error stayed under 4x that dtype's own rounding (the estimate bounds the error, it
  does not measure it).
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small subset (a minute)")
    ap.add_argument("--random", type=int, default=60, help="random combinations on top of one-factor-at-a-time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton-interpreter part")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="also write every case's record here")
    ap.add_argument("--title", default="Robustness grid")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run a JSON list of cases
    args = ap.parse_args(argv)

    if args.worker:
        cases = json.loads(open(args.worker).read())
        for c in cases:
            c["window"] = tuple(c["window"])
            c["keys"] = c["keys"]
        res = run_all(cases, args.threads)
        json.dump(res, sys.stdout, default=str)
        return 0

    t0 = time.time()
    cases = design(args.quick, 8 if args.quick else args.random)
    results = run_all(cases, args.threads)
    extra = []
    if not args.no_decode:  # single-token decode against the reference's last row (forward only)
        dec = [dict(c, path="decode", solver="auto") for c in cases
               if not c["varlen"] and c["causal"] and c["window"] == (-1, -1) and c["T"] <= 256][:: 2]
        extra += run_all(dec, args.threads)
    if not args.no_triton:
        tri = [dict(c, path="triton") for c in cases
               if c["T"] <= 64 and c["D"] <= 32 and c["dtype"] != "fp64" and c["solver"] == "cg"][:: (4 if args.quick else 2)]
        tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lla_robustness_{os.getpid()}.json")
        with open(tmp, "w") as f:
            json.dump(tri, f)
        env = dict(os.environ, TRITON_INTERPRET="1")
        p = subprocess.run([sys.executable, __file__, "--worker", tmp, "--threads", str(args.threads)], env=env,
                           capture_output=True, text=True)
        os.unlink(tmp)
        if p.returncode == 0:
            extra += json.loads(p.stdout)
        else:
            print("triton part failed:\n" + p.stderr[-2000:], file=sys.stderr)
    results += extra
    for r in results:
        r["case"]["window"] = tuple(r["case"]["window"])
    text = report(results, f"## {args.title}\n\nCommand: `python benchmarks/robustness.py"
                  f"{' --quick' if args.quick else ''}` (torch {torch.__version__}, {args.threads} threads).",
                  time.time() - t0)
    if not args.quick:
        text += NOTES
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
