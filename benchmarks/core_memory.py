"""Peak memory of one LLA forward (and forward+backward) versus what the reference would need.

    python benchmarks/core_memory.py [--T 8192 --H 4 --D 32 --dtype float32]

Each measurement runs in a fresh subprocess: peak RSS (ru_maxrss) after building the inputs is
the baseline, the peak after the call minus that baseline is the extra memory of the op.  The
reference's need is computed from its shapes (it materialises z [B, H, T, S, D] and
Sigma [B, H, T, D, D]), since running it at this size is impossible.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
import lla
T, H, D, dtype, mode, solver = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
dt = getattr(torch, dtype)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, T, H, D, generator=g).to(dt) for _ in range(3))
if mode == "fwdbwd":
    for t in (q, k, v):
        t.requires_grad_(True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
o = lla.local_linear_attention(q, k, v, ridge=1.0, solver=solver, backend="torch")
if mode == "fwdbwd":
    o.backward(torch.ones_like(o))
dt_s = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mib": (peak - base) / 1024, "seconds": dt_s}))
"""


def measure(T, H, D, dtype, mode, solver):
    out = subprocess.run([sys.executable, "-c", CHILD, str(T), str(H), str(D), dtype, mode, solver], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    T, H, D = args.T, args.H, args.D
    ref_bytes = 8 * (H * T * T * D + H * T * D * D + 3 * H * T * T)  # z, Sigma, logits/s/weights in fp64
    inputs_mib = 3 * T * H * D * 4 / 2**20
    print(f"T={T} H={H} D={D} {args.dtype}; inputs {inputs_mib:.1f} MiB")
    print(f"reference (float64, materialised) would need ~{ref_bytes / 2**30:.1f} GiB")
    for mode in ("fwd", "fwdbwd"):
        for solver in ("cg", "direct"):
            r = measure(T, H, D, args.dtype, mode, solver)
            print(f"lla {mode:7s} solver={solver:6s}: peak extra {r['extra_mib']:.0f} MiB, {r['seconds']:.2f} s")


if __name__ == "__main__":
    main()
