"""``lla bench``: CPU benchmark of the LLA op against scaled-dot-product attention.

Every point ``(provider, mode, T, D, ridge)`` runs in its own subprocess, so that its peak memory is
measured for real: the worker creates the inputs, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``; where that is unavailable it uses the peak of the fresh process), runs
the op once, and reports ``peak RSS - RSS with the inputs``.  Then it times ``--repeats`` more runs
(median, wall clock), and for LLA computes the relative error against the float64 reference
(``lla.local_linear_attention_ref``) on a sample of query rows (each row against all its causal keys).

Shapes: B = 1, H = 8 (``--batch``, ``--heads`` change them, e.g. to training shapes), causal,
float32, ``q, k, v ~ N(0, 1)``, default scale ``1 / sqrt(D)``.

Providers: ``lla-auto`` / ``lla-cg`` / ``lla-direct`` (the op with that solver, default precision),
``lla-fp32`` / ``lla-mixed`` (solver auto, ``precision="fp32"`` / ``"mixed"``: plain fp32 CG or bf16
matvecs with fp32 residual replacement), ``ref``, ``sdpa``, ``parallax``.  ``--precision`` sets the
precision of ``lla-auto`` / ``lla-cg`` / ``lla-direct``.

FLOP formulas (``P = B * H * T (T + 1) / 2`` causal query-key pairs, ``W`` = the row-key products
the solves' matvecs really ran, counted by the backend (``torch_backend.function.WORK_LOG``; bf16
and fp32 alike, each ``4 D`` flops); see ``FLOP_FORMULAS``):

    sdpa fwd        4 P D                 sdpa fwd+bwd   14 P D       (bwd = 2.5 x fwd)
    lla cg fwd      P 8 D + 4 D W         (logits, mean, y.x, output; 2 GEMMs per CG iteration)
    lla direct fwd  P (8 D + D (D + 1)) + H T D^3 / 3
    lla bwd         P 20 D + 4 D W        (same for direct, with D (D + 1) for the solve)

Usage::

    lla bench --quick                      # the targets grid, prints the targets summary
    lla bench --T 1024 2048 --D 64 --ridge 1 --modes fwd --providers lla-auto sdpa
    python -m lla.bench ...                # same
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

__all__ = ["main", "run_point", "TARGETS", "FLOP_FORMULAS"]

PROVIDERS = ("lla-auto", "lla-cg", "lla-direct", "lla-fp32", "lla-mixed", "ref", "sdpa", "parallax")
PRECISION_PROVIDERS = {"lla-fp32": "fp32", "lla-mixed": "mixed"}
MODES = ("fwd", "fwdbwd")
FULL_GRID = dict(T=[512, 1024, 2048, 4096, 8192, 16384], D=[64, 128], ridge=[0.01, 1.0, 10.0])
H = 8

FLOP_FORMULAS = {
    "sdpa": "fwd 4*P*D, fwd+bwd 14*P*D",
    "lla-cg": "fwd 8*P*D + 4*D*W, bwd 20*P*D + 4*D*W (W: row-key products the solves ran, bf16 + fp32)",
    "lla-direct": "fwd P*(8*D + D*(D+1)) + H*T*D^3/3, bwd the same plus P*20*D",
    "ref": "as lla-direct (it materialises z [T, S, D]: not a fair FLOP count)",
    "parallax": "fwd 6*P*D, fwd+bwd 22*P*D (Dv = D; the torch backend's GEMMs)",
}

#: The issue's targets (issue 12): (name, description).  Evaluated by ``targets_summary``.
TARGETS = (
    ("T1", "fwd, T=4096, ridge=1: time <= 8x SDPA, rel err <= 1e-5"),
    ("T2", "fwd+bwd, T=4096, ridge=1: time <= 8x SDPA fwd+bwd"),
    ("T3", "fwd, T=4096, ridge=0.01: time <= 12x SDPA, rel err <= 1e-3"),
    ("T4", "peak memory at T=16384: fwd <= 512 MiB, fwd+bwd <= 1 GiB above inputs"),
    ("T5", "fwd time grows no faster than T^2 from T=2048 to 16384"),
)


# ----------------------------------------------------------------------------- worker side
def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _flops(provider: str, mode: str, T: int, D: int, work: float, solver: str | None, B: int = 1,
           heads: int = H) -> float:
    """FLOPs of one run; ``work`` = the row-key products of the solves' matvecs (forward and, for
    fwd+bwd, the adjoint solves), as the backend counted them."""
    P = B * heads * T * (T + 1) / 2
    if provider == "sdpa":
        return (4 if mode == "fwd" else 14) * P * D
    if provider == "parallax":
        return (6 if mode == "fwd" else 22) * P * D
    direct = solver == "direct" or provider == "ref"
    if direct:
        f = P * (8 * D + D * (D + 1)) + B * heads * T * D**3 / 3
        return f + (P * (20 * D + D * (D + 1)) if mode == "fwdbwd" else 0.0)
    return P * (8 * D if mode == "fwd" else 28 * D) + 4 * D * work


def _sample_rows(T: int, n: int = 8) -> list[int]:
    return sorted({round(i * (T - 1) / max(1, n - 1)) for i in range(n)})


def _ref_rows(q, k, v, ridge, rows):
    """Float64 reference output at query rows ``rows`` (each against its causal keys): [1, n, H, D]."""
    from lla import ops as lla

    outs = [
        lla.local_linear_attention_ref(q[:, i : i + 1].double(), k[:, : i + 1].double(), v[:, : i + 1].double(), ridge=ridge)
        for i in rows
    ]
    return __import__("torch").cat(outs, dim=1)


def _parallax_ref_rows(q, r, k, v, rows):
    """Float64 Parallax reference at query rows ``rows`` (each against its causal keys)."""
    from lla import ops as lla

    outs = [lla.parallax_attention_ref(q[:, i : i + 1].double(), r[:, i : i + 1].double(), k[:, : i + 1].double(),
                                       v[:, : i + 1].double()) for i in rows]
    return __import__("torch").cat(outs, dim=1)


def run_point(provider: str, mode: str, T: int, D: int, ridge: float, repeats: int = 3, threads: int | None = None,
              seed: int = 0, B: int = 1, heads: int = H, precision: str = "auto") -> dict:
    """Run one point in this process; returns a record (see the module docstring).  Call it from a
    fresh process (``--worker``) for a meaningful memory figure."""
    import torch
    import torch.nn.functional as F

    from lla import ops as lla

    if threads:
        torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, heads, D)
    q, k, v, do = (torch.randn(shape, generator=g) for _ in range(4))
    r = torch.randn(shape, generator=g) * D**-0.5 if provider == "parallax" else None  # Parallax's slope query
    bwd = mode == "fwdbwd"
    aux_box = {}

    def op(q_, k_, v_):
        if provider == "sdpa":
            return F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)
        if provider == "ref":
            return lla.local_linear_attention_ref(q_, k_, v_, ridge=ridge)
        if provider == "parallax":
            return lla.parallax_attention(q_, r[:, : q_.shape[1]], k_, v_, backend="torch")  # (warm-up: a prefix)
        prec = PRECISION_PROVIDERS.get(provider, precision)
        solver = "auto" if provider in PRECISION_PROVIDERS else provider.split("-")[1]
        o, aux = lla.local_linear_attention(q_, k_, v_, ridge=ridge, solver=solver, backend="torch", precision=prec,
                                            return_aux=True)
        aux_box["aux"] = aux
        return o

    def once(q, k, v, do):
        if not bwd:
            with torch.no_grad():
                return op(q, k, v)
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        o = op(qg, kg, vg)
        o.backward(do)
        return o.detach()

    # warm the kernels up on a tiny problem, so that the memory run measures the op, not lazy init
    once(*(t[:, :32].clone() for t in (q, k, v, do)))
    from lla.ops.lla.torch_backend import function as _tb

    _tb.WORK_LOG = []  # the solves' matvec work of every run below (the same problem each time)
    rss0 = _rss_kib("VmRSS")
    exact_peak = _reset_peak()
    t0 = time.perf_counter()
    o = once(q, k, v, do)
    first = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    mem_mib = None if (peak is None or rss0 is None) else max(0, peak - rss0) / 1024
    times = [first] if repeats <= 0 else []
    for _ in range(max(0, repeats)):
        t0 = time.perf_counter()
        once(q, k, v, do)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    log, _tb.WORK_LOG = _tb.WORK_LOG, None
    runs = 1 + max(0, repeats)
    work = sum(w.lowp + w.fp32 for _, w in log) / runs if log else 0.0
    work_lowp = sum(w.lowp for _, w in log) / runs if log else 0.0
    aux = aux_box.get("aux")
    iters = aux.iters if aux is not None else 0
    solver = aux.solver if aux is not None else ("direct" if provider == "ref" else None)
    err = None
    if provider != "sdpa":
        rows = _sample_rows(T)
        ref = _ref_rows(q, k, v, ridge, rows) if provider != "parallax" else _parallax_ref_rows(q, r, k, v, rows)
        out = o[:, rows].double()
        err = float((out - ref).norm() / ref.norm())
    flops = _flops(provider, mode, T, D, work, solver, B, heads)
    return dict(provider=provider, mode=mode, T=T, D=D, H=heads, B=B, ridge=ridge, ms=ms, times_ms=[t * 1e3 for t in times],
                gflops=flops / (ms * 1e-3) / 1e9, flops=flops, peak_mib=mem_mib, peak_exact=exact_peak,
                rel_err=err, err_rows=len(_sample_rows(T)) if err is not None else 0, iters=iters, solver=solver,
                residual=(aux.residual if aux is not None else None), threads=torch.get_num_threads(),
                precision=(aux.precision if aux is not None else None), work=work, work_bf16=work_lowp)


def _spawn(args: dict, timeout: float | None) -> dict:
    cmd = [sys.executable, "-m", "lla.bench", "--worker", json.dumps(args)]
    env = dict(os.environ)
    if args.get("threads"):
        env["OMP_NUM_THREADS"] = str(args["threads"])
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(args, error=f"timeout after {timeout} s")
    for line in cp.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return dict(args, error=(cp.stderr.strip().splitlines() or ["worker failed"])[-1])


# ----------------------------------------------------------------------------- driver side
def _grid(a) -> list[dict]:
    """The points to run, in order (SDPA first at each shape, so ratios are available early)."""
    pts = []
    if a.quick:
        r1, r001 = 1.0, 0.01
        for mode, T, ridge in (("fwd", 4096, r1), ("fwd", 4096, r001), ("fwdbwd", 4096, r1), ("fwd", 2048, r1),
                               ("fwd", 8192, r1), ("fwd", 16384, r1), ("fwdbwd", 16384, r1)):
            # at the three T = 4096 targets, both forced precisions too (the default is lla-auto)
            provs = ("sdpa", "lla-auto", "lla-fp32", "lla-mixed") if T == 4096 else ("sdpa", "lla-auto")
            for prov in provs:
                pts.append(dict(provider=prov, mode=mode, T=T, D=64, ridge=ridge if prov != "sdpa" else None))
    else:
        for mode in a.modes:
            for D in a.D:
                for T in a.T:
                    for prov in a.providers:
                        if prov in ("sdpa", "parallax"):  # no ridge
                            pts.append(dict(provider=prov, mode=mode, T=T, D=D, ridge=None))
                            continue
                        if prov == "ref" and T > a.ref_max_T:
                            continue
                        for ridge in a.ridge:
                            pts.append(dict(provider=prov, mode=mode, T=T, D=D, ridge=ridge))
    seen, out = set(), []
    for p in pts:
        key = (p["provider"], p["mode"], p["T"], p["D"], p["ridge"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _add_ratios(results):
    """``ratio`` = time / SDPA's time at the same (mode, T, D), measured in this run."""
    for r in results:
        base = None if r.get("error") else _find(results, provider="sdpa", mode=r["mode"], T=r["T"], D=r["D"])
        if base is not None:
            r["sdpa_ms"] = base["ms"]
            r["ratio"] = r["ms"] / base["ms"]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown_table(results: list[dict]) -> str:
    """Markdown table: ms and the relative error first, then the ratio to SDPA, GFLOP/s, peak memory,
    iterations, solver and precision."""
    lines = [
        "| provider | mode | T | D | ridge | ms | rel err | x SDPA | GFLOP/s | peak MiB | CG iters | bf16 share | "
        "solver | precision |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['provider']} | {r['mode']} | {r['T']} | {r['D']} | {_fmt(r.get('ridge'), 'g')} | "
                         f"{r['error']} | | | | | | | | |")
            continue
        lla_row = r["provider"].startswith("lla")
        share = r["work_bf16"] / r["work"] if lla_row and r.get("work") else None
        lines.append(
            f"| {r['provider']} | {r['mode']} | {r['T']} | {r['D']} | {_fmt(r['ridge'], 'g')} | {r['ms']:.1f} | "
            f"{_fmt(r['rel_err'], '.1e')} | {_fmt(r.get('ratio'), '.2f')} | {r['gflops']:.1f} | "
            f"{_fmt(r['peak_mib'], '.0f')} | {r['iters'] if lla_row else '-'} | {_fmt(share, '.2f')} | "
            f"{r['solver'] or '-'} | {r.get('precision') or '-'} |"
        )
    return "\n".join(lines)


def _find(results, **kw):
    for r in results:
        if not r.get("error") and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets_summary(results: list[dict]) -> list[dict]:
    """Evaluate the issue's targets on whatever points were run (``lla-auto``, D = 64)."""
    out = []

    def lla_pt(mode, T, ridge):
        return _find(results, provider="lla-auto", mode=mode, T=T, D=64, ridge=ridge)

    def add(name, value, met):
        out.append(dict(target=name, desc=dict(TARGETS)[name], measured=value, met=met))

    for name, mode, ridge, rmax, emax in (("T1", "fwd", 1.0, 8, 1e-5), ("T2", "fwdbwd", 1.0, 8, None),
                                          ("T3", "fwd", 0.01, 12, 1e-3)):
        r = lla_pt(mode, 4096, ridge)
        if r is None or r.get("ratio") is None:
            add(name, "not measured", None)
            continue
        met = r["ratio"] <= rmax and (emax is None or (r["rel_err"] is not None and r["rel_err"] <= emax))
        add(name, f"{r['ratio']:.2f}x SDPA ({r['ms']:.0f} ms vs {r['sdpa_ms']:.0f} ms), rel err {_fmt(r['rel_err'], '.1e')}"
            f", {r['iters']} CG iters ({r['solver']}, {r.get('precision') or '-'})", met)
    f, b = lla_pt("fwd", 16384, 1.0), lla_pt("fwdbwd", 16384, 1.0)
    if f is None and b is None:
        add("T4", "not measured", None)
    else:
        fm, bm = (None if r is None else r["peak_mib"] for r in (f, b))
        met = (fm is None or fm <= 512) and (bm is None or bm <= 1024) and not (fm is None and bm is None)
        add("T4", f"fwd {_fmt(fm, '.0f')} MiB, fwd+bwd {_fmt(bm, '.0f')} MiB", met if None not in (fm, bm) else None)
    a, z = lla_pt("fwd", 2048, 1.0), lla_pt("fwd", 16384, 1.0)
    if a is None or z is None:
        add("T5", "not measured", None)
    else:
        expo = math.log(z["ms"] / a["ms"]) / math.log(16384 / 2048)
        add("T5", f"time ~ T^{expo:.2f} ({a['ms']:.0f} ms -> {z['ms']:.0f} ms)", expo <= 2.0)
    return out


def _print_targets(summary) -> str:
    lines = ["targets (lla-auto, B=1, H=8, D=64, causal, fp32):"]
    for t in summary:
        flag = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        lines.append(f"  {t['target']} [{flag}] {t['measured']}   -- target: {t['desc']}")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> bool:
    """Time and peak memory vs T (log-log), one line per provider (and ridge), per mode and D."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    ok = [r for r in results if not r.get("error")]
    panels = sorted({(r["mode"], r["D"]) for r in ok})
    if not panels:
        return False
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 8), squeeze=False)
    labels = sorted({r["provider"] if r["ridge"] is None else f"{r['provider']} ridge={r['ridge']:g}" for r in ok})
    colour = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}  # one colour per series in every panel
    for c, (mode, D) in enumerate(panels):
        series = {}
        for r in ok:
            if (r["mode"], r["D"]) == (mode, D):
                label = r["provider"] if r["ridge"] is None else f"{r['provider']} ridge={r['ridge']:g}"
                series.setdefault(label, []).append(r)
        for label, rs in sorted(series.items()):
            rs.sort(key=lambda r: r["T"])
            ts = [r["T"] for r in rs]
            axes[0][c].plot(ts, [r["ms"] for r in rs], marker="o", label=label, color=colour[label])
            mem = [(r["T"], r["peak_mib"]) for r in rs if r["peak_mib"]]
            if mem:
                axes[1][c].plot(*zip(*mem), marker="o", label=label, color=colour[label])
        for row, ylabel in ((0, "time [ms]"), (1, "peak memory above inputs [MiB]")):
            ax = axes[row][c]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}, D={D}, H={ok[0]['H']}, B={ok[0]['B']}, causal, fp32")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _parse(argv):
    p = argparse.ArgumentParser(prog="lla bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the targets grid only (T=2048..16384, D=64, ridge 1 and 0.01)")
    p.add_argument("--T", type=int, nargs="+", default=FULL_GRID["T"])
    p.add_argument("--D", type=int, nargs="+", default=FULL_GRID["D"])
    p.add_argument("--ridge", type=float, nargs="+", default=FULL_GRID["ridge"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--precision", choices=("auto", "fp32", "mixed"), default="auto",
                   help="precision= of the lla-auto / lla-cg / lla-direct providers (lla-fp32 / lla-mixed fix theirs)")
    p.add_argument("--batch", type=int, default=1, help="batch size B of every point (default 1)")
    p.add_argument("--heads", type=int, default=H, help=f"heads H (= key heads) of every point (default {H})")
    p.add_argument("--threads", type=int, default=None, help="torch threads per point (default: torch's default)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point after the first (default 3; "
                   "--quick: 3 up to T=4096, else 0 = the memory run is the timing)")
    p.add_argument("--ref-max-T", type=int, default=512, help="largest T for the 'ref' provider (it is O(T^2 D) memory)")
    p.add_argument("--skip-after", type=float, default=120.0,
                   help="skip larger T for a series once one point took longer than this many seconds")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per point before it is abandoned")
    p.add_argument("--out", default="benchmarks/results", help="directory for bench.json, bench.md, bench.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = _parse(list(sys.argv[1:] if argv is None else argv))
    if a.worker is not None:
        kw = json.loads(a.worker)
        rec = run_point(kw["provider"], kw["mode"], kw["T"], kw["D"], kw["ridge"] if kw["ridge"] is not None else 1.0,
                        repeats=kw["repeats"], threads=kw.get("threads"), B=kw.get("B", 1), heads=kw.get("H", H),
                        precision=kw.get("precision", "auto"))
        rec["ridge"] = kw["ridge"]
        print("RESULT " + json.dumps(rec), flush=True)
        return 0
    import torch

    os.makedirs(a.out, exist_ok=True)
    points = _grid(a)
    results, slow = [], set()
    started = time.perf_counter()
    print(f"lla bench: {len(points)} points, B={a.batch}, H={a.heads}, threads={a.threads or torch.get_num_threads()}, "
          f"out={a.out}", flush=True)
    for pt in points:
        series = (pt["provider"], pt["mode"], pt["D"], pt["ridge"])
        if series in slow:
            results.append(dict(pt, error="skipped (slower than --skip-after at a smaller T)"))
            continue
        reps = a.repeats if a.repeats is not None else (3 if (not a.quick or pt["T"] <= 4096) else 0)
        rec = _spawn(dict(pt, repeats=reps, threads=a.threads, B=a.batch, H=a.heads, precision=a.precision), a.timeout)
        if not rec.get("error") and rec["ms"] * 1e-3 > a.skip_after:
            slow.add(series)
        results.append(rec)
        _add_ratios(results)
        msg = rec.get("error") or (
            f"{rec['ms']:.1f} ms, err {_fmt(rec['rel_err'], '.1e')}, x{_fmt(rec.get('ratio'), '.2f')} SDPA, "
            f"{rec['gflops']:.1f} GFLOP/s, peak {_fmt(rec['peak_mib'], '.0f')} MiB, iters {rec['iters']}"
            f"{'' if not rec.get('precision') else ', ' + rec['precision']}")
        print(f"  {pt['provider']:10s} {pt['mode']:6s} T={pt['T']:<6d} D={pt['D']:<4d} ridge={_fmt(pt['ridge'], 'g'):5s} "
              f"{msg}", flush=True)
    summary = targets_summary(results)
    meta = dict(command="lla bench " + " ".join(argv if argv is not None else sys.argv[1:]), torch=torch.__version__,
                python=platform.python_version(), machine=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), threads=a.threads or torch.get_num_threads(), flop_formulas=FLOP_FORMULAS,
                seconds=time.perf_counter() - started)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(dict(meta=meta, results=results, targets=summary), f, indent=1)
    table = markdown_table(results)
    targets = _print_targets(summary)
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(f"Command: `{meta['command']}` (torch {meta['torch']}, {meta['cpus']} CPUs, {meta['threads']} threads, "
                f"B = {a.batch}, H = {a.heads})\n\n")
        f.write(table + "\n\n")
        f.write("FLOP formulas (P = B H T (T+1) / 2 causal pairs, W = row-key products the solves' matvecs ran, "
                "counted by the backend; bf16 share = the part of W in bf16): "
                + "; ".join(f"{k}: {v}" for k, v in FLOP_FORMULAS.items()) + "\n\n")
        f.write("```\n" + targets + "\n```\n")
    if not a.no_plot:
        plot(results, os.path.join(a.out, "bench.png"))
    print(table)
    print(targets)
    print(f"wrote {a.out}/bench.json, bench.md{'' if a.no_plot else ', bench.png'} in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
