"""Token mixers behind one interface: ``mixer(x [B, T, d_model]) -> [B, T, d_model]``, causal.

``MIXERS`` maps a name to a class; ``build_mixer(name, d_model, num_heads, **kw)`` builds one, so a
model swaps its attention by name.  ``"lla"`` and ``"parallax"`` are the package's layers
(``lla.nn.LocalLinearAttention``, ``lla.nn.ParallaxAttention``) with the experiments' settings;
the baselines project ``x`` to per-head ``q, k, v`` (``[B, T, H, Dh]``, ``Dh = d_model // num_heads``)
in ``QKVMixer``, call a ``lla.baselines`` op and project back.  No short convolutions.

Rotary positions (``rope=True``) and KV-cache decoding (``forward(x, cache=KVCache)``) are available
in the mixers listed in ``ROPE_MIXERS`` and ``CACHE_MIXERS``; ``layer_idx`` keys a mixer's entry in
the cache.  The recurrent baselines (``gated_deltanet``, ``linear``, ``mesa``) take neither: a model
built on them recomputes the prefix to generate.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lla.baselines import (
    gated_delta_attention,
    linear_attention,
    mesa_attention,
    sliding_window_attention,
    softmax_attention,
)

from lla.nn import LocalLinearAttention, ParallaxAttention
from lla.nn.base import KVCache, apply_rotary, inverse_softplus_ridge, softplus_ridge


def _check_heads(d_model: int, num_heads: int) -> None:
    if d_model % num_heads != 0:
        raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")


class QKVMixer(nn.Module):
    """Shell of the baselines: ``x -> q, k, v [B, T, H, Dh] -> attend -> [B, T, d_model]``.  Under
    context parallelism it gathers q, k, v, x, attends over the whole sequence on every rank and
    keeps its rows.

    ``rope``: rotary positions on q and k (``lla.nn.apply_rotary``; only for mixers whose ``attend``
    is position-aware softmax attention).  ``supports_cache`` mixers also take ``forward(x, cache)``:
    this call's keys and values are appended to ``cache`` (an ``lla.nn.KVCache``, entry
    ``layer_idx``) and the queries attend to everything cached (bottom-right causal), positions
    continuing from the cached length; every sequence of the batch must have the same cached length.
    """

    supports_cache = False

    def __init__(self, d_model: int, num_heads: int, bias: bool = False, rope: bool = False, layer_idx: int = 0):
        super().__init__()
        _check_heads(d_model, num_heads)
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        if rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        self.rope, self.layer_idx = rope, layer_idx
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        # context parallelism (``lla.distributed.set_context_parallel``): x is this rank's shard
        self.cp_group, self.cp_sharding = None, "zigzag"

    def attend(self, q, k, v, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)  # [B, T, H, Dh]
        if cache is not None:
            o = self._cached(q, k, v, x, cache)
        elif self.cp_group is not None:
            from lla.distributed import all_gather_seq, shard, shard_positions

            if self.rope:
                pos = shard_positions(T, self.cp_group, self.cp_sharding, device=x.device).expand(B, T)
                q, k = apply_rotary(q, pos), apply_rotary(k, pos)
            full = lambda t: all_gather_seq(t, self.cp_group, self.cp_sharding)  # noqa: E731
            o = shard(self.attend(full(q), full(k), full(v), full(x)), self.cp_group, self.cp_sharding)
        else:
            if self.rope:
                pos = torch.arange(T, device=x.device).expand(B, T)
                q, k = apply_rotary(q, pos), apply_rotary(k, pos)
            o = self.attend(q, k, v, x)  # [B, T, H, Dh]
        return self.out(o.reshape(B, T, self.d_model))

    def _cached(self, q, k, v, x, cache: KVCache):
        """Append k, v ``[B, T, H, Dh]`` at the cached length and attend to the cache's first ``past + T``."""
        if not self.supports_cache:
            raise ValueError(f"{type(self).__name__} does not decode through a cache; recompute the prefix instead")
        B, T = k.shape[:2]
        past = cache.seqlens(self.layer_idx, B, x.device)  # [B]
        if past.numel() > 1 and bool((past != past[0]).any()):
            raise ValueError(f"{type(self).__name__}: every sequence must have the same cached length, got {past.tolist()}")
        p0 = int(past[0])
        if self.rope:
            pos = (p0 + torch.arange(T, device=x.device)).expand(B, T)
            q, k = apply_rotary(q, pos), apply_rotary(k, pos)
        k_cache, v_cache, seqlens = cache.buffers(self.layer_idx, B, p0 + T, self.num_heads, self.head_dim,
                                                  self.head_dim, k.dtype, k.device)
        k_cache[:, p0 : p0 + T] = k
        v_cache[:, p0 : p0 + T] = v
        seqlens += T
        return self.attend(q, k_cache[:, : p0 + T], v_cache[:, : p0 + T], x)

class LearnableRidge(nn.Module):
    """Per-head ridge ``lam_h = floor + softplus(raw_h)`` (``lla.nn.base.softplus_ridge``), learnable."""

    def __init__(self, num_heads: int, init: float = 1.0, floor: float = 1e-2):
        super().__init__()
        self.floor = floor
        self.raw = nn.Parameter(inverse_softplus_ridge(num_heads, init, floor))

    def forward(self) -> torch.Tensor:
        return softplus_ridge(self.raw, self.floor)  # [H]


class LLAMixer(LocalLinearAttention):
    """The experiments' ``"lla"`` mixer: ``lla.nn.LocalLinearAttention`` with a fused qkv projection,
    no rotary embedding unless ``rope`` (the synthetic tasks' models add learned positions or none), no GQA,
    ridge floor 1e-2; decodes through a ``KVCache`` (entry ``layer_idx``)."""

    supports_cache = True

    def __init__(self, d_model, num_heads, ridge_init: float = 1.0, ridge_floor: float = 1e-2, solver: str = "auto",
                 bias: bool = False, rope: bool = False, layer_idx: int = 0):
        _check_heads(d_model, num_heads)
        super().__init__(d_model, num_heads, bias=bias, fused_qkv=True, rope=rope, ridge_init=ridge_init,
                         ridge_floor=ridge_floor, solver=solver, layer_idx=layer_idx)


class ParallaxMixer(ParallaxAttention):
    """The experiments' ``"parallax"`` mixer: ``lla.nn.ParallaxAttention`` with a fused qkv projection,
    a zero-initialised ``r_proj`` (it starts as softmax attention), no positional encoding unless ``rope``,
    no GQA; decodes through a ``KVCache`` (entry ``layer_idx``)."""

    supports_cache = True

    def __init__(self, d_model, num_heads, bias: bool = False, rope: bool = False, layer_idx: int = 0):
        _check_heads(d_model, num_heads)
        super().__init__(d_model, num_heads, bias=bias, fused_qkv=True, rope=rope, layer_idx=layer_idx)


class SoftmaxMixer(QKVMixer):
    """Causal softmax attention (SDPA)."""

    supports_cache = True

    def attend(self, q, k, v, x):
        return softmax_attention(q, k, v)


class SlidingWindowMixer(QKVMixer):
    """Causal softmax attention over the last ``window`` tokens."""

    supports_cache = True

    def __init__(self, d_model, num_heads, window: int = 64, **kw):
        super().__init__(d_model, num_heads, **kw)
        self.window = window

    def attend(self, q, k, v, x):
        return sliding_window_attention(q, k, v, window=self.window)


class LinearMixer(QKVMixer):
    """Causal linear attention, chunkwise; ``feature_map`` in ``lla.baselines.FEATURE_MAPS``."""

    def __init__(self, d_model, num_heads, feature_map: str = "elu1", normalize: bool = True, **kw):
        super().__init__(d_model, num_heads, **kw)
        self.feature_map, self.normalize = feature_map, normalize

    def attend(self, q, k, v, x):
        return linear_attention(q, k, v, feature_map=self.feature_map, normalize=self.normalize)


class MesaMixer(QKVMixer):
    """Global ridge-regression attention (MesaNet), L2-normalised q/k, learnable per-head ridge."""

    def __init__(self, d_model, num_heads, ridge_init: float = 1.0, ridge_floor: float = 1e-2, **kw):
        super().__init__(d_model, num_heads, **kw)
        self.ridge = LearnableRidge(num_heads, ridge_init, ridge_floor)

    def attend(self, q, k, v, x):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return mesa_attention(q, k, v, ridge=self.ridge().to(q.dtype))


class GatedDeltaNetMixer(QKVMixer):
    """Gated DeltaNet: L2-normalised q/k, data-dependent decay ``alpha`` and step ``beta`` per head."""

    def __init__(self, d_model, num_heads, **kw):
        super().__init__(d_model, num_heads, **kw)
        self.gates = nn.Linear(d_model, 2 * num_heads)
        nn.init.zeros_(self.gates.weight)
        with torch.no_grad():  # start with slow decay (alpha ~ 0.95) and beta ~ 0.5
            self.gates.bias.copy_(torch.cat([torch.full((num_heads,), 3.0), torch.zeros(num_heads)]))

    def attend(self, q, k, v, x):
        alpha, beta = torch.sigmoid(self.gates(x)).chunk(2, dim=-1)  # [B, T, H] each
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return gated_delta_attention(q, k, v, alpha, beta)


#: name -> mixer class, each ``cls(d_model, num_heads, **kwargs)``
MIXERS: dict[str, type[nn.Module]] = {
    "lla": LLAMixer,
    "parallax": ParallaxMixer,
    "softmax": SoftmaxMixer,
    "linear": LinearMixer,
    "mesa": MesaMixer,
    "sliding_window": SlidingWindowMixer,
    "gated_deltanet": GatedDeltaNetMixer,
}


#: mixers that take ``rope=True`` (position-aware softmax-weighted attention)
ROPE_MIXERS = ("lla", "parallax", "softmax", "sliding_window")
#: mixers that decode through a ``KVCache`` (``forward(x, cache)``); the others recompute the prefix
CACHE_MIXERS = tuple(name for name, cls in MIXERS.items() if getattr(cls, "supports_cache", False))


def build_mixer(name: str, d_model: int, num_heads: int, **kwargs) -> nn.Module:
    """Build the mixer registered as ``name`` (see ``MIXERS``)."""
    if name not in MIXERS:
        raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {name!r}")
    return MIXERS[name](d_model, num_heads, **kwargs)
