"""End-to-end generation speed: bytes per second of greedy ``lla.experiments.generate.generate``.

    python benchmarks/bench_generate.py [--mixers softmax,lla,parallax,sliding_window] [--prompts 1024,8192]
                                        [--new 32] [--threads 1,2] [--recompute] [--quick]
                                        [--run-dir RUN_DIR] [--json PATH] [--md PATH]

The model: the experiments' ``CausalModel`` as ``lla run lm`` builds it, randomly initialised (seed 0):
byte vocabulary (256), d_model 256, 4 layers, 4 heads (head dim 64), MLP x4, rotary positions, tied
embeddings, float32; sliding_window with ``--window`` (default 256).  The prompt: the first ``L``
bytes of this package's own ``.py`` sources (sorted by path), real text.

Per (threads, mixer, prompt length) one greedy generation of ``--new`` bytes (``--repeats`` times;
the fastest kept), timed from the outside of the library iterator, as a user sees it:
  prefill s     call -> first new byte: the prompt's one forward call (through an ``LLACache`` for the
                cached mixers) + the first argmax
  decode ms     median time per further byte (one forward call of one token against the cache, or,
                for the recompute mixers, a forward over the whole prefix)
  decode B/s    1000 / decode ms
  total B/s     new bytes / (prefill + decode) time
Cached mixers: lla, parallax, softmax, sliding_window.  ``--recompute`` adds gated_deltanet, mesa and
linear (which recompute the prefix every byte) at prompts <= 1024 only, with at most 8 new bytes.
``--run-dir``: instead, a trained ``lla run lm`` folder's models (every mixer of its run.json, first
seed, chosen learning rate) at a 1024-byte prompt.
``--quick`` (< 2 min on 2 idle cores): threads = torch's default, 16 new bytes, cached mixers.
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
    """Greedy generation of ``n_new`` bytes after ``prompt``; the fastest of ``repeats`` runs."""
    list(generate(model, prompt[:8], 2, temperature=0))  # warm-up: first-call allocations, lazy imports
    best = None
    for _ in range(repeats):
        times, t_prev = [], time.perf_counter()
        t0 = t_prev
        for _token in generate(model, prompt, n_new, temperature=0):
            now = time.perf_counter()
            times.append(now - t_prev)
            t_prev = now
        total = t_prev - t0
        res = {"prefill_s": times[0], "decode_ms": 1e3 * statistics.median(times[1:]) if len(times) > 1 else float("nan"),
               "total_s": total, "new": n_new}
        res["decode_bytes_per_s"] = 1e3 / res["decode_ms"]
        res["total_bytes_per_s"] = n_new / total
        if best is None or total < best["total_s"]:
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
    out = ["| mixer | path | threads | prompt bytes | new bytes | prefill s | decode ms/byte | decode bytes/s | total bytes/s |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['mixer']} | {r['path']} | {r['threads']} | {r['prompt']} | | error: {r['error']} | | | |")
            continue
        out.append(f"| {r['mixer']} | {r['path']} | {r['threads']} | {r['prompt']} | {r['new']} | {r['prefill_s']:.3f} | "
                   f"{r['decode_ms']:.1f} | {r['decode_bytes_per_s']:.1f} | {r['total_bytes_per_s']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixers", default=",".join(CACHED), help="cached mixers to time (default: all four)")
    ap.add_argument("--prompts", default="1024,8192", help="prompt lengths in bytes")
    ap.add_argument("--new", type=int, default=32, help="new bytes per generation (default 32)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="generations per case, the fastest kept (default 1)")
    ap.add_argument("--window", type=int, default=256, help="sliding_window's window (default 256)")
    ap.add_argument("--recompute", action="store_true", help="also gated_deltanet, mesa, linear (prompts <= 1024, <= 8 new bytes)")
    ap.add_argument("--run-dir", default=None, help="time a trained lla run lm folder's models at a 1024-byte prompt instead")
    ap.add_argument("--quick", action="store_true", help="default threads, 16 new bytes (< 2 min on 2 idle cores)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "generate.json"))
    ap.add_argument("--md", default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    if args.new < 2:
        raise SystemExit("--new must be >= 2 (the first byte is the prefill's)")
    threads = [0] if args.quick else [int(t) for t in args.threads.split(",")]
    n_new = 16 if args.quick else args.new
    prompts = [int(p) for p in args.prompts.split(",")]
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
    print(f"# bench_generate: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"git {_git_state()}, load average at start {load}", flush=True)
    rows, t_start = [], time.time()
    for nt in threads:
        torch.set_num_threads(nt or default_threads)
        for mixer, source, make, lengths, new in cases:
            model = make()
            cached = bool(model.supports_cache)
            for L in lengths:
                row = {"mixer": mixer, "source": source, "path": "KV cache" if cached else "recompute",
                       "threads": torch.get_num_threads(), "prompt": L}
                try:
                    row.update(time_generation(model, prompt_text(L), new, args.repeats))
                except Exception as e:  # noqa: BLE001 - a case that fails is reported, the others still run
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    seconds = time.time() - t_start
    md = table(rows)
    print()
    print(md)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n{seconds:.0f} s; load average at start {load}, at end {load_end}")
    meta = {"command": "python benchmarks/bench_generate.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "git": _git_state(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": seconds, "torch": torch.__version__,
            "cpus": os.cpu_count(), "load_start": load, "load_end": load_end,
            "model": None if args.run_dir else {"d_model": 256, "n_layers": 4, "num_heads": 4, "vocab_size": 256,
                                                 "rope": True, "tie_embeddings": True, "window": args.window}}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
