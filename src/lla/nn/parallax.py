"""``ParallaxAttention``: a multi-head (grouped-query) Parallax layer with a KV cache for generation.

The layer only calls the public ops (``lla.parallax_attention`` and
``lla.parallax_attention_with_kvcache``); its cache is an ``lla.nn.LLACache`` (a plain per-layer
key/value cache, shared with the LLA layer).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.parallax import parallax_attention, parallax_attention_with_kvcache
from .attention import LLACache, apply_rotary

__all__ = ["ParallaxAttention"]


class ParallaxAttention(nn.Module):
    """Multi-head Parallax layer: ``[B, T, d_model] -> [B, T, d_model]``, causal.

    Projections ``q``, ``r`` (the slope query, shaped like ``q``), ``k``, ``v`` and ``o``; per head
    ``o_i = sum_j s_ij (1 + c_i - r_i . k_j) v_j`` (see ``lla.parallax_attention``).

    Args:
        d_model: model width.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hk`` (grouped-query; ``H % Hk == 0``), default ``H``.
        head_dim: per-head dim, default ``d_model // num_heads``.
        bias: biases in the projections.
        qk_norm: RMS-normalise q, r and k per head (learnable gains), as the paper's reference layer.
        rope: rotary position embeddings on q, r and k (default off: the paper's layer is positionless).
        rope_base: rotary base.
        window: attend to the last ``window`` tokens only (the query's own included); None = all.
        zero_init_r: start ``r_proj`` at zero, so that the layer starts as softmax attention.
        scale: logit scale, default ``1 / sqrt(head_dim)``.
        layer_idx: key of this layer in an ``LLACache``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        bias: bool = False,
        qk_norm: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        window: int | None = None,
        zero_init_r: bool = True,
        scale: float | None = None,
        layer_idx: int = 0,
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
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.rope, self.rope_base, self.window = rope, rope_base, window
        self.scale, self.layer_idx = scale, layer_idx
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias, **kw)
        self.r_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias, **kw)
        self.q_norm = nn.RMSNorm(head_dim, **kw) if qk_norm else None
        self.r_norm = nn.RMSNorm(head_dim, **kw) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, **kw) if qk_norm else None
        if zero_init_r:
            nn.init.zeros_(self.r_proj.weight)
            if self.r_proj.bias is not None:
                nn.init.zeros_(self.r_proj.bias)

    @property
    def window_size(self) -> tuple[int, int]:
        return (-1 if self.window is None else self.window - 1, 0)

    def _project(self, x, positions):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        r = self.r_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, r, k = self.q_norm(q), self.r_norm(r), self.k_norm(k)
        if self.rope:
            q, r, k = (apply_rotary(t, positions, self.rope_base) for t in (q, r, k))
        return q, r, k, v

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: LLACache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model].

        attention_mask: ``[B, T]`` (bool or 0/1) marking the real tokens; padded positions are
            removed before attention (packed into the op's ``cu_seqlens`` path) and output zeros
            before ``o_proj``.
        cache: an ``LLACache``: this call's keys/values are appended and the queries attend to
            everything cached for their sequence (chunked prefill or one-token decoding).
        position_ids: ``[B, T]`` rotary positions (only with ``rope``); default: the index among the
            sequence's real tokens, counting cached ones.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, T, d_model={self.d_model}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must be [B, T] = {[B, T]}, got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=x.device, dtype=torch.bool)
            if not torch.compiler.is_compiling() and bool(mask.all()):
                mask = None
        if self.rope and position_ids is None:
            past = cache.seqlens(self.layer_idx, B, x.device) if cache is not None else torch.zeros(B, dtype=torch.int64, device=x.device)
            local = torch.arange(T, device=x.device).expand(B, T) if mask is None else mask.long().cumsum(1) - 1
            position_ids = past[:, None] + local.clamp_min(0)
        q, r, k, v = self._project(x, position_ids)
        kw = {"scale": self.scale, "window_size": self.window_size}
        if cache is not None:
            o = self._cached(q, r, k, v, mask, cache, kw)
        elif mask is None:
            o = parallax_attention(q, r, k, v, causal=True, **kw)
        else:
            o = self._unpadded(q, r, k, v, mask, kw)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _unpadded(self, q, r, k, v, mask, kw):
        """Pack the real tokens into one varlen batch (``cu_seqlens``), attend, scatter back."""
        B, T, H, D = q.shape
        lengths = mask.sum(1)
        flat = mask.reshape(-1).nonzero().squeeze(-1)
        nonempty = lengths[lengths > 0]
        cu = torch.zeros(nonempty.numel() + 1, dtype=torch.int64, device=q.device)
        cu[1:] = nonempty.cumsum(0)
        pack = lambda t: t.reshape(B * T, *t.shape[2:]).index_select(0, flat)[None]  # noqa: E731
        out = q.new_zeros(B * T, H, v.shape[-1])
        if flat.numel():
            o = parallax_attention(pack(q), pack(r), pack(k), pack(v), causal=True, cu_seqlens=cu, **kw)
            out = out.index_copy(0, flat, o[0])
        return out.view(B, T, H, v.shape[-1])

    def _cached(self, q, r, k, v, mask, cache, kw):
        """Append this call's keys/values to the cache and attend against it."""
        B, T, H, D = q.shape
        n_new = mask.sum(1) if mask is not None else torch.full((B,), T, dtype=torch.int64, device=q.device)
        past = cache.seqlens(self.layer_idx, B, q.device)
        need = int((past + n_new).max())
        k_cache, v_cache, seqlens = cache.buffers(self.layer_idx, B, need, self.num_kv_heads, D, v.shape[-1], k.dtype, k.device)
        if mask is None:
            o = parallax_attention_with_kvcache(q, r, k_cache, v_cache, k, v, cache_seqlens=seqlens, **kw)
        else:
            o = q.new_zeros(B, T, H, v.shape[-1])
            for b in range(B):  # ragged chunk: each sequence appends only its real tokens
                idx = mask[b].nonzero().squeeze(-1)
                if idx.numel() == 0:
                    continue
                ob = parallax_attention_with_kvcache(
                    q[b : b + 1, idx], r[b : b + 1, idx], k_cache[b : b + 1], v_cache[b : b + 1], k[b : b + 1, idx],
                    v[b : b + 1, idx], cache_seqlens=seqlens[b : b + 1], **kw,
                )
                o = o.index_put((torch.tensor([b], device=q.device), idx), ob[0])
        seqlens += n_new
        return o
