"""Layers built on the LLA op."""

from .attention import LLACache, LocalLinearAttention
from .mixers import MIXERS, build_mixer

__all__ = ["LocalLinearAttention", "LLACache", "MIXERS", "build_mixer"]
