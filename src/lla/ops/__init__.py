"""Attention operators, one folder per mechanism (``lla/``, ``parallax/``), each with its float64
reference, backends, decode path and public op; ``checks.py`` (argument validation), ``diagnostics.py`` and
``lla.ops.common.triton_utils.py`` are shared."""

from .common.diagnostics import LLAConvergenceWarning
from .lla import LLAAux, local_linear_attention, local_linear_attention_ref, local_linear_attention_with_kvcache

__all__ = [
    "local_linear_attention",
    "local_linear_attention_with_kvcache",
    "local_linear_attention_ref",
    "LLAAux",
    "LLAConvergenceWarning",
]
