"""Ahead-of-time compile check of the LLA and Parallax Triton kernels, as the launchers really launch
them, for sm_90 (H100/H200) and sm_80 (A100) on a CPU machine (no GPU, no driver: Triton 3.9 and its
bundled ptxas).

The launchers themselves run on CPU tensors (``lla.ops.lla.triton_backend.function._forward`` /
``_backward`` and Parallax's) with each kernel's ``run`` intercepted: Triton's own binder then gives
the specialisation the real launch would have (argument types, constexprs, the divisibility-by-16
flags of pointers and integers), and the arch the launcher picks tiles for is set with
``lla.ops.common.triton_utils.target_arch``.  Each kernel is compiled for the target and reported with:
shared memory (bytes), registers per thread, spill stores / loads and stack frame (bytes per
thread; ptxas's own ``-v`` log), tensor-core instructions in the PTX (``wgmma`` / ``mma.sync``),
and whether it fits: shared memory within the arch's opt-in limit (sm_90 232,448 B, sm_80
166,912 B), and not ptxas's low-register spill mode (a kernel that comes back with at most 32
registers and spills, a fraction of the chip's speed).

    PYTHONPATH=src python benchmarks/compile_check.py                       # the full table
    PYTHONPATH=src python benchmarks/compile_check.py --subset ci           # CI: D 64/128, fp32/bf16, sm_90/80
    PYTHONPATH=src python benchmarks/compile_check.py --mech lla --D 64 --dtypes bf16 --arch 90
    PYTHONPATH=src python benchmarks/compile_check.py --update-doc docs/triton.md --json out.json

Results are cached by configuration (the kernel's source hash with its callees, the signature,
constexprs, divisibility flags, options and target) in ``--cache`` (default
``~/.cache/lla/compile_check.json``), so reruns compile only what changed.  ``--jobs 2`` compiles in two
processes.  Exit status 1 when any configuration fails to compile or needs more shared memory than
its arch has; ``--strict`` also fails on the low-register spill mode and on more than ``--max-spill``
bytes of spill stores per thread at D <= 128 on sm_90.  A configuration the launcher hands to the
PyTorch backend (``function.triton_unsupported``) is listed as a fallback with its reason.

On a GPU (``--device``), the launches are real: the kernels are compiled by the normal JIT on the
device and the table shows the driver's ``n_regs`` / ``n_spills`` too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARCHS = (90, 80)
DS = (16, 32, 64, 128, 256)
#: head-dim pairs (D, Dv) with Dv != D in the full table
DV_PAIRS = ((64, 128), (128, 64))
PRECISIONS = ("fp32", "mixed")
#: the CI subset (issue 25): D 64 and 128, fp32 and bf16 inputs, sm_90 and sm_80, both mechanisms; LLA's
#: precisions: both for float32 inputs, ``mixed`` (what ``"auto"`` picks) for bf16 (60 compiles)
CI_SUBSET = dict(D=(64, 128), dtypes=("fp32", "bf16"), archs=(90, 80),
                 precisions={"fp32": ("fp32", "mixed"), "bf16": ("mixed",)})
#: spill-store budget (bytes per thread) at D <= 128 on sm_90
MAX_SPILL = 1024
#: the launch shape (B, T, H, Hk): T = 1024 (divisible by 16 as a real long-context call; the same
#: specialisation as T = 4096 or 16384: T, S and the tile counts all divisible by 16)
SHAPE = (1, 1024, 8, 8)


def smem_limit(arch: int) -> int:
    from lla.ops.common.triton_utils import smem_limit as f

    return f(arch)


# ----------------------------------------------------------------------------------------- capture
class _Capture:
    """Intercepts ``JITFunction.run`` of the given kernels: records ``(kernel, args, kwargs)`` and
    launches nothing."""

    def __init__(self, kernels):
        self.kernels, self.launches = kernels, []

    def __enter__(self):
        for fn in self.kernels:
            fn.run = (lambda fn: lambda *a, grid, warmup, **kw: self.launches.append((fn, a, kw)))(fn)
        return self

    def __exit__(self, *exc):
        for fn in self.kernels:
            del fn.run
        return False


def _lla_launches(D, Dv, dtype, precision, arch, device="cpu"):
    """The three LLA launches (fwd, bwd_q, bwd_k) as the launcher makes them, or a fallback reason."""
    from lla.ops.lla.triton_backend import function as F
    from lla.ops.lla.triton_backend import kernels as K
    from lla.ops.common.triton_utils import target_arch

    B, T, H, Hk = SHAPE
    with target_arch(arch):
        note = None
        if hasattr(F, "launch_precision"):  # what the op runs for this precision (float32 "mixed" may run "fp32")
            run_prec, note = F.launch_precision(D, Dv, dtype, precision, arch)
            precision = run_prec
        why = F.triton_unsupported(D, Dv, dtype, precision, arch) if hasattr(F, "triton_unsupported") else None
        if why:
            return why
        q = torch.zeros(B, T, H, D, dtype=dtype, device=device)
        k = torch.zeros(B, T, Hk, D, dtype=dtype, device=device)
        v = torch.zeros(B, T, Hk, Dv, dtype=dtype, device=device)
        lam = torch.ones(B, T, H, device=device)
        ranges = F.row_ranges(T, T, (-1, 0), None, q.device)
        cfg = F._Cfg(D ** -0.5, 64, 1e-6, True, 1.0, (), precision)
        with _Capture([K.lla_fwd_kernel, K.lla_bwd_query_kernel, K.lla_bwd_key_kernel]) as cap:
            o, lse, stats, X, M, stat, shift = F._forward(q, k, v, lam, ranges, cfg)
            F._backward(torch.zeros_like(o), q, k, v, lam, X, M, stat, shift, ranges, cfg)
    if note:
        return [(fn, a, dict(kw, _note=f"runs as {precision}")) for fn, a, kw in cap.launches]
    return cap.launches


def _parallax_launches(D, Dv, dtype, precision, arch, device="cpu"):
    from lla.ops.parallax import triton_backend as P
    from lla.ops.common.varlen import row_ranges
    from lla.ops.common.triton_utils import target_arch

    B, T, H, Hk = SHAPE
    with target_arch(arch):
        why = P.triton_unsupported(D, Dv, dtype, arch) if hasattr(P, "triton_unsupported") else None
        if why:
            return why
        q = torch.zeros(B, T, H, D, dtype=dtype, device=device)
        k = torch.zeros(B, T, Hk, D, dtype=dtype, device=device)
        v = torch.zeros(B, T, Hk, Dv, dtype=dtype, device=device)
        ranges = row_ranges(T, T, (-1, 0), None, q.device)
        kern = [P.parallax_fwd_kernel, P.parallax_bwd_query_kernel, P.parallax_bwd_key_kernel]
        with _Capture(kern) as cap:
            o, lse, stat, ev, cv = P._forward(q, q, k, v, ranges, D ** -0.5)
            P._backward(torch.zeros_like(o), q, q, k, v, stat, ev, cv, ranges, D ** -0.5)
    return cap.launches


MECHS = {"lla": _lla_launches, "parallax": _parallax_launches}
KERNEL_NAMES = {"lla_fwd_kernel": "fwd", "lla_bwd_query_kernel": "bwd_q", "lla_bwd_key_kernel": "bwd_k",
                "parallax_fwd_kernel": "fwd", "parallax_bwd_query_kernel": "bwd_q",
                "parallax_bwd_key_kernel": "bwd_k"}


def _specialise(fn, args, kwargs, arch):
    """Triton's binder on the captured launch for ``GPUTarget("cuda", arch, 32)`` ->
    ``(target, src, options)``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return target, ASTSource(fn, signature, constexprs, attrs), options


def _key(fn, src, options, arch) -> str:
    blob = json.dumps([fn.cache_key, str(src.signature), str(sorted(src.constants.items(), key=str)),
                       str(sorted(src.attrs.items(), key=str)), str(sorted(options.__dict__.items())), arch])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(fn, src, target, options) -> dict:
    """Compile -> resource usage from ptxas's ``-v`` log and the PTX."""
    import triton
    from triton import knobs

    t0 = time.perf_counter()
    buf = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its log
    try:
        with contextlib.redirect_stdout(buf):
            kern = triton.compile(src, target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = False
        knobs.compilation.always_compile = False
    log = buf.getvalue()
    m_regs, m_spill = _REGS.search(log), _SPILL.search(log)
    if m_regs is None or m_spill is None:
        raise RuntimeError(f"no resource usage in the ptxas log: {log[-500:]!r}")
    ptx = kern.asm.get("ptx", "")
    regs = int(m_regs.group(1))
    stack, st, ld = (int(g) for g in m_spill.groups())
    return dict(smem=int(kern.metadata.shared), regs=regs, stack=stack, spill_st=st, spill_ld=ld,
                wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)),
                seconds=round(time.perf_counter() - t0, 1))


def _compile_on_device(fn, args, kwargs) -> dict:
    """On a GPU: the normal JIT compile of the launch (no run), loaded on the device -> the ptxas figures
    as ``_compile`` plus the driver's ``n_regs`` / ``n_spills``."""
    from triton import knobs

    t0 = time.perf_counter()
    buf = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    try:
        with contextlib.redirect_stdout(buf):
            kern = type(fn).run(fn, *args, grid=(1,), warmup=True, **kwargs)
    finally:
        knobs.nvidia.dump_ptxas_log = False
        knobs.compilation.always_compile = False
    log = buf.getvalue()
    m_regs, m_spill = _REGS.search(log), _SPILL.search(log)
    ptx = kern.asm.get("ptx", "")
    row = dict(smem=int(kern.metadata.shared), regs=int(m_regs.group(1)) if m_regs else -1,
               stack=-1, spill_st=-1, spill_ld=-1, wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
               mma=len(re.findall(r"\bmma\.sync", ptx)))
    if m_spill:
        row["stack"], row["spill_st"], row["spill_ld"] = (int(g) for g in m_spill.groups())
    kern._init_handles()  # loads it: raises when it needs more shared memory than the device has
    row.update(n_regs=int(kern.n_regs), n_spills=int(kern.n_spills), seconds=round(time.perf_counter() - t0, 1))
    return row


def run_config(job, cache: dict, sweep=(), kernels=None, device=None, deadline=None) -> list:
    """One configuration ``(mech, D, Dv, dtype, precision, arch)`` -> its rows (one per kernel).

    ``sweep``: compile each launch at these ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` instead of the
    launcher's (the other arguments as launched; how the tile tables were chosen); ``kernels``: only
    these (``fwd``, ``bwd_q``, ``bwd_k``)."""
    mech, D, Dv, dt, precision, arch = job
    base = dict(mech=mech, D=D, Dv=Dv, dtype=dt, precision=precision, arch=arch)
    if deadline is not None and time.time() > deadline and device is not None:
        return [dict(base, kernel="-", status="skipped", error="time budget")]
    try:
        if device is not None:
            launches = MECHS[mech](D, Dv, DTYPES[dt], precision, arch, device)
        else:
            launches = MECHS[mech](D, Dv, DTYPES[dt], precision, arch)
    except Exception as e:  # noqa: BLE001  (a launcher that cannot even prepare the launch)
        return [dict(base, kernel="-", status="error", error=f"launcher: {type(e).__name__}: {e}")]
    if isinstance(launches, str):
        return [dict(base, kernel="-", status="fallback", error=launches)]
    rows = []
    todo = []
    for fn, args, kwargs in launches:
        note = kwargs.pop("_note", None)
        if note:
            base = dict(base, note=note)
        name = KERNEL_NAMES.get(fn.__name__, fn.__name__)
        if kernels and name not in kernels:
            continue
        if not sweep:
            todo.append((fn, name, args, kwargs))
        for bm, bn, w, st in sweep:
            if name != "fwd" and "SHIFT_M" in kwargs and bm > kwargs["SHIFT_M"]:
                continue  # LLA's backward query tiles must sit inside one forward tile
            todo.append((fn, name, args, dict(kwargs, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)))
    for fn, name, args, kwargs in todo:
        row = dict(base, kernel=name, BLOCK_M=kwargs.get("BLOCK_M"), BLOCK_N=kwargs.get("BLOCK_N"),
                   warps=kwargs.get("num_warps", 4))
        try:
            if device is not None:
                row["stages"] = kwargs.get("num_stages", 3)
                row.update(_compile_on_device(fn, args, kwargs))
                row["status"] = status(row)
                rows.append(row)
                continue
            target, src, options = _specialise(fn, args, kwargs, arch)
            row["stages"] = options.num_stages
            key = _key(fn, src, options, arch)
            res = cache.get(key)
            if res is None:
                if deadline is not None and time.time() > deadline:
                    row.update(status="skipped", error="not compiled (time budget / --cached-only)")
                    rows.append(row)
                    continue
                res = _compile(fn, src, target, options)
                res["key"] = key
            row.update(res)
            row["status"] = status(row)
        except Exception as e:  # noqa: BLE001
            row.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
    return rows


def status(row) -> str:
    """``ok`` | ``smem>limit`` | ``lowreg`` (ptxas's low-register spill mode) | ``spill`` (over the
    ``MAX_SPILL`` budget)."""
    if row["smem"] > smem_limit(row["arch"]):
        return "smem>limit"
    if row["spill_st"] > 0 and 0 < row["regs"] <= 32:
        return "lowreg"
    if row["spill_st"] > MAX_SPILL:
        return "spill"
    return "ok"


def jobs_for(mechs, Ds, dtypes, archs, dv_pairs, precisions=PRECISIONS):
    out = []
    pairs = [(d, d) for d in Ds] + list(dv_pairs)
    for mech in mechs:
        for arch in archs:
            for D, Dv in pairs:
                for dt in dtypes:
                    precs = precisions.get(dt, ()) if isinstance(precisions, dict) else precisions
                    for prec in (precs if mech == "lla" else ("-",)):
                        out.append((mech, D, Dv, dt, prec, arch))
    return out


def _worker(args):
    job, cache, sweep, kernels, device, deadline = args
    return run_config(job, cache, sweep, kernels, device, deadline)


def run_all(jobs, cache_path=None, n_jobs=1, log=print, sweep=(), kernels=None, device=None, deadline=None,
            cached_only=False) -> list:
    """``cache_path``: a cache file, or several separated by commas (all read, the first written)."""
    cache = {}
    paths = cache_path.split(",") if cache_path else []
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                cache.update(json.load(f))
    cache_path = paths[0] if paths else None
    if cached_only:
        deadline = 0.0  # nothing is compiled: cached rows only, the rest reported as skipped
    rows = []
    t0 = time.perf_counter()

    def take(rs):
        for r in rs:
            rows.append(r)
            if r.get("key") and r["status"] not in ("error", "skipped"):
                cache[r["key"]] = {k: r[k] for k in ("smem", "regs", "stack", "spill_st", "spill_ld", "wgmma", "mma",
                                                     "seconds", "key")}
            log(fmt_row(r) + f"   [{time.perf_counter() - t0:.0f}s]")
        if cache_path:
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            with open(cache_path + ".tmp", "w") as f:
                json.dump(cache, f)
            os.replace(cache_path + ".tmp", cache_path)

    if n_jobs <= 1:
        for job in jobs:
            take(run_config(job, cache, sweep, kernels, device, deadline))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn" if device is not None else "fork")  # CUDA does not survive a fork
        with ProcessPoolExecutor(n_jobs, mp_context=ctx) as ex:
            for rs in ex.map(_worker, [(j, cache, sweep, kernels, device, deadline) for j in jobs]):
                take(rs)
    return rows


def fmt_row(r) -> str:
    head = f"{r['mech']:>8} {r['kernel']:>5} sm_{r['arch']} D={r['D']:<3} Dv={r['Dv']:<3} {r['dtype']:>4} {r['precision']:>5}"
    if r["status"] in ("error", "fallback", "skipped"):
        return f"{head}  {r['status'].upper()}: {r.get('error', '')}"
    dev = f"  driver n_regs {r['n_regs']} n_spills {r['n_spills']}" if "n_regs" in r else ""
    return (f"{head}  {r['BLOCK_M']}x{r['BLOCK_N']}/{r['warps']}w/{r['stages']}s  smem {r['smem']:>6}  regs {r['regs']:>3}"
            f"  spill st/ld {r['spill_st']:>5}/{r['spill_ld']:<5} stack {r['stack']:>5}  wgmma {r['wgmma']:>3} mma {r['mma']:>3}"
            f"  {r['status']}{dev}  ({r['seconds']}s)")


def markdown(rows) -> str:
    """One line per (mechanism, arch, D, Dv, dtype, precision): tiles, smem, regs, spill stores per kernel."""
    groups = {}
    for r in rows:
        groups.setdefault((r["mech"], r["arch"], r["D"], r["Dv"], r["dtype"], r["precision"]), {})[r["kernel"]] = r
    lines = ["| mech | arch | D | Dv | dtype | precision | kernel: tiles BMxBN/warps/stages, smem KB, regs, spill st B, "
             "tensor-core ops | status |", "|---|---|---|---|---|---|---|---|"]
    order = {"lla": 0, "parallax": 1}
    for key in sorted(groups, key=lambda k: (order[k[0]], -k[1], k[2], k[3], list(DTYPES).index(k[4]), k[5])):
        mech, arch, D, Dv, dt, prec = key
        ks = groups[key]
        cells, worst = [], "ok"
        for name in ("fwd", "bwd_q", "bwd_k", "-"):
            r = ks.get(name)
            if r is None:
                continue
            if r["status"] in ("error", "fallback", "skipped"):
                cells.append(f"{name if name != '-' else ''} {r['status']}: {r.get('error', '')}".strip())
                worst = r["status"]
                continue
            tc = f"wgmma {r['wgmma']}" if r["wgmma"] else (f"mma {r['mma']}" if r["mma"] else "none")
            dev = f" (driver: {r['n_regs']} regs, {r['n_spills']} B spilled)" if "n_regs" in r else ""
            cells.append(f"{name} {r['BLOCK_M']}x{r['BLOCK_N']}/{r['warps']}/{r['stages']}, {r['smem'] / 1024:.1f}, "
                         f"{r['regs']}, {r['spill_st']}, {tc}{dev}")
            if r["status"] != "ok" and worst in ("ok", "spill"):
                worst = r["status"]
        note = next((r["note"] for r in ks.values() if r.get("note")), None)
        if note:
            cells.insert(0, f"({note})")
        lines.append(f"| {mech} | sm_{arch} | {D} | {Dv} | {dt} | {prec} | {'; '.join(cells)} | {worst} |")
    return "\n".join(lines) + "\n"


def failures(rows, strict=False, max_spill=MAX_SPILL) -> list:
    """Rows that fail the check: compile errors and shared memory over the arch's limit; with
    ``strict`` also the low-register spill mode and spill stores over ``max_spill`` at D <= 128 on sm_90."""
    bad = []
    for r in rows:
        if r["status"] == "error" or r["status"] == "smem>limit":
            bad.append(r)
        elif strict and (r["status"] == "lowreg" or (r["status"] not in ("fallback",) and r["arch"] == 90
                                                     and max(r["D"], r["Dv"]) <= 128 and r["spill_st"] > max_spill)):
            bad.append(r)
    return bad


def update_doc(path: str, table: str, header: str) -> None:
    begin, end = "<!-- compile-table:begin -->", "<!-- compile-table:end -->"
    with open(path) as f:
        text = f.read()
    block = f"{begin}\n{header}\n\n{table}{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mech", nargs="+", default=list(MECHS), choices=list(MECHS))
    p.add_argument("--D", type=int, nargs="+", default=list(DS))
    p.add_argument("--dv-pairs", default=None, help="extra D:Dv pairs, e.g. 64:128,128:64 (full table: those)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--subset", choices=["ci"], help="ci: D 64/128, fp32/bf16, sm_90/sm_80, no Dv != D")
    p.add_argument("--sweep", default="", help="compile at these tiles instead: BMxBN/warps/stages,... "
                   "(e.g. 16x32/8/2,16x16/8/1)")
    p.add_argument("--kernel", nargs="+", choices=["fwd", "bwd_q", "bwd_k"], help="only these kernels")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes (at most 2 here)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "lla", "compile_check.json"))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--cached-only", action="store_true", help="report cached configurations only, compile nothing")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--update-doc", help="replace the generated table in this Markdown file")
    p.add_argument("--device", action="store_true", help="on a GPU: compile with the normal JIT for this device "
                   "and report the driver's n_regs / n_spills too (arch: the device's)")
    p.add_argument("--budget-s", type=float, default=None, help="skip the configurations left after this long")
    p.add_argument("--strict", action="store_true", help="also fail on low-register mode / spills over --max-spill")
    p.add_argument("--max-spill", type=int, default=MAX_SPILL)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("run without TRITON_INTERPRET=1 (the compile check compiles for a GPU target)")
    device = None
    if a.device:
        if not torch.cuda.is_available():
            p.error("--device needs a CUDA GPU")
        major, minor = torch.cuda.get_device_capability()
        a.arch, device = [10 * major + minor], "cuda"
    if a.subset == "ci":
        jobs = jobs_for(a.mech, CI_SUBSET["D"], CI_SUBSET["dtypes"], CI_SUBSET["archs"], (), CI_SUBSET["precisions"])
    else:
        pairs = DV_PAIRS if a.dv_pairs is None else [tuple(int(x) for x in s.split(":")) for s in a.dv_pairs.split(",") if s]
        pairs = [pr for pr in pairs if pr[0] in a.D or pr[1] in a.D]
        jobs = jobs_for(a.mech, a.D, a.dtypes, a.arch, pairs, a.precisions)
    t0 = time.perf_counter()
    sweep = [tuple(int(x) for x in re.split(r"[x/]", t)) for t in a.sweep.split(",") if t]
    deadline = None if a.budget_s is None else time.time() + a.budget_s
    rows = run_all(jobs, None if (a.no_cache or device) else a.cache, a.jobs, sweep=sweep, kernels=a.kernel,
                   device=device, deadline=deadline, cached_only=a.cached_only)
    wall = time.perf_counter() - t0
    table = markdown(rows)
    print(table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table)
    if a.update_doc:
        import triton

        update_doc(a.update_doc, table, f"Generated by `python benchmarks/compile_check.py "
                   f"{' '.join(argv if argv is not None else sys.argv[1:])}` (Triton {triton.__version__}, "
                   f"bundled ptxas; {len(rows)} kernel compiles, {wall:.0f} s with the cache).")
    bad = failures(rows, a.strict, a.max_spill)
    n_fb = sum(r["status"] == "fallback" for r in rows)
    n_skip = sum(r["status"] == "skipped" for r in rows)
    print(f"{len(rows)} rows, {n_fb} fallbacks, {n_skip} skipped (time budget), {len(bad)} failing, {wall:.0f} s")
    for r in bad:
        print("FAIL", fmt_row(r))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
