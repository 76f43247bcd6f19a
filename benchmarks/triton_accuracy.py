"""Accuracy of the Triton kernels under the interpreter, with the GPU's dot rounding emulated.

    python benchmarks/triton_accuracy.py [--quick]

Runs on CPU (sets ``TRITON_INTERPRET=1`` itself).  For float32, bfloat16 and float16 inputs: the
relative RMS error (``||a - b|| / ||b||``) against the float64 reference of the output and of the
gradients of q, k, v and the ridge (cotangent fixed), next to a naive same-dtype LLA (straight from
the math, solve in float32), and the worst true relative residual the op reports.

Modes: ``tf32-rne`` (default under the interpreter: every ``tl.dot`` operand rounded to TF32,
nearest-even, where the kernel asks for TF32; ``tf32x3`` emulated as its three TF32 products),
``tf32-trunc`` (truncated instead: the worst case if the tensor cores drop the low bits), ``off``
(no emulation: what the interpreter alone checks), and for the half dtypes ``all-tf32`` (every dot
in plain TF32, the precision the kernels used before the non-logit dots moved to ``tf32x3``).
Shapes: causal, B = 1, H = 2, (T, D) in {(64, 16), (100, 48)}, ridge 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import lla  # noqa: E402
import triton_interp_cases as cases  # noqa: E402
from lla.ops.lla.triton_backend import function as F  # noqa: E402

NAMES = ("o", "dq", "dk", "dv")


def run(dtype, mode, T, D):
    half_prec = F._HALF_PREC
    os.environ["LLA_TRITON_EMULATE"] = {"tf32-rne": "1", "tf32-trunc": "trunc", "off": "0", "all-tf32": "1"}[mode]
    if mode == "all-tf32":
        F._HALF_PREC = "tf32"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            err, naive = cases.half_precision_errors(dtype, T=T, D=D)
            q, k, v = (t.to(dtype) for t in cases.make_qkv(1, T, 2, D, seed=21))
            _, aux = lla.local_linear_attention(q, k, v, ridge=1.0, backend="triton", solver="cg", return_aux=True)
    finally:
        F._HALF_PREC = half_prec
    warned = any(issubclass(w.category, lla.LLAConvergenceWarning) for w in caught)
    return err, naive, aux.residual, warned


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only (T, D) = (64, 16)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    shapes = [(64, 16)] if args.quick else [(64, 16), (100, 48)]
    print("| dtype | mode | T, D | o | dq | dk | dv | dridge | naive o / dq / dk / dv | max ratio to naive "
          "| residual |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        modes = ["tf32-rne", "tf32-trunc", "off"] + (["all-tf32"] if dtype != torch.float32 else [])
        for mode in modes:
            for T, D in shapes:
                err, naive, res, warned = run(dtype, mode, T, D)
                ratio = max(err[n] / naive[n] for n in NAMES)
                cells = " | ".join(f"{err[n]:.1e}" for n in (*NAMES, "dridge"))
                nv = " / ".join(f"{naive[n]:.1e}" for n in NAMES)
                print(f"| {str(dtype)[6:]} | {mode} | {T}, {D} | {cells} | {nv} | {ratio:.2f} | "
                      f"{res:.1e}{' (warned)' if warned else ''} |", flush=True)
    os.environ.pop("LLA_TRITON_EMULATE", None)


if __name__ == "__main__":
    main()
