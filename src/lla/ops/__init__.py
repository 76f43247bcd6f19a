"""Attention operators, one folder per mechanism (``lla/``, ``parallax/``), each with its float64
reference, backends, decode path and public op, both standing on ``common/`` (argument checks, varlen,
masks, KV-cache helpers, backend/solver/precision policy, diagnostics, the backend result type, Triton
helpers).  Neither mechanism imports the other."""

from .common.diagnostics import LLAConvergenceWarning
from .lla import LLAAux, local_linear_attention, local_linear_attention_ref, local_linear_attention_with_kvcache
from .parallax import parallax_attention, parallax_attention_ref, parallax_attention_with_kvcache

__all__ = [
    "local_linear_attention",
    "local_linear_attention_with_kvcache",
    "local_linear_attention_ref",
    "LLAAux",
    "LLAConvergenceWarning",
    "parallax_attention",
    "parallax_attention_with_kvcache",
    "parallax_attention_ref",
]
