"""Parallax accuracy: output and gradients of every dtype against the float64 reference, and
prefill + token-by-token decoding against the full forward.

    PYTHONPATH=src python benchmarks/parallax_accuracy.py [--triton [--ablation]]
        [--out benchmarks/results/parallax_accuracy.md]

Inputs: B = 2, T = S = 256, H = 4, Hk = 2 (grouped-query), D = Dv = 64, causal, ``q, k, v ~ N(0, 1)``,
``r ~ N(0, 1) / sqrt(D)`` (case "typical"), and the same with keys and ``r`` sharing a large common
direction so that ``r . k ~ 9000 + O(1)`` (case "r.k offset", where ``1 + c - r . k`` cancels unless
centred per row).  Errors are relative RMS (``||x - x_ref|| / ||x_ref||``) of ``o`` and of the
gradients of ``sum(o * do)`` w.r.t. ``q, r, k, v``; "naive" is the reference formula run in the same
dtype (the baseline the tests hold half precision to: no worse than 2x naive).  ``--triton`` adds
the Triton kernels run by the interpreter (CPU; slow, smaller T) with the GPU's dot rounding
emulated (``lla.ops.common.triton_utils``); ``--ablation`` adds their half-precision error per
dot-precision variant.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import lla

NAMES = ("o", "dq", "dr", "dk", "dv")


def inputs(case, B=2, T=256, H=4, Hk=2, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    r = torch.randn(B, T, H, D, generator=g, dtype=torch.float64) / D**0.5
    k = torch.randn(B, T, Hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, Hk, D, generator=g, dtype=torch.float64)
    if case == "r.k offset":
        u = torch.nn.functional.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
        k, r = k + 300 * u, r + 30 * u
    do = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    return (q, r, k, v), do


def run(fn, x, do, dtype):
    xs = [t.detach().to(dtype).requires_grad_() for t in x]
    o = fn(*xs)
    (o.double() * do).sum().backward()
    return [o] + [t.grad for t in xs]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def accuracy_rows(backends, T):
    rows = []
    for case in ("typical", "r.k offset"):
        x, do = inputs(case, T=T)
        want = run(lla.parallax_attention_ref, x, do, torch.float64)
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            naive = run(lla.parallax_attention_ref, x, do, dtype)
            for backend in backends:
                if backend == "triton" and dtype == torch.float64:
                    continue  # float64 runs the PyTorch backend
                got = run(lambda *a: lla.parallax_attention(*a, backend=backend), x, do, dtype)
                rows.append(dict(case=case, dtype=str(dtype).replace("torch.", ""), backend=backend,
                                 errs=[rel(g, w) for g, w in zip(got, want)],
                                 naive=[rel(n, w) for n, w in zip(naive, want)]))
    return rows


#: dot-precision variants of the ablation (``--ablation``): per kernel, the precision of the dots
#: with a float32 intermediate operand for half inputs (the raw-input dots are TF32 throughout)
ABLATION = {
    "chosen": None,
    "tf32x3 everywhere": dict(fwd="tf32x3", bwd_q="tf32x3", bwd_k="tf32x3"),
    "tf32 in fwd": dict(fwd="tf32", bwd_q="tf32x3", bwd_k="tf32x3"),
    "tf32 in bwd_q": dict(fwd="tf32x3", bwd_q="tf32", bwd_k="tf32x3"),
    "tf32 in bwd_k": dict(fwd="tf32x3", bwd_q="tf32x3", bwd_k="tf32"),
    "tf32 everywhere": dict(fwd="tf32", bwd_q="tf32", bwd_k="tf32"),
}


def ablation_rows(T):
    """The Triton kernels' own error under the TF32 emulation, per dot-precision variant: against the
    exact (float64) result for the half-rounded inputs, in units of that result correctly rounded to
    the dtype (1.0 = as good as rounding the exact answer)."""
    from lla.ops.parallax import triton_backend as P

    rows = []
    chosen = {dt: dict(p) for dt, p in P._HALF_PREC.items()}
    for case in ("typical", "r.k offset"):
        x, do = inputs(case, T=T)
        for dtype in (torch.bfloat16, torch.float16):
            xs = [t.to(dtype).double() for t in x]
            dos = do.to(dtype).double()
            exact = run(lla.parallax_attention_ref, xs, dos, torch.float64)
            floor = [rel(w.to(dtype), w) for w in exact]
            for name, prec in ABLATION.items():
                P._HALF_PREC[dtype] = dict(chosen[dtype] if prec is None else prec)
                try:
                    got = run(lambda *a: lla.parallax_attention(*a, backend="triton"), xs, dos, dtype)
                finally:
                    P._HALF_PREC[dtype] = dict(chosen[dtype])
                label = name + (f" ({', '.join(f'{k} {v}' for k, v in chosen[dtype].items())})" if prec is None else "")
                rows.append(dict(case=case, dtype=str(dtype).replace("torch.", ""), variant=label,
                                 ratios=[rel(g, w) / f for g, w, f in zip(got, exact, floor)], floor=floor))
    return rows


def decode_rows(T=256, prefill=64):
    """Prefill ``prefill`` tokens, then decode one token at a time; compare with the full forward."""
    rows = []
    B, H, Hk, D = 2, 4, 2, 64
    for dtype in (torch.float64, torch.float32):
        for window in ((-1, -1), (31, -1)):
            (q, r, k, v), _ = inputs("typical", B=B, T=T, H=H, Hk=Hk, D=D, seed=1)
            q, r, k, v = (t.to(dtype) for t in (q, r, k, v))
            full = lla.parallax_attention(q, r, k, v, window_size=window)
            kc = torch.zeros(B, T, Hk, D, dtype=dtype)
            vc = torch.zeros_like(kc)
            outs = [lla.parallax_attention_with_kvcache(q[:, :prefill], r[:, :prefill], kc, vc, k[:, :prefill],
                                                        v[:, :prefill], cache_seqlens=0, window_size=window)]
            for t in range(prefill, T):
                outs.append(lla.parallax_attention_with_kvcache(q[:, t : t + 1], r[:, t : t + 1], kc, vc, k[:, t : t + 1],
                                                                v[:, t : t + 1], cache_seqlens=t, window_size=window))
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), window=window, err=rel(torch.cat(outs, 1), full)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--triton", action="store_true", help="also the Triton kernels under the interpreter (T = 64)")
    p.add_argument("--ablation", action="store_true",
                   help="with --triton: the half-precision dot-precision ablation under the TF32 emulation (T = 64)")
    p.add_argument("--out", default="benchmarks/results/parallax_accuracy.md")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    flags = (" --triton" if a.triton else "") + (" --ablation" if a.ablation and a.triton else "")
    lines = [f"Command: `python benchmarks/parallax_accuracy.py{flags}` (torch {torch.__version__})", ""]
    if a.triton:
        from lla.ops.common.triton_utils import emulation_mode

        lines += [f"Triton rows: kernels run by the Triton interpreter on CPU with the GPU's dot rounding emulated "
                  f"(emulation mode {emulation_mode()}: 1 = TF32 round to nearest even; bf16 stores rounded to "
                  "nearest even), not on a GPU.", ""]
    lines += ["Relative RMS error vs the float64 reference (B=2, T=256, H=4, Hk=2, D=Dv=64, causal); "
              "in brackets: the reference formula run in that dtype (naive).", "",
              "| case | dtype | backend | o | dq | dr | dk | dv |", "|---|---|---|---:|---:|---:|---:|---:|"]
    rows = accuracy_rows(["torch"], 256)
    if a.triton:
        rows += [dict(r, case=r["case"] + " (T=64)") for r in accuracy_rows(["triton"], 64)]
    for r in rows:
        cells = [f"{e:.1e} ({n:.1e})" for e, n in zip(r["errs"], r["naive"])]
        lines.append(f"| {r['case']} | {r['dtype']} | {r['backend']} | " + " | ".join(cells) + " |")
    if a.triton and a.ablation:
        lines += ["", "Dot precision of the Triton kernels for half inputs (emulated; B=2, T=64, H=4, Hk=2, "
                  "D=Dv=64, causal): error against the exact result for the half-rounded inputs, in units of that result correctly "
                  "rounded to the dtype (floor in brackets, relative RMS). Raw-input dots (q.k, r.k, do.v) are TF32 "
                  "in every variant; the variant sets the other dots per kernel.", "",
                  "| case | dtype | variant | o | dq | dr | dk | dv |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in ablation_rows(64):
            lines.append(f"| {r['case']} | {r['dtype']} | {r['variant']} | "
                         + " | ".join(f"{x:.2f} ({f:.1e})" for x, f in zip(r["ratios"], r["floor"])) + " |")
    lines += ["", "Prefill 64 tokens, then decode token by token to T = 256 (B=2, H=4, Hk=2, D=64), vs the full "
              "forward:", "", "| dtype | window | rel err |", "|---|---|---:|"]
    for r in decode_rows():
        lines.append(f"| {r['dtype']} | {r['window']} | {r['err']:.1e} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    if "--triton" in sys.argv:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.exit(main())
