"""Accuracy of the Triton kernels' precisions under the interpreter, with the GPU's rounding emulated.

    python benchmarks/triton_accuracy.py [--quick] [--ablation] [--dtypes ...] [--precisions ...] [--shapes T,D,ridge ...]
    python benchmarks/triton_accuracy.py --grid mixed      # the robustness grid's Triton cases on "mixed"

Runs on CPU (sets ``TRITON_INTERPRET=1`` itself).  For float32, bfloat16 and float16 inputs and each
precision: the relative RMS error (``||a - b|| / ||b||``) against the float64 reference of the output
and of the gradients of q, k, v and the ridge (cotangent fixed), next to a naive same-dtype LLA
(straight from the math, solve in float32), the forward CG iterations of the slowest row and the
worst true relative residual the op reports (tol 1e-6; "warned": an ``LLAConvergenceWarning``).

Precisions: ``fp32`` (plain float32 solves: ``ieee`` dots for float32 inputs; TF32 logits and
``tf32x3`` elsewhere for half inputs), ``mixed`` (the CG iterations as bf16 / fp16 tensor-core
products inside reliable updates with accurate true residuals: ``ieee`` dots for float32 inputs,
``tf32x3`` and native half logits for half inputs), ``authors`` (our implementation of the authors'
FlashLLA scheme: every product bf16 / fp16, 32 fixed unpreconditioned CG iterations, no refinement).
Every dot's operands are rounded as the tensor cores would (``lla.ops.common.triton_utils._dot``: TF32 / bf16 / fp16
round to nearest even, ``tf32x3`` as its three TF32 products), and stores round to nearest even.

``--ablation`` adds, for float32 inputs under ``mixed``, the choices the scheme was picked from: the
accurate dots (true residuals, moments, output, gradients) in ``tf32x3`` instead of ``ieee``, with the
logits in ``tf32x3``, ``ieee`` or ``bf16``, and the CG iterations' logits in ``tf32x3`` instead of ``bf16``.
Shapes: causal, B = 1, H = 2, (T, D) in {(64, 16), (100, 48)}; ridge 1 (and 0.1 at (100, 48)).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests", "lla"), os.path.join(HERE, "..", "tests")]  # the cases, conftest
sys.path.insert(0, HERE)

import lla  # noqa: E402
import triton_interp_cases as cases  # noqa: E402
from bench_gpu import _forced_precision  # noqa: E402
from lla.ops.lla.triton_backend import function as F  # noqa: E402

NAMES = ("o", "dq", "dk", "dv")

#: ablation variants: name -> overrides of block_config's dot precisions (float32 inputs, mixed)
ABLATION = {
    "mixed, accurate dots tf32x3": dict(PREC="tf32x3", PREC_QK="tf32x3"),
    "mixed, accurate dots tf32x3, logits ieee": dict(PREC="tf32x3", PREC_QK="ieee"),
    "mixed, accurate dots tf32x3, logits bf16": dict(PREC="tf32x3", PREC_QK="bf16"),
    "mixed, accurate dots tf32x3, CG logits tf32x3": dict(PREC="tf32x3", PREC_QK="tf32x3", PREC_CGQ="tf32x3"),
}


def run(dtype, precision, T, D, ridge, override=None):
    orig = F.block_config
    if override:
        F.block_config = lambda *a, **kw: {**orig(*a, **kw), **override}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _forced_precision(precision):
                err, naive = cases.half_precision_errors(dtype, T=T, D=D, ridge=ridge)
                q, k, v = (t.to(dtype) for t in cases.make_qkv(1, T, 2, D, seed=21))
                _, aux = lla.local_linear_attention(q, k, v, ridge=ridge, backend="triton", solver="cg",
                                                    return_aux=True, tol=1e-6)
    finally:
        F.block_config = orig
    warned = any(issubclass(w.category, lla.LLAConvergenceWarning) for w in caught)
    return err, naive, aux, warned


def robustness_grid(precision: str) -> None:
    """The robustness grid's Triton cases (``benchmarks/robustness.py``: the same design and selection)
    with the Triton backend forced to ``precision``; prints the counts per input dtype and the flagged
    cases, classified as the grid does."""
    import robustness as R

    cases = R.design(False, 60)
    tri = [dict(c, path="triton") for c in cases
           if c["T"] <= 64 and c["D"] <= 32 and c["dtype"] != "fp64" and c["solver"] == "cg"][::2]
    with _forced_precision(precision):
        res = R.run_all(tri, 2)
    counts = {}
    for r in res:
        k = R.classify(r)
        c = counts.setdefault(r["case"]["dtype"], dict(cases=0, nonfinite=0, silent_misses=0, false_alarms=0,
                                                       conditioning=0, warned=0))
        c["cases"] += 1
        c["nonfinite"] += int(k["bad"])
        c["silent_misses"] += int(k["miss"])
        c["false_alarms"] += int(k["alarm"])
        c["conditioning"] += int(k["cond_alarm"])
        c["warned"] += int(bool(r.get("warned")))
        if k["bad"] or k["miss"] or k["alarm"]:
            print(f"flagged: {R._label(r['case'])}: error {k['err']:.2g}, warned {r.get('warned')}")
    for dt, c in counts.items():
        print(f"{precision} {dt}: " + ", ".join(f"{n} {v}" for n, v in c.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default=None, choices=["fp32", "mixed"],
                    help="instead: the robustness grid's Triton cases at this precision (counts as the grid's)")
    ap.add_argument("--quick", action="store_true", help="only (T, D) = (64, 16), ridge 1")
    ap.add_argument("--ablation", action="store_true", help="also the float32 mixed-precision variants")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--precisions", nargs="*", default=["fp32", "mixed", "authors"])
    ap.add_argument("--shapes", nargs="+", default=None, help="T,D,ridge triples, e.g. 64,16,1 100,48,0.1")
    ap.add_argument("--no-header", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.grid:
        robustness_grid(args.grid)
        return
    shapes = [(64, 16, 1.0)] if args.quick else [(64, 16, 1.0), (100, 48, 1.0), (100, 48, 0.1)]
    if args.shapes:
        shapes = [(int(a), int(b), float(c)) for a, b, c in (x.split(",") for x in args.shapes)]
    if not args.no_header:
        print("| dtype | precision | T, D, ridge | o | dq | dk | dv | dridge | naive o / dq / dk / dv "
              "| max ratio to naive | iters | residual |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in (getattr(torch, n) for n in args.dtypes):
        variants = [(p, p, None) for p in args.precisions]
        if args.ablation and dtype == torch.float32:
            variants += [(name, "mixed", ov) for name, ov in ABLATION.items()]
        for label, precision, override in variants:
            for T, D, ridge in shapes:
                err, naive, aux, warned = run(dtype, precision, T, D, ridge, override)
                ratio = max(err[n] / naive[n] for n in NAMES)
                cells = " | ".join(f"{err[n]:.1e}" for n in (*NAMES, "dridge"))
                nv = " / ".join(f"{naive[n]:.1e}" for n in NAMES)
                print(f"| {str(dtype)[6:]} | {label} | {T}, {D}, {ridge:g} | {cells} | {nv} | {ratio:.2f} | {aux.iters} | "
                      f"{aux.residual:.1e}{' (warned)' if warned else ''} |", flush=True)


if __name__ == "__main__":
    main()
