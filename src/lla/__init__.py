"""lla: Local Linear Attention (Zuo et al., ICLR 2026) for PyTorch."""

from .ops import (
    LLAAux,
    LLAConvergenceWarning,
    local_linear_attention,
    local_linear_attention_ref,
    local_linear_attention_with_kvcache,
    parallax_attention,
    parallax_attention_ref,
    parallax_attention_with_kvcache,
)

from . import nn  # noqa: E402  (layers; after the ops they build on)
from . import distributed  # noqa: E402  (context parallelism over torch.distributed)

__version__ = "0.1.0"

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
