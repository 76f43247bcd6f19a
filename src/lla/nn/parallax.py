"""``ParallaxAttention``: a multi-head (grouped-query) Parallax layer with a KV cache for generation.

The layer only calls the public ops (``lla.parallax_attention`` and
``lla.parallax_attention_with_kvcache``); projections, qk-norm, rotary, padding, the cache (an
``lla.nn.KVCache``) and context parallelism are ``lla.nn.base.AttentionLayer``'s, shared with
``LocalLinearAttention``.  The experiments' ``"parallax"`` mixer is this layer with other defaults.
"""

from __future__ import annotations

from torch import nn

from ..ops.parallax import parallax_attention, parallax_attention_with_kvcache
from .base import AttentionLayer

__all__ = ["ParallaxAttention"]


class ParallaxAttention(AttentionLayer):
    """Multi-head Parallax layer: ``[B, T, d_model] -> [B, T, d_model]``, causal.

    Projections ``q``, ``r`` (the slope query, shaped like ``q``), ``k``, ``v`` and ``o``; per head
    ``o_i = sum_j s_ij (1 + c_i - r_i . k_j) v_j`` (see ``lla.parallax_attention``).

    Args:
        d_model: model width.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hk`` (grouped-query; ``H % Hk == 0``), default ``H``.
        head_dim: per-head dim, default ``d_model // num_heads``.
        bias: biases in the projections.
        fused_qkv: one ``qkv_proj`` for q, k and v (``r_proj`` stays separate), as in
            ``LocalLinearAttention``.
        qk_norm: RMS-normalise q, r and k per head (learnable gains), as the paper's reference layer.
        rope: rotary position embeddings on q, r and k (default off: the paper's layer is positionless).
        rope_base: rotary base.
        window: attend to the last ``window`` tokens only (the query's own included); None = all.
        zero_init_r: start ``r_proj`` at zero, so that the layer starts as softmax attention.
        scale: logit scale, default ``1 / sqrt(head_dim)``.
        layer_idx: key of this layer in a ``KVCache``.
        cp_group, cp_sharding: context parallelism, as in ``LocalLinearAttention``.

    ``forward(x, attention_mask=None, cache=None, position_ids=None)``: see ``AttentionLayer.forward``.
    """

    op = staticmethod(parallax_attention)
    kvcache_op = staticmethod(parallax_attention_with_kvcache)
    mechanism = "parallax"
    extra_queries = ("r",)

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        rope: bool = False,
        zero_init_r: bool = True,
        **layer_options,
    ):
        """``layer_options``: ``AttentionLayer``'s (``bias``, ``fused_qkv``, ``rope_base``, ``qk_norm``,
        ``window``, ``scale``, ``layer_idx``, ``cp_group``, ``cp_sharding``, ``device``, ``dtype``)."""
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, rope=rope, **layer_options)
        if zero_init_r:
            nn.init.zeros_(self.r_proj.weight)
            if self.r_proj.bias is not None:
                nn.init.zeros_(self.r_proj.bias)
