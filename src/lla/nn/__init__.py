"""Layers built on the ops: one per mechanism, on the shared ``AttentionLayer`` base, and the
experiments' mixer registry (which adapts them)."""

from .attention import LocalLinearAttention
from .layer import AttentionLayer, LLACache, padded_attention
from .mixers import MIXERS, build_mixer
from .parallax import ParallaxAttention

__all__ = ["LocalLinearAttention", "ParallaxAttention", "AttentionLayer", "LLACache", "padded_attention", "MIXERS", "build_mixer"]
