"""Command line: ``lla demo | run | bench`` (also ``python -m lla``; ``torchrun ... -m lla run ...``)."""

from __future__ import annotations

import argparse
import importlib
import sys

#: what ``lla demo | run | report`` need beyond torch (the ``experiments`` extra)
EXPERIMENTS_EXTRA = ("numpy", "matplotlib", "tqdm")


def _parser() -> argparse.ArgumentParser:
    from lla.experiments.presets import EXPERIMENTS

    p = argparse.ArgumentParser(prog="lla", description="Local Linear Attention: experiments, demo, benchmarks")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="test-time regression: lla vs softmax / mesa / linear (~1 min on 2 CPU cores)")
    d.add_argument("--out", default="lla-demo", help="output directory (default: lla-demo)")
    r = sub.add_parser("run", help="run one of the paper's experiments")
    r.add_argument("experiment", choices=EXPERIMENTS)
    r.add_argument("--preset", default="quick", help="smoke | quick | paper (icr also: seglens, the segment-length sweep)")
    r.add_argument("--mixers", nargs="+", default=None, help="mixers to compare (default: every mixer the experiment compares, e.g. lm: all seven registered)")
    r.add_argument("--out", default=None, help="output directory (default: runs/EXPERIMENT-PRESET)")
    r.add_argument("--steps", type=int, default=None, help="override the preset's training steps (trained experiments)")
    r.add_argument("--seed", type=int, default=None, help="override the preset's seed (data and initial weights); one seed")
    r.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds to run, each a full run (default: the preset's; quick: 0 1 2); summary gives mean, std, 95%% interval")
    r.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="learning rates to sweep on the first seed, per mixer (best on validation streams; default: the preset's)")
    r.add_argument("--window", type=int, default=None,
                   help="the sliding_window mixer's window in tokens (default 64: at the quick presets' lengths, "
                        "64 and more is softmax attention)")
    r.add_argument("--positions", choices=["learned", "none"], default=None,
                   help="mqar: learned absolute positions (Zoology's setting, default) or none")
    r.add_argument("--estimate", action="store_true",
                   help="print the run's estimated wall time on this machine (from a timed short run) and exit")
    r.add_argument("--restart", action="store_true",
                   help="start over when a checkpoint in --out was made under another configuration (else: an error)")
    r.add_argument("--log-every", type=int, default=None, help="override the preset's logging interval in steps")
    r.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="shard each sequence over N ranks (torchrun; mqar, state and lm; world size divisible by N)")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    r.add_argument("--corpus", default=None, metavar="PATH",
                   help="lm: a text file or a folder of text files (default: this Python's stdlib .py source)")
    r.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="trained experiments: bf16 autocast for the forward pass (weights and optimizer fp32); default fp32")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoints (an error if there are none); runs always "
                        "continue from a matching checkpoint, --resume insists that there is one")
    r.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # interruption, for resume tests
    rp = sub.add_parser("report", help="lla report results: write results/README.md from every results/<exp>/summary.json")
    rp.add_argument("results_dir", nargs="?", default="results", help="folder of run folders (default: results)")
    rp.add_argument("--out", default=None, help="page to write (default: RESULTS_DIR/README.md)")
    sub.add_parser("bench", help="benchmarks (lla.bench); arguments are passed through", add_help=False)
    g = sub.add_parser("generate", help="sample bytes from a trained `lla run lm` model (streams UTF-8 text to stdout)")
    from lla.experiments.generate import add_arguments

    add_arguments(g)
    return p


def _missing(modules) -> list[str]:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


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
    if args.command == "generate":  # torch alone: no experiments extra needed
        from lla.experiments.generate import main as generate_main

        return generate_main(args)
    missing = _missing(EXPERIMENTS_EXTRA)
    if missing:
        raise SystemExit(
            f"lla {args.command} needs the experiments extra ({', '.join(missing)} missing): "
            "pip install -e \".[experiments]\" (from a checkout) or pip install \"local-linear-attention[experiments]\""
        )
    if args.command == "demo":
        from lla.experiments import runner

        runner.demo(args.out)
    elif args.command == "report":
        from lla.experiments.report import results_page

        print(f"wrote {results_page(args.results_dir, args.out)}")
    else:
        return _run(args, argv)
    return 0


def _run_config(args):
    """``lla run``'s overrides -> ``(cfg or None, seeds or None)``; ``SystemExit`` on a bad combination."""
    from lla.experiments.presets import get_preset

    try:
        get_preset(args.experiment, args.preset)
    except ValueError as e:
        raise SystemExit(f"lla run: {e}") from None
    trained = args.experiment != "ttr"
    if args.seed is not None and args.seeds is not None:
        raise SystemExit("lla run: give --seed or --seeds, not both")
    if args.positions is not None and args.experiment != "mqar":
        raise SystemExit("lla run: --positions applies to mqar")
    if args.lrs is not None and not trained:
        raise SystemExit("lla run: --lrs applies to trained experiments (icr, mqar, state, lm); ttr tunes each method's own hyperparameters")
    if args.steps is not None and not trained:
        raise SystemExit("lla run: --steps applies to trained experiments (icr, mqar, state, lm), not ttr")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"lla run: --steps must be >= 1, got {args.steps}")
    if args.log_every is not None and (not trained or args.log_every < 1):
        raise SystemExit("lla run: --log-every must be >= 1 and applies to trained experiments (icr, mqar, state, lm)")
    if args.window is not None and (not trained or args.window < 1):
        raise SystemExit("lla run: --window must be >= 1 and applies to trained experiments (icr, mqar, state, lm)")
    if args.corpus is not None and args.experiment != "lm":
        raise SystemExit("lla run: --corpus applies to lm")
    if args.dtype is not None and not trained:
        raise SystemExit("lla run: --dtype applies to trained experiments (icr, mqar, state, lm)")
    if args.resume and args.restart:
        raise SystemExit("lla run: give --resume or --restart, not both")
    if args.steps is None and args.seed is None and args.log_every is None and args.positions is None \
            and args.window is None and args.corpus is None and args.dtype is None:
        return None, args.seeds
    cfg = get_preset(args.experiment, args.preset)
    for key, val in (("steps", args.steps), ("log_every", args.log_every)):
        if val is not None:
            cfg["train"][key] = val
    if args.positions is not None:
        cfg["positions"] = args.positions
    if args.window is not None:
        cfg["mixer_kwargs"] = {"sliding_window": {"window": args.window}}
    if args.corpus is not None:
        cfg["corpus"] = args.corpus
    if args.dtype is not None:
        cfg["train"]["dtype"] = args.dtype
    if args.seed is None:
        return cfg, args.seeds
    (cfg["train"] if trained else cfg)["seed"] = args.seed
    return cfg, [args.seed]


def _run(args, argv) -> int:
    """``lla run``: estimate or run one experiment."""
    from lla.experiments import runner
    from lla.experiments.train import CheckpointMismatchError

    cfg, seeds = _run_config(args)
    if args.estimate:
        est = runner.estimate(args.experiment, args.preset, mixers=args.mixers, cfg=cfg, seeds=seeds, lrs=args.lrs)
        per = ", ".join(f"{m} {s / 60:.1f}" for m, s in est["per_mixer"].items())
        print(f"estimated wall time of lla run {args.experiment} --preset {args.preset}: {est['seconds'] / 60:.1f} min "
              f"({est['trainings']} trainings per mixer and setting; minutes per mixer: {per})")
        return 0
    try:
        runner.run_experiment(args.experiment, args.preset, mixers=args.mixers, out_dir=args.out,
                              progress=not args.no_progress, stop_after=args.stop_after, cfg=cfg,
                              context_parallel=args.context_parallel, seeds=seeds, lrs=args.lrs, restart=args.restart,
                              command="lla " + " ".join(argv), resume=args.resume)
    except CheckpointMismatchError as e:
        raise SystemExit(f"lla run: {e}") from None
    except ValueError as e:
        if args.resume or args.experiment == "lm":  # nothing to resume; a bad corpus
            raise SystemExit(f"lla run: {e}") from None
        raise
    return 0

if __name__ == "__main__":
    sys.exit(main())
