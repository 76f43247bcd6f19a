"""``LocalLinearAttention``: a multi-head (grouped-query) LLA layer, and ``LLACache`` for generation.

The layer only calls the public ops (``lla.local_linear_attention`` and
``lla.local_linear_attention_with_kvcache``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import local_linear_attention, local_linear_attention_with_kvcache

__all__ = ["LocalLinearAttention", "LLACache", "apply_rotary", "padded_causal_attention"]


def padded_causal_attention(q, k, v, mask, **op_kwargs):
    """Causal LLA of a padded batch, with static shapes (no ``nonzero``, works under
    ``torch.compile(fullgraph=True)``).

    q ``[B, T, H, D]``, k ``[B, T, Hk, D]``, v ``[B, T, Hk, Dv]``, mask ``[B, T]`` bool (True = real
    token; any pattern: left, right or interior padding).  Each sequence's real tokens attend
    causally among themselves, exactly as if run alone; padded rows output zeros.

    How: a stable sort moves each sequence's real tokens to the front, in order (a gather); then
    the causal op runs on the whole ``[B, T]`` batch: a real query at sorted position ``i`` sees
    keys ``0..i``, all real, so padded keys are invisible to every real row without any key mask.
    Padded rows (at the back) are given zero q/k/v, so whatever they compute is finite, and their
    output is zeroed (and so is every gradient through them).  A window in ``op_kwargs`` counts
    real tokens only.  ``op_kwargs`` go to ``lla.local_linear_attention`` (the ridge must not be
    per position).  Returns ``o [B, T, H, Dv]``.
    """
    B, T = mask.shape
    order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)  # [B, T]: real tokens first

    def index(t):
        return order.view(B, T, *([1] * (t.dim() - 2))).expand(t.shape)

    keep = mask.gather(1, order)[:, :, None, None]  # [B, T, 1, 1]: True for the first n_b
    qs, ks, vs = (t.gather(1, index(t)).masked_fill(~keep, 0.0) for t in (q, k, v))
    o = local_linear_attention(qs, ks, vs, causal=True, **op_kwargs).masked_fill(~keep, 0.0)
    return torch.zeros_like(o).scatter(1, index(o), o)  # back to the input order


class LLACache:
    """Key/value cache of ``LocalLinearAttention`` layers for generation.

    One entry per ``layer_idx``: ``k [B, S_max, Hk, D]``, ``v [B, S_max, Hk, Dv]`` and the filled
    lengths ``seqlens [B]`` (int64; may differ across the batch when a padding mask was given).
    Buffers grow by doubling when a step would overflow them, so ``max_len`` is only a first size.
    Each layer advances its own lengths after it has appended its keys.
    """

    def __init__(self, max_len: int = 256):
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        self.max_len = max_len
        self.layers: dict[int, list] = {}

    def seqlens(self, layer_idx: int = 0, batch_size: int | None = None, device=None) -> torch.Tensor:
        """Filled lengths ``[B]`` of a layer (zeros if the layer has not been called yet)."""
        if layer_idx in self.layers:
            return self.layers[layer_idx][2]
        return torch.zeros(batch_size or 1, dtype=torch.int64, device=device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Longest filled length of a layer."""
        if layer_idx not in self.layers:
            return 0
        return int(self.layers[layer_idx][2].max())

    def buffers(self, layer_idx: int, B: int, need: int, Hk: int, D: int, Dv: int, dtype, device):
        """The layer's ``(k_cache, v_cache, seqlens)``, allocated or grown to hold ``need`` entries."""
        entry = self.layers.get(layer_idx)
        if entry is None:
            size = max(self.max_len, need)
            entry = [
                torch.zeros(B, size, Hk, D, dtype=dtype, device=device),
                torch.zeros(B, size, Hk, Dv, dtype=dtype, device=device),
                torch.zeros(B, dtype=torch.int64, device=device),
            ]
            self.layers[layer_idx] = entry
        k_cache, v_cache, seqlens = entry
        if k_cache.shape[0] != B or k_cache.shape[2:] != (Hk, D) or v_cache.shape[3] != Dv:
            raise ValueError(
                f"cache of layer {layer_idx} holds [B, S, Hk, D] = {list(k_cache.shape)}, got B={B}, Hk={Hk}, D={D}"
            )
        if need > k_cache.shape[1]:
            size = max(need, 2 * k_cache.shape[1])
            grow = lambda c: torch.cat([c, c.new_zeros(B, size - c.shape[1], *c.shape[2:])], dim=1)  # noqa: E731
            entry[0], entry[1] = grow(k_cache), grow(v_cache)
        return entry[0], entry[1], seqlens

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch (beam search)."""
        for entry in self.layers.values():
            for i in range(3):
                entry[i] = entry[i].index_select(0, beam_idx.to(entry[i].device))


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (rotate-half convention).  x [B, T, H, D] (D even), positions [B, T]."""
    D = x.shape[-1]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=cdt) / D)  # [D/2]
    angles = positions.to(cdt)[..., None] * inv_freq  # [B, T, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, :, None, :]  # [B, T, 1, D]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cdt) * cos + rotated.to(cdt) * sin).to(x.dtype)


class LocalLinearAttention(nn.Module):
    """Multi-head Local Linear Attention layer: ``[B, T, d_model] -> [B, T, d_model]``, causal.

    Args:
        d_model: model width.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hk`` (grouped-query; ``H % Hk == 0``), default ``H``.
        head_dim: per-head dim, default ``d_model // num_heads``.
        bias: biases in the q/k/v/o projections.
        rope: rotary position embeddings on q and k (``rope_base`` their base).
        qk_norm: RMS-normalise q and k per head (learnable gain) before the rotary embedding.
        ridge_init: initial ridge of every head.
        ridge_floor: lower bound of the ridge.  The per-head ridge is
            ``ridge_floor + softplus(raw)``, positive by construction and never below the floor
            (default 1e-3).  See "What the ridge means" below.

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
        learn_ridge: make the ridge a parameter (else a buffer).
        scale: logit scale, default ``1 / sqrt(head_dim)``.
        solver: passed to the op (``"auto"``, ``"cg"``, ``"direct"``).
        layer_idx: key of this layer in an ``LLACache``.
        cp_group: a ``torch.distributed`` process group for context parallelism (``None``: off).
            Then ``x`` is this rank's shard of the sequence in the layout ``cp_sharding``
            (``lla.distributed.shard``), rotary positions default to the shard's global positions,
            and attention runs through ``lla.distributed.context_parallel_attention`` (no
            ``attention_mask`` or ``cache``).
        cp_sharding: ``"zigzag"`` (default) or ``"contiguous"``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        bias: bool = False,
        rope: bool = True,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        ridge_init: float = 1.0,
        ridge_floor: float = 1e-3,
        learn_ridge: bool = True,
        scale: float | None = None,
        solver: str = "auto",
        layer_idx: int = 0,
        cp_group=None,
        cp_sharding: str = "zigzag",
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, val in (("d_model", d_model), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        head_dim = d_model // num_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim} (d_model {d_model} < num_heads {num_heads}?)")
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        if not (ridge_floor >= 0 and ridge_init > ridge_floor):
            raise ValueError(f"need ridge_init > ridge_floor >= 0, got ridge_init={ridge_init}, ridge_floor={ridge_floor}")
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.rope, self.rope_base, self.ridge_floor = rope, rope_base, ridge_floor
        self.scale, self.solver, self.layer_idx = scale, solver, layer_idx
        self.cp_group, self.cp_sharding = cp_group, cp_sharding
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias, **kw)
        self.q_norm = nn.RMSNorm(head_dim, **kw) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, **kw) if qk_norm else None
        # inverse softplus of (ridge_init - floor), so that ridge == ridge_init at start
        gap = ridge_init - ridge_floor
        rdt = torch.float64 if dtype == torch.float64 else torch.float32  # kept >= float32 in bf16 models
        raw = torch.full((num_heads,), gap + math.log(-math.expm1(-gap)), dtype=rdt, device=device)
        if learn_ridge:
            self.raw_ridge = nn.Parameter(raw)
        else:
            self.register_buffer("raw_ridge", raw)

    @property
    def ridge(self) -> torch.Tensor:
        """Per-head ridge ``[H]`` = ``ridge_floor + softplus(raw_ridge)`` (float32, or float64)."""
        return self.ridge_floor + F.softplus(self.raw_ridge)

    def _project(self, x, positions):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rotary(q, positions, self.rope_base), apply_rotary(k, positions, self.rope_base)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: LLACache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model].

        attention_mask: ``[B, T]`` (bool or 0/1) marking the real tokens of this call.  Each
            sequence's real tokens attend causally among themselves (and to its cached entries);
            padded positions are invisible to them and output zeros before ``o_proj``.  Without a
            cache this path has static shapes (``padded_causal_attention``), so
            ``torch.compile(layer, fullgraph=True)`` works with a mask.
        cache: an ``LLACache``: this call's keys/values are appended to it and the queries attend
            to everything cached for their sequence (chunked prefill or one-token decoding).
        position_ids: ``[B, T]`` rotary positions; default: the index among the sequence's real
            tokens, counting cached ones.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, T, d_model={self.d_model}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        if self.cp_group is not None:
            return self._context_parallel(x, attention_mask, cache, position_ids)
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must be [B, T] = {[B, T]}, got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=x.device, dtype=torch.bool)
            if not torch.compiler.is_compiling() and bool(mask.all()):
                mask = None  # (under torch.compile a mask always takes the padded path: no host read)
        past = cache.seqlens(self.layer_idx, B, x.device) if cache is not None else torch.zeros(B, dtype=torch.int64, device=x.device)
        if position_ids is None:
            local = torch.arange(T, device=x.device).expand(B, T) if mask is None else mask.long().cumsum(1) - 1
            position_ids = past[:, None] + local.clamp_min(0)
        q, k, v = self._project(x, position_ids)
        ridge = self.ridge
        kw = {"ridge": ridge, "scale": self.scale, "solver": self.solver}
        if cache is None:
            if mask is None:
                o = local_linear_attention(q, k, v, causal=True, **kw)
            else:
                o = padded_causal_attention(q, k, v, mask, **kw)
        else:
            o = self._cached(q, k, v, mask, cache, kw)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _context_parallel(self, x, attention_mask, cache, position_ids):
        """x is this rank's shard of the sequence (``lla.distributed``)."""
        from ..distributed import context_parallel_attention, shard_positions

        if attention_mask is not None or cache is not None:
            raise ValueError("attention_mask and cache are not supported with cp_group (context parallelism)")
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = shard_positions(T, self.cp_group, self.cp_sharding, device=x.device).expand(B, T)
        q, k, v = self._project(x, position_ids)
        o = context_parallel_attention(q, k, v, ridge=self.ridge, scale=self.scale, solver=self.solver,
                                       group=self.cp_group, sharding=self.cp_sharding)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _cached(self, q, k, v, mask, cache, kw):
        """Append this call's keys/values to the cache and attend against it."""
        B, T, H, D = q.shape
        n_new = mask.sum(1) if mask is not None else torch.full((B,), T, dtype=torch.int64, device=q.device)
        past = cache.seqlens(self.layer_idx, B, q.device)
        need = int((past + n_new).max())
        k_cache, v_cache, seqlens = cache.buffers(self.layer_idx, B, need, self.num_kv_heads, D, v.shape[-1], k.dtype, k.device)
        if mask is None:
            o = local_linear_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, **kw)
        else:
            o = q.new_zeros(B, T, H, v.shape[-1])
            for b in range(B):  # ragged chunk: each sequence appends only its real tokens
                idx = mask[b].nonzero().squeeze(-1)
                if idx.numel() == 0:
                    continue
                ob = local_linear_attention_with_kvcache(
                    q[b : b + 1, idx], k_cache[b : b + 1], v_cache[b : b + 1], k[b : b + 1, idx], v[b : b + 1, idx],
                    cache_seqlens=seqlens[b : b + 1], **kw,
                )
                o = o.index_put((torch.tensor([b], device=q.device), idx), ob[0])
        seqlens += n_new
        return o
