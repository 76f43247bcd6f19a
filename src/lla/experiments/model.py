"""A small causal model: read-in, N pre-norm blocks (mixer + optional MLP), read-out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from lla.nn.mixers import build_mixer


@dataclass
class ModelConfig:
    """``vocab_size`` > 0: token embedding read-in; otherwise a linear read-in from ``input_dim``."""

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

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` when ``mlp``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.mixer = build_mixer(cfg.mixer, cfg.d_model, cfg.num_heads, **cfg.mixer_kwargs)
        self.mlp = None
        if cfg.mlp:
            self.norm2 = nn.LayerNorm(cfg.d_model)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(), nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
            )

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
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
        self.cfg = cfg
        self.read_in = nn.Embedding(cfg.vocab_size, cfg.d_model) if cfg.vocab_size else nn.Linear(cfg.input_dim, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.max_len > 0 else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.output_dim)
        # context parallelism (``lla.distributed.set_context_parallel``): x is this rank's shard
        self.cp_group, self.cp_sharding = None, "zigzag"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.read_in(x)  # [B, T, d_model]
        if self.pos is not None:
            if self.cp_group is None:
                positions = torch.arange(h.shape[1], device=h.device)
            else:  # the global positions of this rank's tokens
                from lla.distributed import shard_positions

                positions = shard_positions(h.shape[1], self.cp_group, self.cp_sharding, device=h.device)
                positions = positions.clamp_max(self.cfg.max_len - 1)  # only end padding lies beyond
            h = h + self.pos(positions)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))
