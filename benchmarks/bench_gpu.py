"""GPU benchmark: the LLA Triton kernels' precisions vs SDPA, with accuracy and peak memory.

    python benchmarks/bench_gpu.py                      # B=1 H=8 T=4096 D=64 causal, ridge 1 and 0.01 (< 10 min)
    python benchmarks/bench_gpu.py --T 1024 4096 16384 --D 64 128 --ridges 1 --json r.json --markdown r.md
    python benchmarks/bench_gpu.py --T 8192 --ridges 1 --dtypes bf16 --modes fwd
    python benchmarks/bench_gpu.py --dry                # CPU: the same code on a tiny case, interpreted
    python benchmarks/bench_gpu.py --compile-check      # CPU: compile_check.py for sm_90 at --D / --dtypes

Rows per (dtype, ridge, mode), all in one run so that the ratios compare like with like:

* ``sdpa``          ``torch.nn.functional.scaled_dot_product_attention``, causal (flash for bf16/fp16);
* ``lla-fp32``      ``precision="fp32"``: plain float32 solves (``ieee`` dots, no tensor cores); fp32 inputs only;
* ``lla-mixed``     ``precision="mixed"``: CG iterations as bf16 (fp16) tensor-core products inside
                    reliable updates with TF32x3 true residuals; float32 accuracy;
* ``lla-authors``   the authors' FlashLLA scheme as a reference point, our implementation of it: every
                    product in bf16 (fp16), plain CG for a fixed 32 iterations, no refinement;
* ``lla-mixed-wg``  (on request) ``mixed`` with 64-row tiles (Hopper wgmma, more register spilling);
* ``parallax``      ``lla.parallax_attention`` on the Triton backend (a second, random ``r``), the
                    closed-form sibling (no solve): what LLA's solve costs on top.

Every (dtype, ridge, mode, D, T) is one group; ``--T`` and ``--D`` take several values.  The float64
reference (and so the error columns) is computed for ``T <= --ref-max-T`` only.  ``--json`` /
``--markdown`` write the rows (``benchmarks/gpu_check.py`` uses both).

Columns: milliseconds (``triton.testing.do_bench``, median), the ratio to SDPA, peak memory allocated
during one call beyond what was allocated before it, the CG iterations of the slowest row (forward), and
the relative RMS error against float64 (the PyTorch backend, direct solver, float64, on the first
``--ref-heads`` heads): the output, and for ``fwdbwd`` the worst of dq, dk, dv.  A time budget
(``--budget-s``, default 540 s) skips the configurations left when it runs out (compilation included),
so the default run ends within 10 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the triton import (inside lla's backend)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import lla  # noqa: E402
from lla.ops.lla import api as _api  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("sdpa", "lla-fp32", "lla-mixed", "lla-authors", "parallax", "lla-mixed-wg")
DEFAULT_IMPLS = IMPLS[:5]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[4096])
    p.add_argument("--D", type=int, nargs="+", default=[64], help="head dims")
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--ridges", type=float, nargs="+", default=[1.0, 0.01])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS,
                   help="lla-mixed-wg: the mixed precision with 64-row (wgmma) tiles instead of 16-row ones")
    p.add_argument("--ref-heads", type=int, default=2, help="heads checked against the float64 reference")
    p.add_argument("--ref-max-T", type=int, default=4096, help="float64 reference (error columns) up to this T")
    p.add_argument("--json", help="write the rows (and the device) here")
    p.add_argument("--markdown", help="write the rows as a Markdown table here")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip what is left after this many seconds")
    p.add_argument("--dry", action="store_true", help="CPU: run a tiny case through the same code, interpreted")
    p.add_argument("--compile-check", action="store_true",
                   help="compile the three kernels for --arch (no GPU needed) at each --D / --dtypes / "
                        "precision and print shared memory, registers and spill stack per thread")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-check")
    return p.parse_args(argv)


class _forced_precision:
    """Run the Triton backend at ``precision`` (and, for the authors' scheme, 32 fixed iterations)
    inside the block, whatever the public op passes."""

    def __init__(self, precision):
        self.precision, self.tiles = precision, None
        if precision is not None and precision.endswith("-wg"):
            self.precision, self.tiles = precision[:-3], "wgmma"

    def __enter__(self):
        self.orig = _api._backend_fn
        orig, prec = self.orig, self.precision
        if self.tiles is not None:
            from lla.ops.lla.triton_backend import function as F

            self.F, self.old_tiles = F, F.MIXED_TILES
            F.MIXED_TILES = self.tiles

        def pick(name):
            fn = orig(name)
            if name != "triton":
                return fn

            def run(q, k, v, ridge, varlen, config):  # the backend contract (``lla.ops.common.result``)
                change = {} if prec is None else dict(precision=prec)
                if prec == "authors":  # fixed 32 iterations: no tolerance exit, no preconditioner
                    change.update(max_iters=32, tol=1e-30, precondition=False)
                return fn(q, k, v, ridge, varlen, dataclasses.replace(config, **change))

            return run

        _api._backend_fn = pick
        return self

    def __exit__(self, *exc):
        _api._backend_fn = self.orig
        if self.tiles is not None:
            self.F.MIXED_TILES = self.old_tiles


def _sdpa(q, k, v, cuda: bool):
    """Causal SDPA in [B, T, H, D] layout; the flash backend for half inputs on CUDA."""
    F = torch.nn.functional
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)


def _bench(fn, cuda: bool) -> float:
    if cuda:
        import triton

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def _peak_mib(fn, cuda: bool) -> float:
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run_config(dtname, ridge, mode, args, cuda, device, deadline, T, D):
    dtype = DTYPES[dtname]
    B, H = args.B, args.H
    g = torch.Generator(device="cpu").manual_seed(T + D)
    q, k, v, do, r = (torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(5))
    grad = mode == "fwdbwd"
    nh = min(args.ref_heads, H)

    # float64 reference on the first heads (the same rounded inputs), up to --ref-max-T
    ref = ref_g = None
    if T <= args.ref_max_T:
        qr, kr, vr = (t.detach()[:, :, :nh].double().requires_grad_(grad) for t in (q, k, v))
        ref = lla.local_linear_attention(qr, kr, vr, ridge=ridge, causal=True, solver="direct", backend="torch")
        ref_g = torch.autograd.grad(ref, (qr, kr, vr), do[:, :, :nh].double()) if grad else None
        ref = ref.detach()
        del qr, kr, vr
    px_ref = px_ref_g = None
    if T <= args.ref_max_T and "parallax" in args.impls:  # Parallax's own float64 reference (PyTorch backend)
        qr, rr, kr, vr = (t.detach()[:, :, :nh].double().requires_grad_(grad) for t in (q, r, k, v))
        px_ref = lla.parallax_attention(qr, rr, kr, vr, causal=True, backend="torch")
        px_ref_g = torch.autograd.grad(px_ref, (qr, kr, vr), do[:, :, :nh].double()) if grad else None
        px_ref = px_ref.detach()
        del qr, rr, kr, vr

    impls = {}
    for name in args.impls:
        if name == "sdpa":
            impls[name] = (None, lambda qq, kk, vv: _sdpa(qq, kk, vv, cuda))
        elif name == "parallax":
            impls[name] = (None, lambda qq, kk, vv: lla.parallax_attention(qq, r, kk, vv, causal=True,
                                                                           backend="triton"))
        elif name == "lla-fp32" and dtype != torch.float32:
            continue
        else:
            prec = name.split("-", 1)[1]  # fp32 | mixed | authors | mixed-wg
            impls[name] = (prec, lambda qq, kk, vv: lla.local_linear_attention(
                qq, kk, vv, ridge=ridge, causal=True, solver="cg", backend="triton"))

    rows, ms_sdpa = [], float("nan")
    for name, (prec, fn) in impls.items():
        if time.time() > deadline:
            print(f"{dtname:>5} {ridge:>6g} {mode:>7} {D:>4} {T:>6} {name:>12}  skipped (time budget)", flush=True)
            continue
        qq, kk, vv = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))

        def go():
            for t in (qq, kk, vv):
                t.grad = None
            o = fn(qq, kk, vv)
            if grad:
                o.backward(do)
            return o

        with warnings.catch_warnings(record=True) as caught, _forced_precision(prec):
            warnings.simplefilter("always")
            t0 = time.time()
            o = go()  # compiles
            first = time.time() - t0
            iters = -1
            if name.startswith("lla"):
                with torch.no_grad():
                    iters = lla.local_linear_attention(q, k, v, ridge=ridge, causal=True, solver="cg", backend="triton",
                                                       return_aux=True)[1].iters
            ms = _bench(go, cuda) if cuda else 1e3 * first  # dry run: the one interpreted call
            peak = _peak_mib(go, cuda)
        warned = any(issubclass(w.category, lla.LLAConvergenceWarning) for w in caught)
        r_o, r_g = (px_ref, px_ref_g) if name == "parallax" else (ref, ref_g) if name.startswith("lla") else (None, None)
        err = _rel(o.detach()[:, :, :nh], r_o) if r_o is not None else float("nan")
        gerr = float("nan")
        if grad and r_o is not None:
            gerr = max(_rel(t.grad[:, :, :nh], rg) for t, rg in zip((qq, kk, vv), r_g))
        if name == "sdpa":
            ms_sdpa = ms
        rows.append((name, ms, peak, iters, err, gerr, warned, first))
        del o
    out = []
    for name, ms, peak, iters, err, gerr, warned, first in rows:
        print(f"{dtname:>5} {ridge:>6g} {mode:>7} {D:>4} {T:>6} {name:>12} {ms:>10.3f} {ms / ms_sdpa:>8.2f}x "
              f"{peak:>9.1f} {iters if iters >= 0 else '':>5} {err:>9.2e} {gerr:>9.2e} {'yes' if warned else '':>6} "
              f"{first:>7.1f}", flush=True)
        out.append(dict(dtype=dtname, ridge=ridge, mode=mode, D=D, T=T, B=B, H=H, impl=name, ms=ms,
                        vs_sdpa=ms / ms_sdpa, peak_mib=peak, iters=iters, o_err=err, grad_err=gerr, warned=warned,
                        first_s=first))
    return out


def markdown(rows) -> str:
    """The rows as a Markdown table (one line per implementation and configuration)."""
    def f(x, spec):
        return "" if x != x else format(x, spec)  # NaN -> empty

    lines = ["| dtype | ridge | mode | D | T | impl | ms | vs SDPA | peak MiB | iters | o err | grad err | warned | "
             "first call s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['ridge']:g} | {r['mode']} | {r['D']} | {r['T']} | {r['impl']} | "
                     f"{f(r['ms'], '.3f')} | {f(r['vs_sdpa'], '.2f')} | {f(r['peak_mib'], '.1f')} | "
                     f"{r['iters'] if r['iters'] >= 0 else ''} | {f(r['o_err'], '.1e')} | {f(r['grad_err'], '.1e')} | "
                     f"{'yes' if r['warned'] else ''} | {r['first_s']:.1f} |")
    return "\n".join(lines) + "\n"


def compile_check(args) -> int:
    """Ahead-of-time compile (Triton -> cubin) of the kernels with the tiles ``block_config`` picks
    (``benchmarks/compile_check.py lla``)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compile_check as cc

    return cc.main(["--arch", str(args.arch), "--D", *map(str, args.D), "--dtypes", *args.dtypes])


def main(argv=None) -> int:
    args = parse(argv)
    if args.compile_check:
        return compile_check(args)
    cuda = torch.cuda.is_available()
    if args.dry:
        args.T, args.D, args.H, args.ridges, args.modes = [8], [16], 1, [1.0], ["fwdbwd"]
        args.dtypes = ["fp32"]
        args.budget_s = float("inf")  # the interpreter on a loaded CPU may take minutes: run every row
        cuda, device = False, "cpu"
    else:
        if not cuda:
            print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False). "
                  "Run `python benchmarks/bench_gpu.py --dry` to check the script on CPU.", file=sys.stderr)
            return 2
        device = "cuda"
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    dev_name = torch.cuda.get_device_name() if cuda else "cpu (interpreter)"
    print(f"B={args.B} H={args.H} T={args.T} D={args.D} causal; errors: relative RMS vs float64 "
          f"(first {args.ref_heads} heads, T <= {args.ref_max_T}); first = seconds of the first call (compilation)")
    print(f"{'dtype':>5} {'ridge':>6} {'mode':>7} {'D':>4} {'T':>6} {'impl':>12} {'ms':>10} {'vs sdpa':>9} "
          f"{'peak MiB':>9} {'iters':>5} {'o err':>9} {'grad err':>9} {'warned':>6} {'first':>7}")
    deadline = time.time() + args.budget_s
    rows = []
    for D in args.D:
        for T in args.T:
            for dtname in args.dtypes:
                for ridge in args.ridges:
                    for mode in args.modes:
                        try:
                            rows += run_config(dtname, ridge, mode, args, cuda, device, deadline, T, D)
                        except torch.OutOfMemoryError:
                            print(f"{dtname:>5} {ridge:>6g} {mode:>7} {D:>4} {T:>6}  out of memory", flush=True)
                            torch.cuda.empty_cache()
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(dict(device=dev_name, torch=torch.__version__, args=vars(args), rows=rows), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{dev_name}, B={args.B} H={args.H}, causal\n\n" + markdown(rows))
    if args.dry:
        print("dry run ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
