"""Experiment configurations: ``PRESETS[experiment][preset]`` (plain dicts, JSON-serialisable).

smoke: seconds on CPU (tests).  quick: sized so that the effect the paper reports can show (ICR at
d = 2, the swap task at N = 3..5) with three seeds and, for trained experiments, a learning-rate
sweep (``lrs``, on the first seed; the other seeds run at each mixer's best rate); the estimated
wall time of each family's full quick run is in docs/experiments.md.  paper: the paper's sizes (GPU).

Keys the runner reads besides the task's own: ``seeds`` (default ``[seed]``), ``lrs`` (trained: the
sweep; absent: ``train.lr`` alone), ``eval_every`` (trained: steps between validation evaluations,
the curve that "steps to reach a target" is read from), ``target`` (``{"metric", "at_least"}``);
ttr: ``hparams`` (per-method grids, tuned on a held-out stream).
"""

from __future__ import annotations

import copy

EXPERIMENTS = ("ttr", "icr", "mqar", "state", "lm")
_TRAINED = ["lla", "parallax", "softmax", "mesa", "linear", "gated_deltanet"]
#: every mixer is used when registered (``parallax`` joins once ``lla.experiments.mixers`` has it)
DEFAULT_MIXERS = {
    "ttr": ["lla", "parallax", "softmax", "mesa", "linear", "gated_deltanet"],
    "icr": list(_TRAINED),
    "mqar": _TRAINED + ["sliding_window"],
    "state": _TRAINED + ["sliding_window"],
    "lm": _TRAINED + ["sliding_window"],
}
SEEDS = [0, 1, 2]
LRS = [1e-3, 3e-3, 1e-2]
#: TTR: each method's own hyperparameter grid (tuned per setting on a held-out stream);
#: softmax ``scale`` multiplies 1/sqrt(d); gated_deltanet is the normalised delta rule (beta / |k|^2)
#: with a constant decay alpha
# grids widened (three times) until no method's chosen value sits on an edge it could move past: the first tuned
# run put lla (0.01, 1), mesa (1), softmax (0.5) and gated DeltaNet (beta 1) on their grids' edges
TTR_HPARAMS = {
    "lla": {"ridge": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]},
    "mesa": {"ridge": [1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]},
    "softmax": {"scale": [1 / 32, 1 / 16, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0]},
    "linear": {"feature_map": ["elu1", "relu"]},
    "gated_deltanet": {"beta": [0.1, 0.3, 1.0, 1.5, 1.9], "alpha": [0.9, 0.97, 1.0]},
    # untrained Parallax: r_i = gain (m_i - q_i) (``tasks.ttr._parallax_untrained``)
    "parallax": {"gain": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]},
}

_TTR = {"seq_len": 1024, "noise": 0.1, "ridge": 0.1, "seed": 0, "hparams": TTR_HPARAMS, "dtype": "float64"}
_MODEL = {"d_model": 64, "num_heads": 2, "n_layers": 2, "mlp": True}
_TRAIN = {"lr": 1e-3, "weight_decay": 0.1, "warmup": 20, "grad_clip": 1.0, "seed": 0, "log_every": 10}

PRESETS = {
    "ttr": {
        "smoke": {**_TTR, "seq_len": 96, "batch": 2, "dims": [4], "seg_lens": [32], "shifts": [2.0]},
        "demo": {**_TTR, "hparams": {}, "dtype": "float32", "batch": 32, "dims": [8], "seg_lens": [128], "shifts": [2.0, 0.0]},
        # the d sweep at one segment length (128) and 16 streams per seed: d = 64 costs ~10x d = 8
        "quick": {**_TTR, "batch": 16, "dims": [2, 4, 8, 16, 32, 64], "seg_lens": [128], "shifts": [2.0, 0.0],
                  "seeds": SEEDS},
        "paper": {**_TTR, "batch": 256, "dims": [4, 8, 16, 32], "seg_lens": [32, 64, 128, 256, 512], "shifts": [2.0, 0.0]},
    },
    "mqar": {
        "smoke": {"vocab": 64, "train_configs": [[32, 4]], "eval_configs": [[32, 4]], "eval_batch": 8, "eval_batches": 1,
                  "positions": "learned", "eval_every": 1, "target": {"metric": "accuracy", "at_least": 0.99},
                  "model": {**_MODEL, "d_model": 32}, "train": {**_TRAIN, "steps": 3, "batch_size": 8, "warmup": 1}},
        "quick": {"vocab": 128, "train_configs": [[32, 4], [64, 8]], "eval_configs": [[32, 4], [64, 4], [64, 8], [64, 12]],
                  "eval_batch": 128, "eval_batches": 2, "positions": "learned",
                  "seeds": SEEDS, "lrs": LRS, "eval_every": 100, "target": {"metric": "accuracy", "at_least": 0.99},
                  "model": {**_MODEL, "num_heads": 4, "mlp": False},
                  "train": {**_TRAIN, "steps": 1500, "batch_size": 32, "lr": 3e-3}},
        "paper": {"vocab": 8192, "train_configs": [[64, 4], [128, 8], [256, 16], [256, 32], [256, 64]],
                  "eval_configs": [[64, 4], [128, 8], [256, 16], [512, 64], [1024, 128], [1024, 256]],
                  "eval_batch": 256, "eval_batches": 4,
                  "model": {**_MODEL, "d_model": 128, "mlp": False},
                  "train": {**_TRAIN, "steps": 20000, "batch_size": 256, "lr": 1e-3, "warmup": 500}},
    },
    "icr": {
        "smoke": {"dim": 4, "n_pairs": 16, "seg_lens": [8], "shift": 0.0, "noise": 0.0, "eval_batch": 8, "baselines": True,
                  "model": {**_MODEL, "d_model": 32, "mlp": False}, "train": {**_TRAIN, "steps": 3, "batch_size": 8, "warmup": 1}},
        # three segment lengths 4x apart (the "most at short segments" claim) at 600 steps (~36 min of 2 cores)
        "quick": {"dim": 2, "n_pairs": 32, "seg_lens": [2, 8, 32], "shift": 0.0, "noise": 0.0, "eval_batch": 256, "baselines": True,
                  "seeds": SEEDS, "lrs": LRS, "eval_every": 100,
                  "model": {**_MODEL, "num_heads": 4, "mlp": False}, "train": {**_TRAIN, "steps": 600, "batch_size": 32, "lr": 3e-3}},
        # the paper's "most at short segments" claim: the quick setting over five segment lengths
        "seglens": {"dim": 2, "n_pairs": 32, "seg_lens": [2, 4, 8, 16, 32], "shift": 0.0, "noise": 0.0, "eval_batch": 256,
                    "baselines": True, "seeds": SEEDS, "lrs": LRS, "eval_every": 100,
                    "model": {**_MODEL, "num_heads": 4, "mlp": False}, "train": {**_TRAIN, "steps": 1200, "batch_size": 32, "lr": 3e-3}},
        "paper": {"dim": 32, "n_pairs": 256, "seg_lens": [16, 32, 64, 128, 256], "shift": 0.0, "noise": 0.0,
                  "eval_batch": 1024, "baselines": True,
                  "model": {**_MODEL, "d_model": 256, "num_heads": 4, "mlp": False},
                  "train": {**_TRAIN, "steps": 20000, "batch_size": 64, "lr": 3e-4, "warmup": 500}},
    },
    "state": {
        "smoke": {"groups": ["A5"], "seq_len": 8, "eval_batch": 8, "report_lengths": [4, 8],
                  "model": {**_MODEL, "d_model": 32}, "train": {**_TRAIN, "steps": 3, "batch_size": 8, "warmup": 1}},
        "quick": {"groups": ["S3-swap", "S4-swap", "S5-swap"], "seq_len": 16, "eval_batch": 256, "report_lengths": [2, 4, 8, 16],
                  "seeds": SEEDS, "lrs": LRS, "eval_every": 100,
                  "model": {**_MODEL, "num_heads": 4}, "train": {**_TRAIN, "steps": 1200, "batch_size": 32, "lr": 3e-3}},
        "paper": {"groups": ["S3-swap", "S4-swap", "S5-swap", "S6-swap", "Z60", "A5", "S5"], "seq_len": 128, "eval_batch": 1024, "report_lengths": [8, 16, 32, 64, 128],
                  "model": {**_MODEL, "d_model": 256, "num_heads": 4, "n_layers": 4},
                  "train": {**_TRAIN, "steps": 20000, "batch_size": 128, "lr": 3e-4, "warmup": 500}},
    },
}


# Language modelling (bytes; default corpus: the interpreter's stdlib source, see tasks/lm.py).
# quick: sized from the lead's 1-thread step timings on this CPU (B 16, T 128, d_model 128, 4 layers, 4 heads:
# lla 0.73 s, mesa 0.96 s, gated_deltanet 0.79 s, softmax 0.19 s); 400 steps, 3 rates on seed 0, then seeds 0 1 2.
# eval: 32 fixed val windows every 50 steps (lr selection, curves), 128 fixed test windows at the end.
_LM_MODEL = {"d_model": 128, "num_heads": 4, "n_layers": 4, "mlp": True, "mlp_ratio": 4, "rope": True, "tie_embeddings": True}
_LM_TRAIN = {**_TRAIN, "weight_decay": 0.1, "grad_clip": 1.0, "dtype": "fp32"}
PRESETS["lm"] = {
    # every mixer trains a few dozen steps of a tiny model on the stdlib (< 3 min on 2 cores for all seven)
    "smoke": {"corpus": None, "context": 64, "eval_windows": 8, "test_windows": 16, "eval_batch": 16, "eval_every": 10,
              "mixer_kwargs": {"sliding_window": {"window": 16}},
              "model": {**_LM_MODEL, "d_model": 32, "num_heads": 2, "n_layers": 2},
              "train": {**_LM_TRAIN, "steps": 30, "batch_size": 8, "warmup": 5, "lr": 3e-3, "ckpt_every": 10}},
    "quick": {"corpus": None, "context": 128, "eval_windows": 32, "test_windows": 128, "eval_batch": 32, "eval_every": 50,
              "mixer_kwargs": {"sliding_window": {"window": 32}}, "seeds": SEEDS, "lrs": LRS,
              "model": dict(_LM_MODEL),
              "train": {**_LM_TRAIN, "steps": 400, "batch_size": 16, "warmup": 40, "lr": 3e-3, "ckpt_every": 100}},
    # GPU-sized (not run here): ~25M parameters, 1K-byte context, 64 x 1024 bytes per step
    "paper": {"corpus": None, "context": 1024, "eval_windows": 256, "test_windows": 2048, "eval_batch": 32, "eval_every": 1000,
              "mixer_kwargs": {"sliding_window": {"window": 256}}, "seeds": SEEDS, "lrs": [3e-4, 1e-3, 3e-3],
              "model": {**_LM_MODEL, "d_model": 512, "num_heads": 8, "n_layers": 8},
              "train": {**_LM_TRAIN, "steps": 50000, "batch_size": 64, "warmup": 1000, "lr": 1e-3, "ckpt_every": 1000,
                        "log_every": 50, "dtype": "bf16"}},
}


def get_preset(experiment: str, preset: str) -> dict:
    """A deep copy of ``PRESETS[experiment][preset]`` (ValueError naming the bad argument)."""
    if experiment not in PRESETS:
        raise ValueError(f"experiment must be one of {sorted(PRESETS)}, got {experiment!r}")
    if preset not in PRESETS[experiment]:
        raise ValueError(f"preset must be one of {sorted(PRESETS[experiment])} for {experiment}, got {preset!r}")
    return copy.deepcopy(PRESETS[experiment][preset])
