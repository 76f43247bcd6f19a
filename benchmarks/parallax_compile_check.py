"""Ahead-of-time compile of the Parallax Triton kernels for a CUDA arch on a CPU machine (Triton ->
cubin): checks that they compile (the interpreter is more lenient than the compiler) and prints
shared memory, registers and spill stack per thread for the tiles ``block_config`` picks.

    PYTHONPATH=src python benchmarks/parallax_compile_check.py [--arch 90] [--D 64 128] [--dtypes bf16 fp32] [--sweep]

``--sweep`` compiles every kernel at each of ``SWEEP`` (BLOCK_M, BLOCK_N, num_warps) instead of the
tiles ``block_config`` picks (how those were chosen: the least spill stack per kernel).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lla.ops.parallax import triton_backend as P

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SWEEP = [(64, 32, 4), (32, 64, 4), (32, 32, 4), (64, 64, 8), (64, 32, 8), (128, 32, 8), (16, 64, 4)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--D", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--sweep", action="store_true", help="compile every kernel at each tile of SWEEP")
    a = p.parse_args(argv)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    kernels = [("fwd", P.parallax_fwd_kernel), ("bwd_q", P.parallax_bwd_query_kernel), ("bwd_k", P.parallax_bwd_key_kernel)]
    ints = ("T", "S", "H", "Hk", "D", "Dv")
    for D in a.D:
        for dt in a.dtypes:
            bc = P.block_config(D, D, DTYPES[dt])
            tiles = [(which, fn, cfg) for cfg in SWEEP for which, fn in kernels] if a.sweep else \
                [(which, fn, bc[which]) for which, fn in kernels]
            for which, fn, (bm, bn, warps) in tiles:
                const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bc["BLOCK_D"], BLOCK_DV=bc["BLOCK_DV"],
                             PREC=bc["PREC"][which], PREC_QK=bc["PREC_QK"], EMU=0)
                sig = {}
                for arg in fn.arg_names:
                    if arg in const:
                        sig[arg] = "constexpr"
                    elif arg in ints:
                        sig[arg] = "i32"
                    elif arg == "scale":
                        sig[arg] = "fp32"
                    elif arg in ("Q", "R", "K", "V", "O", "DO", "DQ", "DR", "DK", "DV"):
                        sig[arg] = "*" + dt
                    elif arg in ("LO", "HI", "QLO", "QHI"):
                        sig[arg] = "*i32"
                    else:
                        sig[arg] = "*fp32"
                t0 = time.perf_counter()
                kern = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                                      target=GPUTarget("cuda", a.arch, 32), options=dict(num_warps=warps))
                usage = ""
                if os.path.exists(cuobjdump):
                    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                        f.write(kern.asm["cubin"])
                    out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
                    os.unlink(f.name)
                    usage = " ".join(ln.strip().split(" SHARED")[0] for ln in out.stdout.splitlines() if "REG:" in ln)
                print(f"sm_{a.arch} D={D:<4} {dt:>5} {which:>6} tiles {bm}x{bn} warps {warps}  "
                      f"smem {kern.metadata.shared:>6} B  {usage}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
