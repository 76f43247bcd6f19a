"""Ahead-of-time compile of a mechanism's Triton kernels for a CUDA arch on a CPU machine (Triton ->
cubin): checks that they compile (the interpreter is more lenient than the compiler) and prints
shared memory, registers and spill stack per thread for the tiles ``block_config`` picks.

    PYTHONPATH=src python benchmarks/compile_check.py lla      [--arch 90] [--D 64 128] [--dtypes bf16 fp32]
    PYTHONPATH=src python benchmarks/compile_check.py parallax [--arch 90] [--D 64 128] [--dtypes bf16 fp32] [--sweep]

``--sweep`` compiles every kernel at each of ``SWEEP`` (BLOCK_M, BLOCK_N, num_warps) instead of the
tiles ``block_config`` picks (how Parallax's were chosen: the least spill stack per kernel).
``python benchmarks/bench_gpu.py --compile-check`` runs the ``lla`` case.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SWEEP = [(64, 32, 4), (32, 64, 4), (32, 32, 4), (64, 64, 8), (64, 32, 8), (128, 32, 8), (16, 64, 4)]
#: kernel arguments by name: 32-bit ints, float32 scalars, int32 pointers (other pointers: the
#: input dtype when the mechanism lists them in ``typed``, else float32)
INTS = ("T", "S", "H", "Hk", "D", "Dv", "max_iters", "n_tiles")
SCALARS = ("scale", "tol")
INT_POINTERS = ("LO", "HI", "QLO", "QHI", "ITERS", "PIV")


def lla_kernels(D: int, dtype: torch.dtype):
    """LLA: ``(typed pointers, [(name, kernel, (BLOCK_M, BLOCK_N, warps), constexprs)])`` for every
    precision the dtype runs (float32: ``fp32`` and ``mixed``; bf16/fp16: ``mixed``)."""
    from lla.ops.lla.triton_backend import kernels as K
    from lla.ops.lla.triton_backend.function import block_config

    out = []
    for precision in (["fp32", "mixed"] if dtype == torch.float32 else ["mixed"]):
        bc = block_config(D, D, dtype, precision)
        for which, fn, precond in (("fwd", K.lla_fwd_kernel, True), ("bwd_q", K.lla_bwd_query_kernel, True),
                                   ("bwd_k", K.lla_bwd_key_kernel, False)):
            const = {n: bc[n] for n in ("BLOCK_D", "BLOCK_DV", "PREC", "PREC_QK", "MIXED", "PREC_CG", "PREC_CGQ",
                                        "REFINE", "INNER")}
            const.update(BLOCK_M=bc[which][0], BLOCK_N=bc[which][1], EMU=0)
            if precond:
                const["PRECOND"] = True
            if which != "fwd":
                const["SHIFT_M"] = bc["fwd"][0]
            out.append((f"{which}/{precision}", fn, bc[which], const))
    return ("Q", "V", "O", "DO", "DQ", "DK", "DV"), out


def parallax_kernels(D: int, dtype: torch.dtype):
    """Parallax: ``(typed pointers, [(name, kernel, (BLOCK_M, BLOCK_N, warps), constexprs)])``."""
    from lla.ops.parallax import triton_backend as P

    bc = P.block_config(D, D, dtype)
    out = []
    for which, fn in (("fwd", P.parallax_fwd_kernel), ("bwd_q", P.parallax_bwd_query_kernel),
                      ("bwd_k", P.parallax_bwd_key_kernel)):
        const = dict(BLOCK_M=bc[which][0], BLOCK_N=bc[which][1], BLOCK_D=bc["BLOCK_D"], BLOCK_DV=bc["BLOCK_DV"],
                     PREC=bc["PREC"][which], PREC_QK=bc["PREC_QK"], EMU=0)
        out.append((which, fn, bc[which], const))
    return ("Q", "R", "K", "V", "O", "DO", "DQ", "DR", "DK", "DV"), out


MECHANISMS = {"lla": lla_kernels, "parallax": parallax_kernels}


def signature(fn, const: dict, typed, dtname: str) -> dict:
    """Triton signature of ``fn``: every argument's type by name (see ``INTS`` and friends)."""
    sig = {}
    for arg in fn.arg_names:
        if arg in const:
            sig[arg] = "constexpr"
        elif arg in INTS:
            sig[arg] = "i32"
        elif arg in SCALARS:
            sig[arg] = "fp32"
        elif arg in INT_POINTERS:
            sig[arg] = "*i32"
        else:
            sig[arg] = "*" + dtname if arg in typed else "*fp32"
    return sig


def compile_kernel(fn, sig: dict, const: dict, arch: int, warps: int):
    """Compile for ``sm_<arch>`` -> ``(shared memory bytes, "REG:.. STACK:.." from cuobjdump or "")``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = ""
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kern.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
        os.unlink(f.name)
        usage = " ".join(ln.strip().split(" SHARED")[0] for ln in out.stdout.splitlines() if "REG:" in ln)
    return kern.metadata.shared, usage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mechanism", choices=sorted(MECHANISMS))
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--D", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--sweep", action="store_true", help="compile every kernel at each tile of SWEEP")
    a = p.parse_args(argv)
    for D in a.D:
        for dt in a.dtypes:
            typed, kernels = MECHANISMS[a.mechanism](D, DTYPES[dt])
            tiles = [(w, fn, cfg, c) for cfg in SWEEP for w, fn, _, c in kernels] if a.sweep else kernels
            for which, fn, (bm, bn, warps), const in tiles:
                const = {**const, "BLOCK_M": bm, "BLOCK_N": bn}
                t0 = time.perf_counter()
                shared, usage = compile_kernel(fn, signature(fn, const, typed, dt), const, a.arch, warps)
                print(f"sm_{a.arch} D={D:<4} {dt:>5} {which:>6} tiles {bm}x{bn} warps {warps}  "
                      f"smem {shared:>6} B  {usage}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
