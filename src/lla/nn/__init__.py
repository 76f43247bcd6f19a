"""Layers built on the ops: one per mechanism (``lla.py``: ``LocalLinearAttention``, ``parallax.py``:
``ParallaxAttention``) on the shared ``base.py`` (``AttentionLayer``: projections, qk-norm, rotary,
padding, context parallelism; ``KVCache``: the per-layer key/value cache they decode through)."""

import warnings as _warnings

from .base import AttentionLayer, KVCache, padded_attention
from .lla import LocalLinearAttention
from .parallax import ParallaxAttention

__all__ = ["LocalLinearAttention", "ParallaxAttention", "AttentionLayer", "KVCache", "padded_attention"]

#: old names, kept as aliases that warn (``LLACache`` holds any layer's keys and values, not LLA's only;
#: the mixer registry is the experiments', ``lla.experiments.mixers``)
_DEPRECATED = {
    "LLACache": ("lla.nn.KVCache", lambda: KVCache),
    "MIXERS": ("lla.experiments.mixers.MIXERS", lambda: _mixers().MIXERS),
    "build_mixer": ("lla.experiments.mixers.build_mixer", lambda: _mixers().build_mixer),
}


def _mixers():
    # a deprecation alias only: the registry lives above the layers, in the experiments
    from ..experiments import mixers

    return mixers


def __getattr__(name: str):
    if name in _DEPRECATED:
        new, get = _DEPRECATED[name]
        _warnings.warn(f"lla.nn.{name} is deprecated, use {new}", DeprecationWarning, stacklevel=2)
        return get()
    raise AttributeError(f"module 'lla.nn' has no attribute {name!r}")
