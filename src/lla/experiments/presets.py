"""Experiment configurations: ``PRESETS[experiment][preset]`` (plain dicts, JSON-serialisable).

smoke: seconds on CPU (tests).  quick: under 15 minutes each on 2 idle CPU cores, sized so that the
effect the paper reports can show (ICR at d = 2, the swap task at N = 3..5).  paper: the paper's
sizes (GPU).
"""

from __future__ import annotations

import copy

EXPERIMENTS = ("ttr", "icr", "mqar", "state")
DEFAULT_MIXERS = {
    "ttr": ["lla", "softmax", "mesa", "linear"],
    "icr": ["lla", "softmax", "mesa", "linear"],
    "mqar": ["lla", "softmax", "mesa", "linear"],
    "state": ["lla", "softmax", "mesa", "linear"],
}

_TTR = {"seq_len": 1024, "noise": 0.1, "ridge": 0.1, "seed": 0}
_MODEL = {"d_model": 64, "num_heads": 2, "n_layers": 2, "mlp": True}
_TRAIN = {"lr": 1e-3, "weight_decay": 0.1, "warmup": 20, "grad_clip": 1.0, "seed": 0, "log_every": 10}

PRESETS = {
    "ttr": {
        "smoke": {**_TTR, "seq_len": 96, "batch": 2, "dims": [4], "seg_lens": [32], "shifts": [2.0]},
        "demo": {**_TTR, "batch": 32, "dims": [8], "seg_lens": [128], "shifts": [2.0, 0.0]},
        "quick": {**_TTR, "batch": 32, "dims": [4, 8, 16, 32], "seg_lens": [64, 128, 256], "shifts": [2.0, 0.0]},
        "paper": {**_TTR, "batch": 256, "dims": [4, 8, 16, 32], "seg_lens": [32, 64, 128, 256, 512], "shifts": [2.0, 0.0]},
    },
    "mqar": {
        "smoke": {"vocab": 64, "train_configs": [[32, 4]], "eval_configs": [[32, 4]], "eval_batch": 8, "eval_batches": 1,
                  "model": {**_MODEL, "d_model": 32}, "train": {**_TRAIN, "steps": 3, "batch_size": 8, "warmup": 1}},
        "quick": {"vocab": 128, "train_configs": [[32, 4], [64, 8]], "eval_configs": [[32, 4], [64, 4], [64, 8], [64, 12]],
                  "eval_batch": 128, "eval_batches": 2,
                  "model": {**_MODEL, "num_heads": 4, "mlp": False},
                  "train": {**_TRAIN, "steps": 800, "batch_size": 32, "lr": 3e-3}},
        "paper": {"vocab": 8192, "train_configs": [[64, 4], [128, 8], [256, 16], [256, 32], [256, 64]],
                  "eval_configs": [[64, 4], [128, 8], [256, 16], [512, 64], [1024, 128], [1024, 256]],
                  "eval_batch": 256, "eval_batches": 4,
                  "model": {**_MODEL, "d_model": 128, "mlp": False},
                  "train": {**_TRAIN, "steps": 20000, "batch_size": 256, "lr": 1e-3, "warmup": 500}},
    },
    "icr": {
        "smoke": {"dim": 4, "n_pairs": 16, "seg_lens": [8], "shift": 0.0, "noise": 0.0, "eval_batch": 8, "baselines": True,
                  "model": {**_MODEL, "d_model": 32, "mlp": False}, "train": {**_TRAIN, "steps": 3, "batch_size": 8, "warmup": 1}},
        "quick": {"dim": 2, "n_pairs": 32, "seg_lens": [4, 16], "shift": 0.0, "noise": 0.0, "eval_batch": 256, "baselines": True,
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
                  "model": {**_MODEL, "num_heads": 4}, "train": {**_TRAIN, "steps": 1500, "batch_size": 32, "lr": 3e-3}},
        "paper": {"groups": ["S3-swap", "S4-swap", "S5-swap", "S6-swap", "Z60", "A5", "S5"], "seq_len": 128, "eval_batch": 1024, "report_lengths": [8, 16, 32, 64, 128],
                  "model": {**_MODEL, "d_model": 256, "num_heads": 4, "n_layers": 4},
                  "train": {**_TRAIN, "steps": 20000, "batch_size": 128, "lr": 3e-4, "warmup": 500}},
    },
}


def get_preset(experiment: str, preset: str) -> dict:
    """A deep copy of ``PRESETS[experiment][preset]`` (ValueError naming the bad argument)."""
    if experiment not in PRESETS:
        raise ValueError(f"experiment must be one of {sorted(PRESETS)}, got {experiment!r}")
    if preset not in PRESETS[experiment]:
        raise ValueError(f"preset must be one of {sorted(PRESETS[experiment])} for {experiment}, got {preset!r}")
    return copy.deepcopy(PRESETS[experiment][preset])
