"""End-to-end generation speed: bytes per second of greedy ``lla.experiments.generate.generate``.

    python benchmarks/bench_generate.py [--mixers softmax,lla,parallax,sliding_window] [--prompts 1024,8192]
                                        [--new 32] [--threads 1,2] [--recompute] [--quick]
                                        [--run-dir RUN_DIR] [--json PATH] [--md PATH]
    python benchmarks/bench_generate.py --table RESULT.json [...]      # the Markdown table of saved results

The model: the experiments' ``CausalModel`` as ``lla run lm`` builds it, randomly initialised (seed 0):
byte vocabulary (256), d_model 256, 4 layers, 4 heads (head dim 64), MLP x4, rotary positions, tied
embeddings, float32; sliding_window with ``--window`` (default 256).  The prompt: the first ``L``
bytes of this package's own ``.py`` sources (sorted by path), real text.

Per (threads, mixer, prompt length) one greedy generation of ``--new`` bytes (``--repeats`` times;
the one with the least CPU time kept), timed from the outside of the library iterator, as a user sees it:
  prefill       call -> first new byte: the prompt's one forward call (through an ``KVCache`` for the
                cached mixers) + the first argmax
  decode        median time per further byte (one forward call of one token against the cache, or,
                for the recompute mixers, a forward over the whole prefix); bytes/s = 1000 / ms
each in this process's CPU seconds (at 1 thread: the cost on a core of its own, robust to other jobs)
and in wall-clock seconds (what a user waits; on a shared machine mostly the scheduler's doing).
Cached mixers: lla, parallax, softmax, sliding_window.  ``--recompute`` adds gated_deltanet, mesa and
linear (which recompute the prefix every byte) at prompts <= 1024 only, with at most 8 new bytes.
``--run-dir``: instead, a trained ``lla run lm`` folder's models (every mixer of its run.json, first
seed, chosen learning rate) at a 1024-byte prompt.
``--quick`` (< 2 min): the first ``--threads`` value only (default 1), 16 new bytes, the 1024-byte
prompt only (unless ``--prompts`` is given: an 8K prefill of lla alone takes minutes on this CPU).
On a loaded machine use 1 thread: with 2 threads per process on 2 busy cores torch's OpenMP workers
wait on each other (softmax, 64-byte prompt, 2 threads, load average ~13: 2.9 s per decoded byte,
against 10 ms per byte at 1 thread and a 1024-byte prompt, load average ~9).
Writes JSON (``--json``, default benchmarks/results/generate.json) and prints a Markdown table
(also to ``--md`` when given).  Each case first runs a short warm-up generation (8-byte prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from lla.experiments.generate import find_checkpoint, generate, load_model
from lla.experiments.model import CausalModel, ModelConfig

CACHED = ["softmax", "lla", "parallax", "sliding_window"]
RECOMPUTE = ["gated_deltanet", "mesa", "linear"]


def prompt_text(n: int) -> bytes:
    """The first ``n`` bytes of the concatenated ``lla`` sources (sorted by path)."""
    import lla

    root = os.path.dirname(lla.__file__)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py"))
    data = b""
    for p in paths:
        with open(p, "rb") as f:
            data += f.read()
        if len(data) >= n:
            return data[:n]
    raise ValueError(f"only {len(data)} bytes of source text, need {n}")


def bench_model(mixer: str, window: int) -> CausalModel:
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=mixer, d_model=256, num_heads=4, n_layers=4, mlp=True, mlp_ratio=4, vocab_size=256,
                      output_dim=256, rope=True, tie_embeddings=True,
                      mixer_kwargs={"window": window} if mixer == "sliding_window" else {})
    return CausalModel(cfg).eval()


def time_generation(model, prompt: bytes, n_new: int, repeats: int) -> dict:
    """Greedy generation of ``n_new`` bytes after ``prompt``; the fastest of ``repeats`` runs.

    Each step is timed twice: wall clock (``perf_counter``) and this process's CPU time
    (``process_time``, all its threads).  At one thread the CPU time is what the step costs on a core
    of its own, whatever else runs on the machine (it still shares caches and memory bandwidth); on a
    busy machine the wall clock mostly measures the scheduler (a ``nice``d job waits behind the others).
    """
    list(generate(model, prompt[:8], 2, temperature=0))  # warm-up: first-call allocations, lazy imports
    best = None
    for _ in range(repeats):
        wall, cpu = [], []
        w0 = w_prev = time.perf_counter()
        c_prev = time.process_time()
        for _token in generate(model, prompt, n_new, temperature=0):
            w, c = time.perf_counter(), time.process_time()
            wall.append(w - w_prev)
            cpu.append(c - c_prev)
            w_prev, c_prev = w, c
        total = w_prev - w0
        res = {"new": n_new, "prefill_s": wall[0], "prefill_cpu_s": cpu[0],
               "decode_ms": 1e3 * statistics.median(wall[1:]), "decode_cpu_ms": 1e3 * statistics.median(cpu[1:]),
               "total_s": total, "total_cpu_s": sum(cpu)}
        res["decode_bytes_per_s"] = 1e3 / res["decode_ms"]
        res["decode_bytes_per_cpu_s"] = 1e3 / res["decode_cpu_ms"] if res["decode_cpu_ms"] > 0 else float("inf")
        res["total_bytes_per_s"] = n_new / total
        if best is None or res["total_cpu_s"] < best["total_cpu_s"]:
            best = res
    return best


def _git_state() -> str | None:
    """``HEAD``'s short hash, plus ``+dirty`` when tracked files under src/ differ from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def table(rows: list[dict]) -> str:
    out = ["| mixer | path | threads | prompt bytes | new bytes | prefill CPU s | decode CPU ms/byte | decode bytes/CPU-s "
           "| prefill wall s | decode wall ms/byte | load avg |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        load = f"{r['load_avg_1min']:.1f}" if r.get("load_avg_1min") is not None else ""
        if "error" in r:
            out.append(f"| {r['mixer']} | {r['path']} | {r['threads']} | {r['prompt']} | | error: {r['error']} | | | | | {load} |")
            continue
        out.append(f"| {r['mixer']} | {r['path']} | {r['threads']} | {r['prompt']} | {r['new']} | {r['prefill_cpu_s']:.3f} | "
                   f"{r['decode_cpu_ms']:.1f} | {r['decode_bytes_per_cpu_s']:.1f} | {r['prefill_s']:.3f} | {r['decode_ms']:.1f} | {load} |")
    return "\n".join(out)


def write_json(args, rows, t_start, load, git, done: bool) -> dict:
    """Write ``{"meta", "rows"}`` to ``args.json`` (when set); returns the meta."""
    meta = {"command": "python benchmarks/bench_generate.py " + " ".join(args.argv), "git": git, "finished": done,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": time.time() - t_start,
            "torch": torch.__version__, "cpus": os.cpu_count(), "load_start": load,
            "load_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "model": None if args.run_dir else {"d_model": 256, "n_layers": 4, "num_heads": 4, "vocab_size": 256,
                                                 "rope": True, "tie_embeddings": True, "window": args.window}}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixers", default=",".join(CACHED), help="cached mixers to time (default: all four)")
    ap.add_argument("--prompts", default=None, help="prompt lengths in bytes (default 1024,8192; --quick: 1024)")
    ap.add_argument("--new", type=int, default=32, help="new bytes per generation (default 32)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="generations per case, the fastest kept (default 1)")
    ap.add_argument("--window", type=int, default=256, help="sliding_window's window (default 256)")
    ap.add_argument("--recompute", action="store_true", help="also gated_deltanet, mesa, linear (prompts <= 1024, <= 8 new bytes)")
    ap.add_argument("--run-dir", default=None, help="time a trained lla run lm folder's models at a 1024-byte prompt instead")
    ap.add_argument("--quick", action="store_true", help="the first --threads value only, 16 new bytes (< 2 min on 2 idle cores)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "generate.json"))
    ap.add_argument("--md", default=None, help="also write the Markdown table here")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="only print the Markdown table of these result files (rows in order, with each file's command)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.table:
        rows = []
        for path in args.table:
            with open(path) as f:
                res = json.load(f)
            m = res["meta"]
            print(f"- `{m['command']}` (git {m.get('git')}, {m['time']}, {'finished' if m.get('finished') else 'interrupted'}; "
                  f"load average at start {[round(x, 1) for x in m['load_start']] if m.get('load_start') else None})")
            rows += res["rows"]
        print()
        print(table(rows))
        return 0
    if args.new < 2:
        raise SystemExit("--new must be >= 2 (the first byte is the prefill's)")
    threads = [int(t) for t in args.threads.split(",")]
    threads = threads[:1] if args.quick else threads
    n_new = 16 if args.quick else args.new
    prompts = [int(p) for p in (args.prompts or ("1024" if args.quick else "1024,8192")).split(",")]
    default_threads = torch.get_num_threads()

    cases = []  # (label, path, model factory, prompt lengths, new bytes)
    if args.run_dir:
        with open(os.path.join(args.run_dir, "run.json")) as f:
            run = json.load(f)
        for mixer in run["mixers"]:
            ckpt = find_checkpoint(args.run_dir, mixer=mixer)
            cases.append((mixer, ckpt, lambda c=ckpt: load_model(c)[0], [1024], n_new))
    else:
        for mixer in args.mixers.split(","):
            cases.append((mixer, "random init", lambda m=mixer: bench_model(m, args.window), prompts, n_new))
        if args.recompute:
            short = [p for p in prompts if p <= 1024] or [1024]
            for mixer in RECOMPUTE:
                cases.append((mixer, "random init", lambda m=mixer: bench_model(m, args.window), short, min(n_new, 8)))

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    git = _git_state()
    print(f"# bench_generate: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"git {git}, load average at start {load}", flush=True)
    rows, t_start = [], time.time()
    for nt in threads:
        torch.set_num_threads(nt or default_threads)
        # every mixer at the shortest prompt first, then the longer ones (an interrupted run has the short ones)
        for L, (mixer, source, make, lengths, new) in sorted(((L, c) for c in cases for L in c[3]), key=lambda t: t[0]):
            model = make()
            cached = bool(model.supports_cache)
            row = {"mixer": mixer, "source": source, "path": "KV cache" if cached else "recompute",
                   "threads": torch.get_num_threads(), "prompt": L}
            try:
                row.update(time_generation(model, prompt_text(L), new, args.repeats))
            except Exception as e:  # noqa: BLE001 - a case that fails is reported, the others still run
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            row["load_avg_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            write_json(args, rows, t_start, load, git, done=False)  # after every case: an interrupted run keeps its rows
    md = table(rows)
    print()
    print(md)
    meta = write_json(args, rows, t_start, load, git, done=True)
    print(f"\n{meta['seconds']:.0f} s; load average at start {load}, at end {meta['load_end']}")
    if args.json:
        print(f"wrote {args.json}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
