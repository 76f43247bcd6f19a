"""Per-token decode latency and peak memory of LLA with a KV cache, versus SDPA decode.

    python benchmarks/bench_decode.py [--B 1 --H 8 --Hk 8 --D 64 --lengths 1024,2048,4096,8192,16384,32768
                                       --dtype float32 --device cpu --ridge 1.0 --iters 20]

One decode step = one new token per sequence: append k, v to the caches at cache_seqlens and attend
with the new query over the S cached entries.  Methods, each in a fresh subprocess (so that the
peak-memory reading is its own):
  sdpa        torch.nn.functional.scaled_dot_product_attention over the cache (the baseline)
  lla-direct  lla.local_linear_attention_with_kvcache, single-token path (one D x D Cholesky / head)
  lla-cg      the same op with solver="cg" (goes through the public op: CG over the cache)
Reported: best-of-``iters`` ms per step (the minimum: robust to other jobs on a shared machine), GFLOP/s, ratio to SDPA (same run), peak extra memory of the steps, the first
included (CPU: ru_maxrss growth over the state after the caches were built and one step on a tiny cache
ran, so one-off library allocations are excluded; CUDA: max_memory_allocated growth), and the caches' own size.  FLOPs per head and step: SDPA 4 S D; LLA-direct
2 S (D^2 + 3 D + Dv) (logits, mean, centred moment GEMM, output; the Cholesky's D^3/3 is ignored);
LLA-CG is reported in ms only (its iteration count varies).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, statistics, sys, time, torch
import lla
a = json.loads(sys.argv[1])
dev, dt = a["device"], getattr(torch, a["dtype"])
B, H, Hk, D, S = a["B"], a["H"], a["Hk"], a["D"], a["S"]
if dev == "cpu" and a["threads"]:
    torch.set_num_threads(a["threads"])
g = torch.Generator().manual_seed(0)
k_cache = torch.randn(B, S + 1, Hk, D, generator=g).to(dev, dt)
v_cache = torch.randn(B, S + 1, Hk, D, generator=g).to(dev, dt)
q = torch.randn(B, 1, H, D, generator=g).to(dev, dt)
k = torch.randn(B, 1, Hk, D, generator=g).to(dev, dt)
v = torch.randn(B, 1, Hk, D, generator=g).to(dev, dt)
seqlens = torch.full((B,), S - 1, dtype=torch.int32, device=dev)
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

def step(k_cache=k_cache, v_cache=v_cache, S=S, seqlens=seqlens):
    if a["method"] == "sdpa":
        k_cache[:, S - 1 : S] = k
        v_cache[:, S - 1 : S] = v
        qh = q.transpose(1, 2)
        kh = k_cache[:, :S].transpose(1, 2)
        vh = v_cache[:, :S].transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, enable_gqa=H != Hk).transpose(1, 2)
    solver = "cg" if a["method"] == "lla-cg" else "auto"
    return lla.local_linear_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, ridge=a["ridge"], solver=solver)

with torch.no_grad():
    # one step on a tiny cache first: one-off allocations (thread pools, LAPACK) are not the op's
    step(k_cache[:, :17].clone(), v_cache[:, :17].clone(), 16, torch.full_like(seqlens, 15)); sync()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(); sync()  # the first step's allocations count towards the peak
    times = []
    for _ in range(a["iters"]):
        sync(); t0 = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.startswith("cuda") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times), "extra_mib": max(0, peak - base) / 2**20}))
"""


def run(method, S, args):
    cfg = dict(method=method, S=S, B=args.B, H=args.H, Hk=args.Hk, D=args.D, dtype=args.dtype, device=args.device,
               ridge=args.ridge, iters=args.iters, threads=args.threads)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--Hk", type=int, default=None)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--methods", default="sdpa,lla-direct,lla-cg")
    args = ap.parse_args(argv)
    args.Hk = args.Hk or args.H
    methods = args.methods.split(",")
    esize = {"float32": 4, "float64": 8}.get(args.dtype, 2)
    print(f"decode step: B={args.B} H={args.H} Hk={args.Hk} D={args.D} {args.dtype} {args.device} ridge={args.ridge}")
    print(f"{'S':>6} {'cache MiB':>9} | " + " | ".join(f"{m:>10} ms  GF/s  x sdpa  +MiB" for m in methods))
    for S in [int(s) for s in args.lengths.split(",")]:
        cache_mib = 2 * args.B * (S + 1) * args.Hk * args.D * esize / 2**20
        res = {m: run(m, S, args) for m in methods}
        base = res.get("sdpa", {}).get("ms")
        cells = []
        for m in methods:
            r = res[m]
            if "error" in r:
                cells.append(f"{'error: ' + r['error'][:40]:>36}")
                continue
            flops = args.B * args.H * S * (4 * args.D if m == "sdpa" else 2 * (args.D**2 + 3 * args.D + args.D))
            gfs = flops / (r["ms"] * 1e-3) / 1e9 if m != "lla-cg" else float("nan")
            ratio = r["ms"] / base if base else float("nan")
            cells.append(f"{r['ms']:10.3f}    {gfs:5.1f}  {ratio:6.1f}  {r['extra_mib']:5.1f}")
        print(f"{S:>6} {cache_mib:9.1f} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
