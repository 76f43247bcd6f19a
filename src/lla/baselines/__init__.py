"""Baseline token mixers as functional ops, layout ``[B, T, H, D]`` like ``lla.local_linear_attention``.

Each module holds the fast form and a ``*_naive`` form written straight from the definition (loops /
dense masks); tests compare the two.

- ``softmax_attention``: scaled dot-product attention (SDPA), grouped-query.
- ``sliding_window_attention``: softmax attention over the last ``window`` keys.
- ``linear_attention``: causal linear attention, chunkwise, with a choice of feature map.
- ``mesa_attention``: global ridge-regression attention (MesaNet / OLS limit), exact solve.
- ``gated_delta_attention``: gated DeltaNet, a plain per-token recurrence.
"""

from .deltanet import gated_delta_attention, gated_delta_attention_naive
from .linear import FEATURE_MAPS, linear_attention, linear_attention_naive
from .mesa import mesa_attention, mesa_attention_naive
from .softmax import sliding_window_attention, sliding_window_attention_naive, softmax_attention, softmax_attention_naive

__all__ = [
    "softmax_attention",
    "softmax_attention_naive",
    "sliding_window_attention",
    "sliding_window_attention_naive",
    "linear_attention",
    "linear_attention_naive",
    "FEATURE_MAPS",
    "mesa_attention",
    "mesa_attention_naive",
    "gated_delta_attention",
    "gated_delta_attention_naive",
]
