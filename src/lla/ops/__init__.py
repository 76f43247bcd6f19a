"""LLA operators: the public op (``api``), the reference (``reference``) and the backends."""

from .api import LLAAux, LLAConvergenceWarning, local_linear_attention
from .kvcache import local_linear_attention_with_kvcache
from .reference import local_linear_attention_ref

__all__ = [
    "local_linear_attention",
    "local_linear_attention_with_kvcache",
    "local_linear_attention_ref",
    "LLAAux",
    "LLAConvergenceWarning",
]
