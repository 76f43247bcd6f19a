"""A small causal model: read-in, N pre-norm blocks (mixer + optional MLP), read-out.

The language model of ``lla run lm`` is this model with a byte vocabulary, rotary positions in the
mixers that use them (``rope``), an MLP in every block and the read-out tied to the embedding
(``tie_embeddings``).  ``model(x, cache=lla.nn.KVCache())`` decodes through a KV cache when the mixer
supports it (``supports_cache``); see ``lla.experiments.generate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from lla.nn import KVCache
from lla.experiments.mixers import CACHE_MIXERS, ROPE_MIXERS, build_mixer


@dataclass
class ModelConfig:
    """``vocab_size`` > 0: token embedding read-in; otherwise a linear read-in from ``input_dim``.

    ``rope``: rotary positions in the mixers that use positions (``lla.experiments.mixers.ROPE_MIXERS``; the
    others ignore it).  ``tie_embeddings``: the read-out is the token embedding's transpose (no bias;
    needs ``output_dim == vocab_size``), the embedding initialised N(0, 0.02^2).
    """

    mixer: str = "softmax"
    d_model: int = 64
    num_heads: int = 2
    n_layers: int = 2
    mlp: bool = True
    mlp_ratio: int = 4
    vocab_size: int = 0
    input_dim: int = 0
    output_dim: int = 0
    max_len: int = 0  # > 0: learned absolute positions
    mixer_kwargs: dict = field(default_factory=dict)
    rope: bool = False
    tie_embeddings: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` when ``mlp``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        kw = {"layer_idx": layer_idx, **({"rope": True} if cfg.rope and cfg.mixer in ROPE_MIXERS else {}), **cfg.mixer_kwargs}
        self.mixer = build_mixer(cfg.mixer, cfg.d_model, cfg.num_heads, **kw)
        self.mlp = None
        if cfg.mlp:
            self.norm2 = nn.LayerNorm(cfg.d_model)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(), nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
            )

    def forward(self, x, cache: KVCache | None = None):
        x = x + (self.mixer(self.norm1(x)) if cache is None else self.mixer(self.norm1(x), cache=cache))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class CausalModel(nn.Module):
    """``[B, T]`` token ids or ``[B, T, input_dim]`` features -> ``[B, T, output_dim]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if (cfg.vocab_size > 0) == (cfg.input_dim > 0):
            raise ValueError("ModelConfig needs exactly one of vocab_size > 0 or input_dim > 0")
        if cfg.output_dim <= 0:
            raise ValueError(f"ModelConfig.output_dim must be > 0, got {cfg.output_dim}")
        if cfg.tie_embeddings and not (cfg.vocab_size > 0 and cfg.output_dim == cfg.vocab_size):
            raise ValueError(f"tie_embeddings needs output_dim == vocab_size > 0, got {cfg.output_dim} and {cfg.vocab_size}")
        self.cfg = cfg
        self.read_in = nn.Embedding(cfg.vocab_size, cfg.d_model) if cfg.vocab_size else nn.Linear(cfg.input_dim, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.max_len > 0 else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.output_dim, bias=not cfg.tie_embeddings)
        if cfg.tie_embeddings:
            nn.init.normal_(self.read_in.weight, std=0.02)
            self.head.weight = self.read_in.weight  # [vocab, d_model], one parameter
        # context parallelism (``lla.distributed.set_context_parallel``): x is this rank's shard
        self.cp_group, self.cp_sharding = None, "zigzag"

    @property
    def supports_cache(self) -> bool:
        """Whether ``forward(x, cache=...)`` decodes through a KV cache (else: recompute the prefix)."""
        return self.cfg.mixer in CACHE_MIXERS

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``cache``: an ``lla.nn.KVCache`` (mixers in ``CACHE_MIXERS``): this call's tokens are appended
        and attend to everything cached, positions continuing from the cached length (prefill, then one
        token a call)."""
        if cache is not None and not self.supports_cache:
            raise ValueError(f"mixer {self.cfg.mixer!r} does not decode through a cache (those that do: {list(CACHE_MIXERS)})")
        if cache is not None and self.cp_group is not None:
            raise ValueError("cache is not supported under context parallelism")
        h = self.read_in(x)  # [B, T, d_model]
        if self.pos is not None:
            if self.cp_group is None:
                past = cache.get_seq_length(0) if cache is not None else 0
                positions = torch.arange(past, past + h.shape[1], device=h.device)
            else:  # the global positions of this rank's tokens
                from lla.distributed import shard_positions

                positions = shard_positions(h.shape[1], self.cp_group, self.cp_sharding, device=h.device)
                positions = positions.clamp_max(self.cfg.max_len - 1)  # only end padding lies beyond
            h = h + self.pos(positions)
        for blk in self.blocks:
            h = blk(h, cache)
        return self.head(self.norm(h))
