"""Context parallelism on CPU with gloo: time and peak memory per rank against one process.

    PYTHONPATH=src python benchmarks/bench_distributed.py [--T 8192] [--H 4] [--D 32] [--repeats 2]
    PYTHONPATH=src python benchmarks/bench_distributed.py --project     (arithmetic only, see the doc)

For each configuration a fresh set of processes (one thread each) runs forward + backward of causal
LLA (float32, ridge 1, solver "auto") on one sequence of ``T`` tokens:

* ``1 process``: ``lla.local_linear_attention`` on the whole sequence (no process group);
* ``P ranks, zigzag|contiguous``: ``lla.distributed.context_parallel_attention`` on each rank's shard.

Per rank it reports the fwd+bwd step wall time (best of ``--repeats`` after one untimed step; the
ranks wait for each other in the collectives, so this is the slowest rank's), the CPU time of the
rank's own attention work (its query chunks against the gathered keys, no collectives; one thread,
so CPU seconds are what a dedicated core would take, whatever else runs on the machine: min .. max
over ranks shows the load balance, and the single process's CPU time over the slowest rank's is the
speed-up P dedicated cores would see before communication), the wall time of the collectives alone
(all-gather of K,V forward + reduce-scatter of dK,dV backward, same tensors), and the peak-RSS
growth of the first step (``ru_maxrss`` after the step minus before it: what the step allocates on
top of the inputs).  Times are on whatever cores the machine gives: with 2 cores, 4
ranks oversubscribe them, so their wall time says nothing about 4 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import lla
    from lla.distributed import all_gather_seq, context_parallel_attention, shard

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = world > 1
    if cp:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if cp else 0
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, args.T, args.H, args.D, generator=g) for _ in range(3)]
    xs = [shard(x, sharding=args.sharding) if cp else x for x in full]
    del full
    for x in xs:
        x.requires_grad_(True)

    def step():
        if cp:
            o = context_parallel_attention(*xs, ridge=1.0, sharding=args.sharding)
        else:
            o = lla.local_linear_attention(*xs, ridge=1.0)
        o.sum().backward()
        for x in xs:
            x.grad = None

    def barrier():
        if cp:
            dist.barrier()

    barrier()
    before = _rss_mb()
    step()
    peak = _rss_mb() - before
    times, cpu = [], []
    for _ in range(args.repeats):
        barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    comm = compute = float("nan")
    if cp:  # this rank's share of the attention alone (K, V gathered beforehand): shows the balance
        from lla.distributed import shard_ranges

        k_all, v_all = (all_gather_seq(x.detach(), sharding=args.sharding) for x in xs[1:])
        k_all.requires_grad_(True)
        v_all.requires_grad_(True)
        ts = []
        for _ in range(args.repeats):
            t0 = time.process_time()  # CPU seconds: what a dedicated core would take
            start = 0
            for c0, c1 in shard_ranges(xs[0].shape[1], rank, world, args.sharding):
                qc = xs[0][:, start : start + c1 - c0]
                start += c1 - c0
                lla.local_linear_attention(qc, k_all[:, :c1], v_all[:, :c1], ridge=1.0).sum().backward()
            ts.append(time.process_time() - t0)
        compute = min(ts)
    if cp:  # the collectives alone: all-gather [B, T_local, Hk, D + Dv] and reduce-scatter its gradient
        kv = torch.cat([xs[1], xs[2]], dim=-1).detach().requires_grad_(True)
        ts = []
        for _ in range(3):
            barrier()
            t0 = time.perf_counter()
            all_gather_seq(kv, sharding=args.sharding).sum().backward()
            ts.append(time.perf_counter() - t0)
        comm = min(ts)
    rec = {"rank": rank, "world": world, "time": min(times), "cpu": min(cpu), "comm": comm,
           "compute": compute if cp else min(cpu), "peak_mb": peak}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(rec, f)
    if cp:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, sharding: str, args) -> list[dict]:
    out = tempfile.mkdtemp(prefix="lla-bench-dist-")
    port = _free_port()
    base = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out, "--sharding", sharding,
           "--T", str(args.T), "--H", str(args.H), "--D", str(args.D), "--repeats", str(args.repeats)]
    procs = []
    for r in range(world):
        env = dict(base)
        if world > 1:
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"a rank of the {world}-process run failed")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def project(args) -> None:
    """The projection of docs/distributed.md: arithmetic from the formulas, nothing measured."""
    H, Hk, D, nbytes, iters = 32, 8, 128, 2, args.cg_iters
    nvlink, ib, flops_s = 450e9, 50e9, 400e12
    print(f"PROJECTION (arithmetic, not measured): one causal LLA layer, B=1, H={H}, Hk={Hk}, D=Dv={D}, bf16 K/V, "
          f"CG {iters} iterations; forward cost ~ pairs * H * 4D * (iters + 3) flops, backward ~2x forward; "
          f"{flops_s / 1e12:.0f} TFLOP/s sustained per GPU; {nvlink / 1e9:.0f} GB/s (NVLink) and {ib / 1e9:.0f} GB/s (400 Gb/s IB) per GPU")
    print("\n| tokens S | GPUs P | tokens per GPU | gathered K,V per layer per GPU | ring: K,V per GPU | "
          "received per layer per GPU, fwd + bwd | that at NVLink / IB, ms | attention fwd+bwd per GPU, ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for S in (128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024):
        for P in (8, 16, 32, 64):
            kv = S * Hk * 2 * D * nbytes
            ring = 2 * (S // P) * Hk * 2 * D * nbytes
            vol = 2 * (P - 1) / P * kv
            pairs = S * S / 2 / P  # causal pairs per GPU (zigzag: equal shares)
            fl = 3 * pairs * H * 4 * D * (iters + 3)
            print(f"| {S // 1024}K | {P} | {S // P // 1024}K | {kv / 2**30:.2f} GiB | {ring / 2**20:.0f} MiB | "
                  f"{vol / 2**30:.2f} GiB | {1e3 * vol / nvlink:.1f} / {1e3 * vol / ib:.0f} | {1e3 * fl / flops_s:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--project", action="store_true", help="print the 8-64 GPU projection (arithmetic) and exit")
    p.add_argument("--cg-iters", type=int, default=10, help="CG iterations assumed by --project")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sharding", default="zigzag", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.project:
        return project(args)
    print(f"causal LLA fwd+bwd, float32, B=1 T={args.T} H=Hk={args.H} D=Dv={args.D}, ridge 1, one thread per process, "
          f"{os.cpu_count()} CPUs")
    base = launch(1, "zigzag", args)[0]
    rows = [("1 process (plain op)", [base])]
    for world in args.worlds:
        for sharding in ("zigzag", "contiguous"):
            rows.append((f"{world} ranks, {sharding}", launch(world, sharding, args)))
    print("\n| run | step wall time, s | attention CPU time per rank, s (min .. max) | CPU-time speed-up | "
          "collectives wall time, s | peak RSS growth per rank, MB (max) |")
    print("|---|---|---|---|---|---|")
    for name, recs in rows:
        t = max(r["time"] for r in recs)  # the ranks wait for each other in the collectives
        one = recs[0]["world"] == 1
        lo, hi = min(r["compute"] for r in recs), max(r["compute"] for r in recs)
        comm = "-" if one else f"{max(r['comm'] for r in recs):.3f}"
        print(f"| {name} | {t:.2f} | {lo:.2f} .. {hi:.2f} | {base['compute'] / hi:.2f}x | {comm} | "
              f"{max(r['peak_mb'] for r in recs):.0f} |")


if __name__ == "__main__":
    main()
