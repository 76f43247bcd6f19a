"""Serving speed: KV-cache decode steps and chunked prefill of LLA and Parallax against SDPA decode.

    python benchmarks/bench_decode.py [--quick] [--threads 1,2] [--steps 9] [--cases all]
                                      [--src before=/tmp/decode-base/src --src after=src]
                                      [--out benchmarks/results/decode]
    python benchmarks/bench_decode.py --table RUN.json [RUN.json ...] [--label after]   # runs combined

The issue-24 targets table (CPU, fp32 caches, D = 64, H = 8, ridge 1):

  case              shapes                                              LLA target   Parallax target
  S=1K .. S=32K     B = 1, Hk = 8, one new token on an S-entry cache    <= 10x (1K), <= 3x (8K-32K)   <= 3x, <= 1.5x
  ragged Hk=8 / 2   B = 8, caches 1K..8K (linspace), one new token      <= 3x        <= 1.5x
  prefill 64 on 8K  B = 1, Hk = 8, 64 new tokens on an 8K cache         <= 4x        <= 2x

SDPA decode = ``F.scaled_dot_product_attention`` on a contiguous ``[B, Hk, S_max, D]`` cache (what Hugging
Face keeps; ``enable_gqa=True`` for GQA, a boolean mask for ragged lengths, a bottom-right causal mask for
the prefill chunk); ours on its own ``[B, S_max, Hk, D]`` cache through
``lla.local_linear_attention_with_kvcache`` / ``lla.parallax_attention_with_kvcache`` (default options,
``torch.no_grad``).  Each step writes the new k, v at the same cache position (the cache length stays S).

Every ``--src`` (a ``src`` folder holding the ``lla`` package; default: this checkout's) gets one persistent
worker process; the workers take the cases in turn (A/B interleaved: case by case, method by method), so a
before/after comparison shares the machine's state.  Per case and method: ``--steps`` timed steps after two
warm-up steps, the **median** reported (and the minimum in the JSON); "x SDPA" divides by the SDPA median of
the same worker and case; the process CPU time of the steps (median) is reported beside the wall time
(on a shared machine, at one thread, it leaves out the time other jobs held the core); "+MiB" is the peak extra memory of one step, measured as the growth of the C
allocator's in-use bytes (glibc ``mallinfo2``: arenas + mmapped blocks) read after every aten op of the step
(``TorchDispatchMode``) over the value before it: temporaries freed inside a single aten kernel are not seen
(their peak is bounded by that kernel's own workspace).  "floor ms" = the bytes of the visible K and V
entries divided by the memory bandwidth of a timed 256 MiB copy (read + write bytes per second) at the same
thread count: the time a step that reads the cache once at copy speed would take.  "LLA moment GEMMs" = the
LLA step's weighted second moments alone (``sum_j p_j (k_j - c)(k_j - c)^T`` per query head, the three
symmetric ``D/2`` blocks the step issues, per 1024-key chunk of each sequence's keys, on one chunk kept in
cache): LLA's compute floor, with no pass over the cache, in the same worker (x its SDPA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "S=1K": dict(B=1, Hk=8, lens=[1024], T=1),
    "S=8K": dict(B=1, Hk=8, lens=[8192], T=1),
    "S=16K": dict(B=1, Hk=8, lens=[16384], T=1),
    "S=32K": dict(B=1, Hk=8, lens=[32768], T=1),
    "ragged B=8 Hk=8": dict(B=8, Hk=8, lens=[1024 + 1024 * i for i in range(8)], T=1),
    "ragged B=8 Hk=2": dict(B=8, Hk=2, lens=[1024 + 1024 * i for i in range(8)], T=1),
    "prefill 64 on 8K": dict(B=1, Hk=8, lens=[8192 + 64], T=64),
}
TARGETS = {  # case -> (LLA, Parallax) ratio to SDPA
    "S=1K": (10, 3), "S=8K": (3, 1.5), "S=16K": (3, 1.5), "S=32K": (3, 1.5),
    "ragged B=8 Hk=8": (3, 1.5), "ragged B=8 Hk=2": (3, 1.5), "prefill 64 on 8K": (4, 2),
}

WORKER = r"""
import ctypes, json, statistics, sys, time
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
import lla

H, D = 8, 64

class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

try:
    _libc = ctypes.CDLL(None)
    _libc.mallinfo2.restype = _MallInfo2
    def _in_use():
        m = _libc.mallinfo2()
        return m.uordblks + m.hblkhd
except (OSError, AttributeError):
    _in_use = None

class _Peak(TorchDispatchMode):
    # peak growth of the C allocator's in-use bytes, read after every aten op (the base is read inside the
    # mode: entering one allocates for itself the first time)
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _in_use())
        return out

def peak_extra(fn):
    with _Peak() as p:
        p.base = p.peak = _in_use()
        fn()
    return p.peak - p.base

if _in_use is not None:
    peak_extra(lambda: torch.ones(2) + 1)

def bandwidth():
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter(); dst.copy_(src); ts.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / min(ts)

state = {}

def build(name, c):
    B, Hk, lens, T = c["B"], c["Hk"], c["lens"], c["T"]
    S = max(lens)
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(B, S, Hk, D, generator=g)
    v_cache = torch.randn(B, S, Hk, D, generator=g)
    q = torch.randn(B, T, H, D, generator=g)
    r = torch.randn(B, T, H, D, generator=g) * D ** -0.5
    k = torch.randn(B, T, Hk, D, generator=g)
    v = torch.randn(B, T, Hk, D, generator=g)
    seqlens = torch.tensor([n - T for n in lens], dtype=torch.int32)
    kh = k_cache.transpose(1, 2).contiguous()  # the SDPA cache, [B, Hk, S, D]
    vh = v_cache.transpose(1, 2).contiguous()
    lens_t = torch.tensor(lens)
    mask = None
    if T > 1:  # bottom-right causal: new query t sees entries j <= L - T + t
        j = torch.arange(S)
        mask = (j[None, :] <= (lens_t[:, None, None] - T + torch.arange(T)[None, :, None]))[:, None]  # [B, 1, T, S]
    elif len(set(lens)) > 1:
        mask = (torch.arange(S)[None, :] < lens_t[:, None])[:, None, None, :]  # [B, 1, 1, S]
    bidx = torch.arange(B)[:, None]
    pos = seqlens.long()[:, None] + torch.arange(T)[None, :]

    def sdpa():
        kh[bidx, :, pos] = k  # [B, T, Hk, D] at [B, Hk, pos]
        vh[bidx, :, pos] = v
        return F.scaled_dot_product_attention(q.transpose(1, 2), kh, vh, attn_mask=mask,
                                              enable_gqa=H != Hk).transpose(1, 2)

    def lla_step():
        return lla.local_linear_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, ridge=1.0)

    def parallax_step():
        return lla.parallax_attention_with_kvcache(q, r, k_cache, v_cache, k, v, cache_seqlens=seqlens)

    # LLA's compute floor: the step's weighted second moments alone, sum_j p_j (k_j - c)(k_j - c)^T per query
    # head in the three symmetric D/2 blocks (3/4 of the full GEMM), on one staged [H, 1024, D] chunk reused for
    # every chunk of each sequence's keys (in cache: no memory traffic), as the step issues them
    chunk = torch.randn(H, 1024, D, generator=g)
    h = D // 2
    blocks = [torch.zeros(B * H, h, h) for _ in range(3)]

    def gram():
        if T > 1:
            raise NotImplementedError("n/a: chunks go through the op (no per-row moment GEMM)")
        for n in lens:
            for a in range(0, n, chunk.shape[1]):
                X = chunk[:, : min(chunk.shape[1], n - a)]
                XT = X.transpose(1, 2)
                blocks[0][:H].baddbmm_(XT[:, :h], X[:, :, :h])
                blocks[1][:H].baddbmm_(XT[:, :h], X[:, :, h:])
                blocks[2][:H].baddbmm_(XT[:, h:], X[:, :, h:])

    return dict(sdpa=sdpa, lla=lla_step, parallax=parallax_step, gram=gram)

bw = {}
for line in sys.stdin:
    a = json.loads(line)
    torch.set_num_threads(a["threads"])
    if a["threads"] not in bw:
        bw[a["threads"]] = bandwidth()
    if state.get("name") != a["case"]:
        state.clear()
        state.update(name=a["case"], fns=build(a["case"], a["cfg"]))
    fn = state["fns"][a["method"]]
    try:
        with torch.no_grad():
            fn(); fn()
            times, cpu = [], []
            for _ in range(a["steps"]):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
            extra = float("nan")
            if _in_use is not None:
                extra = peak_extra(fn) / 2**20
        out = dict(ms=1e3 * statistics.median(times), ms_min=1e3 * min(times), cpu_ms=1e3 * statistics.median(cpu),
                   extra_mib=extra, bandwidth=bw[a["threads"]])
    except Exception as e:  # noqa: BLE001
        out = dict(error=f"{type(e).__name__}: {e}"[:200])
    print(json.dumps(out), flush=True)
"""


class Worker:
    def __init__(self, label, src):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
        self.label, self.src = label, src
        self.p = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env, cwd="/")

    def ask(self, **req):
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died")
        return json.loads(line)

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def cell(r, base, target):
    if "error" in r:
        return "error", ""
    ratio = r["ms"] / base["ms"] if base else float("nan")
    cpu_ratio = r["cpu_ms"] / base["cpu_ms"] if base else float("nan")
    ok = "yes" if ratio <= target else "**no**"
    return f"{r['ms']:.3g} ({ratio:.2f}x) / {r['cpu_ms']:.3g} ({cpu_ratio:.2f}x), {r['extra_mib']:.1f}", ok


def gemm_speed(threads):
    import torch

    for th in threads:
        torch.set_num_threads(th)
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(8, 64, 2048).to(dt), torch.randn(8, 2048, 64).to(dt)
            for _ in range(3):
                a @ b
            ts = []
            for _ in range(7):
                t0 = time.perf_counter()
                a @ b
                ts.append(time.perf_counter() - t0)
            print(f"{th} thread(s) {dt}: {2 * 8 * 64 * 2048 * 64 / statistics.median(ts) / 1e9:.1f} GFLOP/s "
                  f"(median of 7; load average {load_average()[0]:.2f})", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 steps per case (the whole table in under 2 minutes)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case and method (default 9; quick 5)")
    ap.add_argument("--cases", default="all", help="comma-separated case names (see CASES) or 'all'")
    ap.add_argument("--methods", default="sdpa,lla,parallax,gram",
                    help="gram: LLA's moment GEMMs alone (its compute floor), single-token cases")
    ap.add_argument("--src", action="append", default=None,
                    help="LABEL=PATH of a src folder holding the lla package (repeat for A/B); default this checkout")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    ap.add_argument("--table", nargs="+", metavar="JSON", default=None,
                    help="print the table of several saved runs (--out's JSON) combined: per cell the median wall "
                         "ratio to SDPA over the runs and its range, for the src --label, and exit")
    ap.add_argument("--label", default=None, help="with --table: the src label to tabulate (default: the last)")
    ap.add_argument("--gemm", action="store_true",
                    help="only print the batched GEMM speed of the moment's shape ([8, 64, 2048] x [8, 2048, 64]), "
                         "fp32 and bf16, at each --threads count, and exit")
    args = ap.parse_args(argv)
    if args.gemm:
        return gemm_speed([int(t) for t in args.threads.split(",")])
    if args.table:
        return print(combined_table(args.table, args.label))
    steps = args.steps or (5 if args.quick else 9)
    srcs = [s.split("=", 1) for s in (args.src or [f"this={os.path.join(ROOT, 'src')}"])]
    cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    methods = args.methods.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    workers = [Worker(label, path) for label, path in srcs]
    t_start = time.time()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = []
    try:
        for th in threads:
            if results and args.out:  # what is measured so far, in case the run is stopped
                report(args, argv, workers, methods, threads, steps, results, started, t_start)
            load0 = load_average()
            for name in cases:
                cfg = CASES[name]
                res = {}
                for m in methods:
                    for w in workers:
                        res[(w.label, m)] = w.ask(case=name, cfg=cfg, method=m, threads=th, steps=steps)
                results.append(dict(threads=th, case=name, cfg=cfg, load_before=load0,
                                    res={f"{w}/{m}": r for (w, m), r in res.items()}))
                print(f"[{th} thread(s)] {name}: " + ", ".join(
                    f"{w}/{m} {r.get('ms', float('nan')):.3f} ms" for (w, m), r in res.items()), flush=True)
    finally:
        for w in workers:
            w.close()
    report(args, argv, workers, methods, threads, steps, results, started, t_start, final=True)


def combined_table(paths, label=None):
    """Markdown tables (one per thread count) of several saved runs: per case the median SDPA ms, and per
    method the median wall ratio to SDPA over the runs with its range ``[min-max]``, for one src label."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    label = label or runs[0]["srcs"][-1][0]
    lines = [f"{len(runs)} runs ({', '.join(r['started'] for r in runs)}), src '{label}': median over the runs of "
             "each run's median wall ms (SDPA) and wall ratio to SDPA of the same worker [range over the runs]; "
             "'ok': the median ratio against the issue's target.", ""]
    cells = {}
    for run in runs:
        for r in run["results"]:
            base = r["res"].get(f"{label}/sdpa", {})
            if "ms" not in base:
                continue
            key = (r["threads"], r["case"])
            cells.setdefault(key, {}).setdefault("sdpa", []).append(base["ms"])
            for m in ("lla", "gram", "parallax"):
                x = r["res"].get(f"{label}/{m}", {})
                if "ms" in x:
                    cells[key].setdefault(m, []).append(x["ms"] / base["ms"])
    for th in sorted({t for t, _ in cells}):
        lines += [f"**{th} thread(s)**", "", "| case | SDPA ms | LLA | ok | LLA moment GEMMs | Parallax | ok |",
                  "|---|---|---|---|---|---|---|"]
        for (t, case), c in cells.items():
            if t != th:
                continue
            tl, tp = TARGETS[case]

            def fmt(m, target=None):
                v = c.get(m)
                if not v:
                    return ["n/a"] + ([""] if target else [])
                med = statistics.median(v)
                out = [f"{med:.2f}x [{min(v):.2f}-{max(v):.2f}]"]
                return out + (["yes" if med <= target else "**no**"] if target else [])
            row = [case, f"{statistics.median(c['sdpa']):.3g}"] + fmt("lla", tl) + fmt("gram") + fmt("parallax", tp)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def report(args, argv, workers, methods, threads, steps, results, started, t_start, final=False):
    wall = time.time() - t_start
    load1 = load_average()
    lines = [f"`python benchmarks/bench_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
             f"started {started}, {wall:.0f} s; load average (1/5/15 min) at the end {load1[0]:.2f} / {load1[1]:.2f} / "
             f"{load1[2]:.2f} on {os.cpu_count()} cores.  Median of {steps} steps; cells: wall ms (x SDPA of the same "
             "worker) / process CPU ms (x SDPA; at 1 thread the time the step ran, without the time other jobs took "
             "the core), peak extra MiB; 'ok': the wall ratio against the issue's target.", ""]
    for th in threads:
        rows = [r for r in results if r["threads"] == th]
        if not rows:
            continue
        bw = next((x["bandwidth"] for r in rows for x in r["res"].values() if "bandwidth" in x), float("nan"))
        lines.append(f"**{th} thread(s)** (copy bandwidth {bw / 1e9:.1f} GB/s; load average before "
                     f"{rows[0]['load_before'][0]:.2f})")
        lines.append("")
        head = ["case", "cache MiB", "floor ms"]
        for w in workers:
            if "sdpa" in methods:
                head.append(f"SDPA ms ({w.label})")
            if "lla" in methods:
                head += [f"LLA ({w.label})", "ok"]
            if "gram" in methods:
                head.append(f"LLA moment GEMMs ({w.label})")
            if "parallax" in methods:
                head += [f"Parallax ({w.label})", "ok"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            cfg = r["cfg"]
            cache_bytes = 2 * sum(cfg["lens"]) * cfg["Hk"] * 64 * 4
            cells = [r["case"], f"{cache_bytes / 2**20:.0f}", f"{1e3 * cache_bytes / bw:.2f}"]
            tl, tp = TARGETS[r["case"]]
            for w in workers:
                base = r["res"].get(f"{w.label}/sdpa", {})
                base = base if "ms" in base else None
                if "sdpa" in methods:
                    cells.append(f"{base['ms']:.3g} / {base['cpu_ms']:.3g}" if base else "error")
                if "lla" in methods:
                    cells += list(cell(r["res"][f"{w.label}/lla"], base, tl))
                if "gram" in methods:
                    g = r["res"][f"{w.label}/gram"]
                    cells.append("n/a" if "error" in g else f"{g['ms']:.3g} ({g['ms'] / base['ms']:.2f}x)" if base else "")
                if "parallax" in methods:
                    cells += list(cell(r["res"][f"{w.label}/parallax"], base, tp))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    if final:
        print(text)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(dict(started=started, wall_s=wall, load_end=load1, steps=steps, srcs=[(w.label, w.src) for w in workers], results=results), f,
                      indent=1)


if __name__ == "__main__":
    main()
