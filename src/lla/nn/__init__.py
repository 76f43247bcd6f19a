"""Layers built on the LLA op."""

from .attention import LLACache, LocalLinearAttention
from .mixers import MIXERS, build_mixer
from .parallax import ParallaxAttention

__all__ = ["LocalLinearAttention", "LLACache", "ParallaxAttention", "MIXERS", "build_mixer"]
