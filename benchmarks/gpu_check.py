"""The first device run, in one command (``benchmarks/gpu_check.sh`` calls this): on one H100 / H200, in
under 8 minutes including compilation,

1. the Triton test cases compiled for the GPU, not interpreted (``tests/lla/triton_interp_cases.py`` and
   ``tests/parallax/parallax_triton_cases.py`` with ``LLA_TRITON_DEVICE=cuda``; cases about the interpreter's
   rounding emulation skipped), in parallel worker processes;
2. at the same time, the compile table on the device (``benchmarks/compile_check.py --device``: every
   kernel as the launchers launch it, D 64 / 128 / 256, fp32 / bf16 / fp16, both precisions, with
   ptxas's registers / spills and the driver's ``n_regs`` / ``n_spills``);
3. then, alone on the GPU, ``benchmarks/bench_gpu.py``: LLA fp32 / mixed / the authors'
   fixed-32-iteration scheme / Parallax / SDPA flash, forward and forward+backward, T 1K-16K, D 64 and 128.

Writes into ``--out`` (default ``$OUT`` when set, else ``benchmarks/results/gpu_check``): ``gpu_check.json``
(everything: device, per-case results, compile rows, benchmark rows, step times) and ``gpu_check.md``
(the same as Markdown tables), plus each step's log.

``--dry-run``: the same steps on this CPU machine at tiny sizes under the Triton interpreter (two
cases of each file, the compile check ahead of time for sm_90 on one configuration, ``bench_gpu.py
--dry``): checks the script end to end, measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: the device run's budget (seconds) per step; the whole must stay under 8 minutes
BUDGET = dict(cases=240, compile=200, bench=200)
#: LLA case groups run in parallel (each its own process: compilation is per process)
LLA_WORKERS = 6
#: the Triton test-case scripts (under tests/), LLA's then Parallax's
CASE_SCRIPTS = ("lla/triton_interp_cases.py", "parallax/parallax_triton_cases.py")


def _env(device: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if device:
        env["LLA_TRITON_DEVICE"] = "cuda"
        env.pop("TRITON_INTERPRET", None)
    else:
        env.pop("LLA_TRITON_DEVICE", None)
    return env


def _case_names(script: str) -> list:
    """The case names of a case file (parsed, not imported: importing switches the interpreter on)."""
    import ast

    with open(os.path.join(ROOT, "tests", script)) as f:
        tree = ast.parse(f.read())
    return [n.name[len("case_"):] for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("case_")]


def _start(cmd, log_path, env):
    f = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True), f


def _wait(procs, deadline):
    """Wait for ``(proc, file)`` pairs until ``deadline``; kill what is left -> return codes (None: killed)."""
    codes = []
    for proc, f in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(None)
        f.close()
    return codes


def _parse_cases(log_paths) -> list:
    out = []
    for path in log_paths:
        with open(path) as f:
            for line in f:
                for tag in ("OK", "FAIL", "SKIP"):
                    if line.startswith(tag + " "):
                        name, _, msg = line[len(tag) + 1:].partition(" ")
                        out.append(dict(case=name.rstrip(":"), status=tag, detail=msg.strip()[:300]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results", "gpu_check"))
    p.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny sizes: checks the script end to end")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    dry = a.dry_run
    t_start = time.time()
    report = dict(dry_run=dry, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), steps={})

    import torch

    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    dev = dict(torch=torch.__version__, python=platform.python_version())
    try:
        import triton

        dev["triton"] = triton.__version__
    except ImportError:
        dev["triton"] = None
    if torch.cuda.is_available():
        dev.update(name=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        dev.update(name="cpu (interpreter)")
    report["device"] = dev
    print(f"gpu_check: {dev}  -> {a.out}", flush=True)

    # ---- 1 + 2: test cases (parallel workers) and the compile table, at the same time
    t0 = time.time()
    lla_cases, px_cases = _case_names(CASE_SCRIPTS[0]), _case_names(CASE_SCRIPTS[1])
    if dry:
        lla_groups, px_groups = [lla_cases[:2]], [px_cases[:2]]
    else:
        lla_groups = [lla_cases[i::LLA_WORKERS] for i in range(LLA_WORKERS)]
        px_groups = [px_cases[0::2], px_cases[1::2]]
    procs, logs = [], []
    env = _env(device=not dry)
    for script, groups in zip(CASE_SCRIPTS, (lla_groups, px_groups)):
        for i, g in enumerate(groups):
            log = os.path.join(a.out, f"cases_{script.split('/')[0]}_{i}.log")  # cases_lla_0.log, cases_parallax_0.log
            procs.append(_start([sys.executable, os.path.join(ROOT, "tests", script), *g], log, env))
            logs.append(log)
    cc_json = os.path.join(a.out, "compile.json")
    if dry:
        cc_cmd = ["--mech", "lla", "parallax", "--D", "16", "--dtypes", "fp32", "--precisions", "fp32", "--arch", "90",
                  "--dv-pairs", "", "--no-cache"]
    else:
        cc_cmd = ["--device", "--D", "64", "128", "256", "--dv-pairs", "", "--jobs", "4",
                  "--budget-s", str(BUDGET["compile"] - 30)]
    cc_env = _env(device=False)
    cc_env.pop("TRITON_INTERPRET", None)
    cc = _start([sys.executable, os.path.join(HERE, "compile_check.py"), *cc_cmd, "--json", cc_json,
                 "--markdown", os.path.join(a.out, "compile.md")], os.path.join(a.out, "compile.log"), cc_env)
    deadline = time.time() + (1200 if dry else BUDGET["cases"])
    case_codes = _wait(procs, deadline)
    cc_code = _wait([cc], max(deadline, t0 + (1200 if dry else BUDGET["compile"])))[0]
    cases = _parse_cases(logs)
    ran = {c["case"] for c in cases}
    for name in [n for g in lla_groups for n in g] + [n for g in px_groups for n in g]:
        if name not in ran:
            cases.append(dict(case=name, status="NOT RUN", detail="worker killed at the time budget or crashed"))
    report["cases"] = cases
    report["steps"]["cases"] = dict(seconds=round(time.time() - t0, 1), exit_codes=case_codes)
    report["compile"] = json.load(open(cc_json)) if os.path.exists(cc_json) else []
    report["steps"]["compile"] = dict(seconds=round(time.time() - t0, 1), exit_code=cc_code)
    print(f"cases: {sum(c['status'] == 'OK' for c in cases)} OK, {sum(c['status'] == 'FAIL' for c in cases)} FAIL, "
          f"{sum(c['status'] == 'SKIP' for c in cases)} SKIP, {sum(c['status'] == 'NOT RUN' for c in cases)} not run; "
          f"compile rows {len(report['compile'])} (exit {cc_code}); {time.time() - t0:.0f} s", flush=True)

    # ---- 3: the benchmark, alone on the GPU
    t0 = time.time()
    b_json, b_md = os.path.join(a.out, "bench.json"), os.path.join(a.out, "bench.md")
    if dry:
        b_cmd = ["--dry"]
    else:
        b_cmd = ["--T", "1024", "4096", "16384", "--D", "64", "128", "--dtypes", "bf16", "fp32", "--ridges", "1",
                 "--modes", "fwd", "fwdbwd", "--budget-s", str(BUDGET["bench"] - 20)]
    b = _start([sys.executable, os.path.join(HERE, "bench_gpu.py"), *b_cmd, "--json", b_json, "--markdown", b_md],
               os.path.join(a.out, "bench.log"), _env(device=False) if not dry else dict(_env(device=False)))
    b_code = _wait([b], time.time() + (1200 if dry else BUDGET["bench"] + 30))[0]
    report["bench"] = json.load(open(b_json)) if os.path.exists(b_json) else None
    report["steps"]["bench"] = dict(seconds=round(time.time() - t0, 1), exit_code=b_code)
    report["seconds"] = round(time.time() - t_start, 1)

    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = [f"# gpu_check ({'dry run, CPU interpreter' if dry else dev.get('name')})", "",
          f"{report['started']}; torch {dev['torch']}, triton {dev['triton']}; {report['seconds']} s in all "
          f"(cases {report['steps']['cases']['seconds']} s, compile table {report['steps']['compile']['seconds']} s, "
          f"bench {report['steps']['bench']['seconds']} s).", "", "## Test cases", "",
          "| case | status | detail |", "|---|---|---|"]
    md += [f"| {c['case']} | {c['status']} | {c['detail'].replace('|', '/')} |" for c in cases]
    md += ["", "## Compile table", ""]
    if os.path.exists(os.path.join(a.out, "compile.md")):
        md.append(open(os.path.join(a.out, "compile.md")).read())
    md += ["", "## Benchmark", ""]
    if os.path.exists(b_md):
        md.append(open(b_md).read())
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    ok = (b_code == 0 and cc_code in (0, 1) and not any(c["status"] in ("FAIL", "NOT RUN") for c in cases))
    print(f"gpu_check: {'ok' if ok else 'FAILURES (see gpu_check.md)'}; {report['seconds']} s; "
          f"{os.path.join(a.out, 'gpu_check.json')}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
