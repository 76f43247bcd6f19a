"""Command line: ``lla demo | run | bench`` (also ``python -m lla``; ``torchrun ... -m lla run ...``)."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from lla.experiments.presets import EXPERIMENTS

    p = argparse.ArgumentParser(prog="lla", description="Local Linear Attention: experiments, demo, benchmarks")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="test-time regression: lla vs softmax / mesa / linear (~1 min on 2 CPU cores)")
    d.add_argument("--out", default="lla-demo", help="output directory (default: lla-demo)")
    r = sub.add_parser("run", help="run one of the paper's experiments")
    r.add_argument("experiment", choices=EXPERIMENTS)
    r.add_argument("--preset", default="quick", choices=["smoke", "quick", "paper"])
    r.add_argument("--mixers", nargs="+", default=None, help="mixers to compare (default: lla softmax mesa linear)")
    r.add_argument("--out", default=None, help="output directory (default: runs/EXPERIMENT-PRESET)")
    r.add_argument("--steps", type=int, default=None, help="override the preset's training steps (trained experiments)")
    r.add_argument("--seed", type=int, default=None, help="override the preset's seed (data and initial weights)")
    r.add_argument("--log-every", type=int, default=None, help="override the preset's logging interval in steps")
    r.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="shard each sequence over N ranks (torchrun; mqar and state; world size divisible by N)")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    r.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # interruption, for resume tests
    sub.add_parser("bench", help="benchmarks (lla.bench); arguments are passed through", add_help=False)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        try:
            import lla.bench as bench
        except ImportError as e:
            print(f"lla bench is not available in this installation (lla.bench failed to import: {e})", file=sys.stderr)
            return 2
        return bench.main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    from lla.experiments import runner

    if args.command == "demo":
        runner.demo(args.out)
    elif args.command == "run":
        cfg = None
        if args.steps is not None or args.seed is not None or args.log_every is not None:
            from lla.experiments.presets import get_preset

            cfg = get_preset(args.experiment, args.preset)
        if args.steps is not None:
            if args.experiment == "ttr":
                raise SystemExit("lla run: --steps applies to trained experiments (icr, mqar, state), not ttr")
            if args.steps < 1:
                raise SystemExit(f"lla run: --steps must be >= 1, got {args.steps}")
            cfg["train"]["steps"] = args.steps
        if args.log_every is not None:
            if args.experiment == "ttr" or args.log_every < 1:
                raise SystemExit("lla run: --log-every must be >= 1 and applies to trained experiments (icr, mqar, state)")
            cfg["train"]["log_every"] = args.log_every
        if args.seed is not None:
            (cfg if args.experiment == "ttr" else cfg["train"])["seed"] = args.seed
        runner.run_experiment(args.experiment, args.preset, mixers=args.mixers, out_dir=args.out,
                              progress=not args.no_progress, stop_after=args.stop_after, cfg=cfg,
                              context_parallel=args.context_parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
