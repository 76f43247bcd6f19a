"""``LocalLinearAttention``: the multi-head (grouped-query) LLA layer.

The layer only calls the public ops (``lla.local_linear_attention`` and
``lla.local_linear_attention_with_kvcache``); projections, qk-norm, rotary, padding, the cache and
context parallelism are ``lla.nn.base.AttentionLayer``'s, shared with ``ParallaxAttention``.  The
experiments' ``"lla"`` mixer (``lla.experiments.mixers.LLAMixer``) is this layer with other defaults.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import local_linear_attention, local_linear_attention_with_kvcache
from .base import AttentionLayer, KVCache, apply_rotary, inverse_softplus_ridge, softplus_ridge

__all__ = ["LocalLinearAttention", "KVCache", "apply_rotary"]


class LocalLinearAttention(AttentionLayer):
    """Multi-head Local Linear Attention layer: ``[B, T, d_model] -> [B, T, d_model]``, causal.

    Args:
        d_model: model width.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hk`` (grouped-query; ``H % Hk == 0``), default ``H``.
        head_dim: per-head dim, default ``d_model // num_heads``.
        bias: biases in the q/k/v/o projections.
        fused_qkv: one ``qkv_proj`` (``d_model -> (H + 2 Hk) * head_dim``, q then k then v) instead of
            ``q_proj``, ``k_proj``, ``v_proj`` (the experiments' mixers use it).
        rope: rotary position embeddings on q and k (``rope_base`` their base).
        qk_norm: RMS-normalise q and k per head (learnable gain) before the rotary embedding.
        window: attend to the last ``window`` tokens only (the query's own included); None = all.
        ridge_init: initial ridge of every head.
        ridge_floor: lower bound of the ridge.  The per-head ridge is
            ``ridge_floor + softplus(raw_ridge)`` (``lla.nn.base.softplus_ridge``, the one ridge
            parameterisation of the package), positive by construction and never below the floor.
            Default 1e-3; the experiments' ``"lla"`` mixer uses ``ridge_floor=1e-2``,
            ``ridge_init=1.0``.  See "What the ridge means" below.
        learn_ridge: make the ridge a parameter (else a buffer).
        scale: logit scale, default ``1 / sqrt(head_dim)``.
        solver: passed to the op (``"auto"``, ``"cg"``, ``"direct"``).
        layer_idx: key of this layer in a ``KVCache``.
        cp_group: a ``torch.distributed`` process group for context parallelism (``None``: off).
            Then ``x`` is this rank's shard of the sequence in the layout ``cp_sharding``
            (``lla.distributed.shard``), rotary positions default to the shard's global positions,
            and attention runs through ``lla.distributed.context_parallel_attention`` (no
            ``attention_mask`` or ``cache``).
        cp_sharding: ``"zigzag"`` (default) or ``"contiguous"``.

    What the ridge means: it is added to the softmax-weighted covariance of the keys around the
    query, ``Sigma = sum_j s_j (k_j - q)(k_j - q)^T + ridge * I``, so it is measured in squared key
    units, not dimensionless: scaling queries and keys by ``c`` (with the logit scale divided by
    ``c^2``, so the weights stay put) gives exactly the output of the unscaled inputs with the
    ridge divided by ``c^2``.  What matters is ``ridge`` relative to the key spread.
    With ``qk_norm=True`` each key has RMS 1 per component times the norm's gain before the
    (norm-preserving) rotary embedding, i.e. ``|k| ~ sqrt(head_dim) * gain``: the floor is relative
    to a known scale, and float32 solves keep their digits as long as ``ridge`` is not tiny next
    to ``head_dim * gain^2``.  Without ``qk_norm`` the key scale is whatever the projections make
    it, so the floor's strength drifts with them: keys grown 10x in training make a fixed floor
    100x weaker (and a float32 solve at the floor correspondingly worse conditioned; the op warns,
    ``LLAConvergenceWarning``).  Use ``qk_norm=True`` when the floor should mean something fixed.

    ``forward(x, attention_mask=None, cache=None, position_ids=None)``: see ``AttentionLayer.forward``.
    """

    op = staticmethod(local_linear_attention)
    kvcache_op = staticmethod(local_linear_attention_with_kvcache)
    mechanism = "lla"

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        ridge_init: float = 1.0,
        ridge_floor: float = 1e-3,
        learn_ridge: bool = True,
        solver: str = "auto",
        **layer_options,
    ):
        """``layer_options``: ``AttentionLayer``'s (``bias``, ``fused_qkv``, ``rope``, ``rope_base``,
        ``qk_norm``, ``window``, ``scale``, ``layer_idx``, ``cp_group``, ``cp_sharding``, ``device``,
        ``dtype``)."""
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, **layer_options)
        dtype, device = layer_options.get("dtype"), layer_options.get("device")
        raw = inverse_softplus_ridge(self.num_heads, ridge_init, ridge_floor, dtype=dtype, device=device)
        self.ridge_floor, self.solver = ridge_floor, solver
        if learn_ridge:
            self.raw_ridge = nn.Parameter(raw)
        else:
            self.register_buffer("raw_ridge", raw)

    @property
    def ridge(self) -> torch.Tensor:
        """Per-head ridge ``[H]`` = ``ridge_floor + softplus(raw_ridge)`` (float32, or float64)."""
        return softplus_ridge(self.raw_ridge, self.ridge_floor)

    def op_kwargs(self) -> dict:
        return {**super().op_kwargs(), "ridge": self.ridge, "solver": self.solver}
