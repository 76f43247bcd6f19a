"""What the attention layers share: the ``AttentionLayer`` base (projections, qk-norm, rotary,
padding, KV cache, context parallelism), ``KVCache``, ``apply_rotary`` and ``padded_attention``.

A layer (``LocalLinearAttention``, ``ParallaxAttention``) names its public op and KV-cache op, its
extra query-shaped projections (Parallax's ``r``) and the op's keyword options; everything else
lives here once.  Layers only call the public ops, never a backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionLayer",
    "KVCache",
    "apply_rotary",
    "padded_attention",
    "real_tokens_first",
    "inverse_softplus_ridge",
    "softplus_ridge",
]


# ------------------------------------------------------------------------------------- the ridge
def inverse_softplus_ridge(num_heads: int, ridge_init: float, ridge_floor: float, *, dtype=None, device=None) -> torch.Tensor:
    """Raw per-head values ``[H]`` such that ``softplus_ridge(raw, ridge_floor) == ridge_init``.

    The one ridge parameterisation of the package: ``ridge = ridge_floor + softplus(raw)``, positive
    by construction and never below the floor.  Float32 at least (float64 when ``dtype`` is).
    """
    if not (ridge_floor >= 0 and ridge_init > ridge_floor):
        raise ValueError(f"need ridge_init > ridge_floor >= 0, got ridge_init={ridge_init}, ridge_floor={ridge_floor}")
    gap = ridge_init - ridge_floor
    rdt = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.full((num_heads,), gap + math.log(-math.expm1(-gap)), dtype=rdt, device=device)


def softplus_ridge(raw: torch.Tensor, ridge_floor: float) -> torch.Tensor:
    """``ridge_floor + softplus(raw)``, computed in float32 at least (raw may have been cast to bf16)."""
    if raw.dtype != torch.float64:
        raw = raw.float()
    return ridge_floor + F.softplus(raw)


# ------------------------------------------------------------------------------------- rotary, cache
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


class KVCache:
    """Key/value cache of the attention layers (``LocalLinearAttention``, ``ParallaxAttention``).

    One entry per ``layer_idx``: ``k [B, S_max, Hk, D]``, ``v [B, S_max, Hk, Dv]`` and the filled
    lengths ``seqlens [B]`` (int64; may differ across the batch when a padding mask was given).
    Entries past a sequence's filled length are scratch (a padded chunk writes its pads there).
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


# ------------------------------------------------------------------------------------- padding
def real_tokens_first(mask: torch.Tensor, tensors):
    """Move each sequence's real tokens (``mask [B, T]`` True) to the front, in order, and zero the
    pads now at the back -> ``(order [B, T], keep [B, T, 1, 1], sorted tensors)``.  Static shapes."""
    B, T = mask.shape
    order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)
    keep = mask.gather(1, order)[:, :, None, None]
    index = lambda t: order.view(B, T, *([1] * (t.dim() - 2))).expand(t.shape)  # noqa: E731
    return order, keep, [t.gather(1, index(t)).masked_fill(~keep, 0.0) for t in tensors]


def _restore(o: torch.Tensor, order: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Inverse of ``real_tokens_first`` for an output ``[B, T, H, Dv]``: pads zero, input order."""
    o = o.masked_fill(~keep, 0.0)
    return torch.zeros_like(o).scatter(1, order.view(*order.shape, 1, 1).expand(o.shape), o)


def _sorted_attention(op, queries, k, v, mask, **kw):
    """Causal attention of a padded batch with static shapes (no ``nonzero``: compiles fullgraph).

    After ``real_tokens_first`` a real query at sorted position ``i`` sees keys ``0..i``, all real, so the
    pads (zeroed, at the back) are invisible to every real row without a key mask; their own rows
    are finite and then zeroed, and so is every gradient through them.
    """
    order, keep, tensors = real_tokens_first(mask, (*queries, k, v))
    return _restore(op(*tensors, causal=True, **kw), order, keep)


def _packed_attention(op, queries, k, v, mask, *, causal, **kw):
    """Pack the real tokens of a padded batch into one ``[1, total, ., .]`` sequence, attend with the
    op's ``cu_seqlens`` (one segment per non-empty sequence), unpack; pads output zeros."""
    B, T = mask.shape
    flat = mask.reshape(-1).nonzero().squeeze(-1)  # [total]
    lengths = mask.sum(1)
    lengths = lengths[lengths > 0]
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    pack = lambda t: t.reshape(B * T, *t.shape[2:]).index_select(0, flat)[None]  # noqa: E731
    H, Dv = queries[0].shape[2], v.shape[3]
    out = queries[0].new_zeros(B * T, H, Dv)
    if flat.numel():
        o = op(*(pack(t) for t in (*queries, k, v)), causal=causal, cu_seqlens=cu_seqlens, **kw)
        out = out.index_copy(0, flat, o[0])
    return out.view(B, T, H, Dv)


def padded_attention(op, queries, k, v, mask, *, causal: bool = True, **kw):
    """Self-attention of a padded batch: each sequence's real tokens attend among themselves, exactly
    as if run alone; padded rows output zeros.

    ``op`` is a public op called as ``op(*queries, k, v, causal=..., cu_seqlens=..., **kw)``
    (``lla.local_linear_attention`` with ``queries = (q,)``, ``lla.parallax_attention`` with
    ``(q, r)``); ``queries`` ``[B, T, H, D]`` each, k ``[B, T, Hk, D]``, v ``[B, T, Hk, Dv]``, mask
    ``[B, T]`` bool (True = real token; left, right or interior padding).  Eager: the real tokens
    are packed into one varlen sequence (``cu_seqlens``), no compute on pads.  Under
    ``torch.compile`` a causal call takes the static-shape path instead (real tokens sorted to the
    front, the whole ``[B, T]`` batch attends causally), so ``fullgraph=True`` works.  A window in
    ``kw`` counts real tokens.  Per-position ridges are not supported.  Returns ``[B, T, H, Dv]``.
    """
    if causal and torch.compiler.is_compiling():
        return _sorted_attention(op, queries, k, v, mask, **kw)
    return _packed_attention(op, queries, k, v, mask, causal=causal, **kw)


# ------------------------------------------------------------------------------------- the base layer
class AttentionLayer(nn.Module):
    """Shared shell of the attention layers: ``[B, T, d_model] -> [B, T, d_model]``, causal.

    ``x`` -> ``q`` (and ``extra_queries``, each shaped like ``q``), ``k``, ``v`` -> optional per-head
    RMS norm of every query and ``k`` -> optional rotary -> the op -> ``o_proj``.  A subclass sets
    ``op``, ``kvcache_op``, ``mechanism`` (for ``lla.distributed.context_parallel_attention``),
    ``extra_queries`` and ``op_kwargs()``.

    Args (shared by every layer; the layers document them too):
        d_model, num_heads: model width and query heads ``H``.
        num_kv_heads: key/value heads ``Hk`` (grouped-query; ``H % Hk == 0``), default ``H``.
        head_dim: per-head dim, default ``d_model // num_heads``.
        bias: biases in the projections.
        rope, rope_base: rotary embeddings on every query and on ``k``, and their base.
        qk_norm: per-head RMS norm (learnable gain) of every query and of ``k``, before rotary.
        window: attend to the last ``window`` tokens only (the query's own included); None = all.
        fused_qkv: one ``qkv_proj`` (q, then k, then v) instead of ``q_proj``, ``k_proj``, ``v_proj``.
        scale: logit scale, default ``1 / sqrt(head_dim)``.
        layer_idx: key of this layer in a ``KVCache``.
        cp_group, cp_sharding: context parallelism (``lla.distributed``); ``None``: off.
    """

    op = None  # public op: op(*queries, k, v, causal=..., cu_seqlens=..., **op_kwargs())
    kvcache_op = None  # its KV-cache op: kvcache_op(*queries, k_cache, v_cache, k, v, cache_seqlens=..., **op_kwargs())
    mechanism = ""  # context_parallel_attention's mechanism
    extra_queries: tuple[str, ...] = ()  # further query-shaped projections, passed to the op after q

    def __init__(self, d_model, num_heads, num_kv_heads=None, head_dim=None, *, bias=False, rope=True,
                 rope_base=10000.0, qk_norm=False, window=None, fused_qkv=False, scale=None, layer_idx=0,
                 cp_group=None, cp_sharding="zigzag", device=None, dtype=None):
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
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.rope, self.rope_base, self.window = rope, rope_base, window
        self.scale, self.layer_idx = scale, layer_idx
        self.cp_group, self.cp_sharding = cp_group, cp_sharding
        q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(d_model, q_dim + 2 * kv_dim, bias=bias, **kw) if fused_qkv else None
        if not fused_qkv:
            self.q_proj = nn.Linear(d_model, q_dim, bias=bias, **kw)
            self.k_proj = nn.Linear(d_model, kv_dim, bias=bias, **kw)
            self.v_proj = nn.Linear(d_model, kv_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(q_dim, d_model, bias=bias, **kw)
        for name in self.extra_queries:
            setattr(self, f"{name}_proj", nn.Linear(d_model, q_dim, bias=bias, **kw))
        for name in ("q", *self.extra_queries, "k"):
            setattr(self, f"{name}_norm", nn.RMSNorm(head_dim, **kw) if qk_norm else None)

    @property
    def window_size(self) -> tuple[int, int]:
        """The op's ``window_size``: ``(window - 1, 0)``, or the ops' default ``(-1, -1)`` without a window."""
        return (-1, -1) if self.window is None else (self.window - 1, 0)

    def op_kwargs(self) -> dict:
        """Keyword options of every op call (``window_size``; a subclass adds its own)."""
        return {"scale": self.scale, "window_size": self.window_size}

    def project(self, x: torch.Tensor, positions: torch.Tensor | None):
        """x ``[B, T, d_model]`` -> ``(queries, k, v)``: ``queries`` a tuple ``(q, *extra)`` of
        ``[B, T, H, Dh]``, k and v ``[B, T, Hk, Dh]``; normalised and rotated as configured."""
        B, T, _ = x.shape
        H, Hk, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([H * Dh, Hk * Dh, Hk * Dh], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = [q] + [getattr(self, f"{n}_proj")(x) for n in self.extra_queries]
        queries = [t.view(B, T, H, Dh) for t in queries]
        k, v = k.view(B, T, Hk, Dh), v.view(B, T, Hk, Dh)
        if self.k_norm is not None:
            queries = [getattr(self, f"{n}_norm")(t) for n, t in zip(("q", *self.extra_queries), queries)]
            k = self.k_norm(k)
        if self.rope:
            queries = [apply_rotary(t, positions, self.rope_base) for t in queries]
            k = apply_rotary(k, positions, self.rope_base)
        return tuple(queries), k, v

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model].

        attention_mask: ``[B, T]`` (bool or 0/1) marking the real tokens of this call.  Each
            sequence's real tokens attend causally among themselves (and to its cached entries);
            padded positions are invisible to them and output zeros before ``o_proj``.  Without a
            cache: ``padded_attention`` (eager: packed into the op's ``cu_seqlens``; under
            ``torch.compile`` the static-shape path, so ``fullgraph=True`` works with a mask).
        cache: a ``KVCache``: this call's keys/values are appended to it and the queries attend
            to everything cached for their sequence (chunked prefill or one-token decoding).
        position_ids: ``[B, T]`` rotary positions; default: the index among the sequence's real
            tokens, counting cached ones.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, T, d_model={self.d_model}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        if self.cp_group is not None:
            return self._context_parallel(x, attention_mask, cache, position_ids)
        mask = self._mask(attention_mask, B, T, x.device)
        if self.rope and position_ids is None:
            past = cache.seqlens(self.layer_idx, B, x.device) if cache is not None else torch.zeros(B, dtype=torch.int64, device=x.device)
            local = torch.arange(T, device=x.device).expand(B, T) if mask is None else mask.long().cumsum(1) - 1
            position_ids = past[:, None] + local.clamp_min(0)
        queries, k, v = self.project(x, position_ids)
        kw = self.op_kwargs()
        if cache is not None:
            o = self._cached(queries, k, v, mask, cache, kw)
        elif mask is None:
            o = self.op(*queries, k, v, causal=True, **kw)
        else:
            o = padded_attention(self.op, queries, k, v, mask, **kw)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _mask(self, attention_mask, B, T, device):
        """``[B, T]`` bool, or None when there is no padding (eager only: compiled code keeps it)."""
        if attention_mask is None:
            return None
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = {[B, T]}, got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(device=device, dtype=torch.bool)
        if not torch.compiler.is_compiling() and bool(mask.all()):
            return None  # (under torch.compile a mask always takes the padded path: no host read)
        return mask

    def _cached(self, queries, k, v, mask, cache, kw):
        """Append this call's keys/values to the cache and attend against it (one op call).

        A padded chunk is first sorted real-tokens-first (``real_tokens_first``): its pads land past the
        sequence's new filled length, where no real query sees them and the next call overwrites them.
        """
        B, T = k.shape[:2]
        past = cache.seqlens(self.layer_idx, B, k.device)
        k_cache, v_cache, seqlens = cache.buffers(
            self.layer_idx, B, int(past.max()) + T, self.num_kv_heads, self.head_dim, v.shape[-1], k.dtype, k.device
        )
        if mask is None:
            o = self.kvcache_op(*queries, k_cache, v_cache, k, v, cache_seqlens=seqlens, **kw)
            seqlens += T
            return o
        order, keep, tensors = real_tokens_first(mask, (*queries, k, v))
        o = self.kvcache_op(*tensors[:-2], k_cache, v_cache, *tensors[-2:], cache_seqlens=seqlens, **kw)
        seqlens += mask.sum(1)
        return _restore(o, order, keep)

    def _context_parallel(self, x, attention_mask, cache, position_ids):
        """x is this rank's shard of the sequence (``lla.distributed``)."""
        from ..distributed import context_parallel_attention, shard_positions

        if attention_mask is not None or cache is not None:
            raise ValueError("attention_mask and cache are not supported with cp_group (context parallelism)")
        B, T, _ = x.shape
        if self.rope and position_ids is None:
            position_ids = shard_positions(T, self.cp_group, self.cp_sharding, device=x.device).expand(B, T)
        queries, k, v = self.project(x, position_ids)
        kw = self.op_kwargs()
        kw.update(zip(self.extra_queries, queries[1:]))
        o = context_parallel_attention(queries[0], k, v, group=self.cp_group, sharding=self.cp_sharding,
                                       mechanism=self.mechanism, **kw)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
