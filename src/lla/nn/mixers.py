"""Token mixers behind one interface: ``mixer(x [B, T, d_model]) -> [B, T, d_model]``, causal.

``MIXERS`` maps a name to a class; ``build_mixer(name, d_model, num_heads, **kw)`` builds one, so a
model swaps its attention by name.  Every mixer projects ``x`` to per-head ``q, k, v``
(``[B, T, H, Dh]``, ``Dh = d_model // num_heads``), calls a functional op (the public LLA op or a
``lla.baselines`` op) and projects back.  No short convolutions.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import lla
from lla.baselines import (
    gated_delta_attention,
    linear_attention,
    mesa_attention,
    sliding_window_attention,
    softmax_attention,
)


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class QKVMixer(nn.Module):
    """Shared shell: ``x -> q, k, v [B, T, H, Dh] -> attend -> [B, T, d_model]``."""

    def __init__(self, d_model: int, num_heads: int, bias: bool = False):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        # context parallelism (``lla.distributed.set_context_parallel``): x is this rank's shard
        self.cp_group, self.cp_sharding = None, "zigzag"

    #: True when ``attend`` shards the work itself under context parallelism (else the shell
    #: gathers q, k, v, x, attends over the whole sequence on every rank and keeps its rows)
    native_cp = False

    def attend(self, q, k, v, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)  # [B, T, H, Dh]
        if self.cp_group is not None and not self.native_cp:
            from lla.distributed import all_gather_seq, shard

            full = lambda t: all_gather_seq(t, self.cp_group, self.cp_sharding)  # noqa: E731
            o = shard(self.attend(full(q), full(k), full(v), full(x)), self.cp_group, self.cp_sharding)
        else:
            o = self.attend(q, k, v, x)  # [B, T, H, Dh]
        return self.out(o.reshape(B, T, self.d_model))


class LearnableRidge(nn.Module):
    """Per-head ridge ``lam_h = softplus(raw_h) + floor`` (positive, learnable)."""

    def __init__(self, num_heads: int, init: float = 1.0, floor: float = 1e-2):
        super().__init__()
        self.floor = floor
        self.raw = nn.Parameter(torch.full((num_heads,), _inv_softplus(init - floor)))

    def forward(self) -> torch.Tensor:
        return F.softplus(self.raw) + self.floor  # [H]


class LLAMixer(QKVMixer):
    """Local Linear Attention through the public op, learnable per-head ridge."""

    def __init__(self, d_model, num_heads, ridge_init: float = 1.0, ridge_floor: float = 1e-2, solver: str = "auto", **kw):
        super().__init__(d_model, num_heads, **kw)
        self.ridge = LearnableRidge(num_heads, ridge_init, ridge_floor)
        self.solver = solver

    native_cp = True

    def attend(self, q, k, v, x):
        lam = self.ridge()  # [H], broadcast to [B, T, H] by the op; float32 at least
        lam = lam.double() if q.dtype == torch.float64 else lam.float()
        if self.cp_group is not None:
            from lla.distributed import context_parallel_attention

            o = context_parallel_attention(q, k, v, ridge=lam, solver=self.solver, group=self.cp_group, sharding=self.cp_sharding)
            return o.to(q.dtype)
        return lla.local_linear_attention(q, k, v, ridge=lam, solver=self.solver).to(q.dtype)


class ParallaxMixer(QKVMixer):
    """Parallax through the public op: an extra ``r`` projection (zero-initialised, so the mixer
    starts as softmax attention), no positional encoding inside the mixer."""

    def __init__(self, d_model, num_heads, **kw):
        super().__init__(d_model, num_heads, **kw)
        self.r = nn.Linear(d_model, d_model, bias=self.qkv.bias is not None)
        nn.init.zeros_(self.r.weight)
        if self.r.bias is not None:
            nn.init.zeros_(self.r.bias)

    def attend(self, q, k, v, x):
        r = self.r(x).view(*q.shape)
        return lla.parallax_attention(q, r, k, v)


class SoftmaxMixer(QKVMixer):
    """Causal softmax attention (SDPA)."""

    def attend(self, q, k, v, x):
        return softmax_attention(q, k, v)


class SlidingWindowMixer(QKVMixer):
    """Causal softmax attention over the last ``window`` tokens."""

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
MIXERS: dict[str, type[QKVMixer]] = {
    "lla": LLAMixer,
    "parallax": ParallaxMixer,
    "softmax": SoftmaxMixer,
    "linear": LinearMixer,
    "mesa": MesaMixer,
    "sliding_window": SlidingWindowMixer,
    "gated_deltanet": GatedDeltaNetMixer,
}


def build_mixer(name: str, d_model: int, num_heads: int, **kwargs) -> nn.Module:
    """Build the mixer registered as ``name`` (see ``MIXERS``)."""
    if name not in MIXERS:
        raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {name!r}")
    return MIXERS[name](d_model, num_heads, **kwargs)
