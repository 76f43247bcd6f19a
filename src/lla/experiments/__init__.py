"""The paper's synthetic experiments: tasks, the small causal model, the training loop, the runner.

``lla run EXPERIMENT --preset smoke|quick|paper`` (``lla.experiments.runner.run_experiment``) and
``lla demo`` (``lla.experiments.runner.demo``) are the entry points.
"""

from .presets import EXPERIMENTS, PRESETS, get_preset

__all__ = ["EXPERIMENTS", "PRESETS", "get_preset"]
