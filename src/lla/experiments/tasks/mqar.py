"""Task 3: multi-query associative recall (MQAR), a Zoology-style generator written here.

Keys come from the first half of the vocabulary (token 0 excluded, it is the filler), values from
the second half.  A sequence of length ``T`` opens with ``N`` key-value pairs ``k1 v1 ... kN vN``;
each key is then queried once, at a position drawn from a power law over the remaining slots
(small gaps likelier); other slots hold the filler 0.  The label at a query position is the paired
value, ``-100`` (ignored) elsewhere; the metric is accuracy over labelled positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_mqar(batch: int, seq_len: int, num_kv: int, vocab: int, generator, power_a: float = 0.01):
    """``tokens [B, T]`` int64, ``labels [B, T]`` int64 (``-100`` where nothing is asked)."""
    if vocab // 2 - 1 < num_kv:
        raise ValueError(f"vocab {vocab} too small for {num_kv} distinct keys")
    if seq_len < 4 * num_kv:
        raise ValueError(f"seq_len {seq_len} must be >= 4 * num_kv ({4 * num_kv})")
    g, B, N, T = generator, batch, num_kv, seq_len
    keys = torch.rand(B, vocab // 2 - 1, generator=g).argsort(dim=1)[:, :N] + 1  # distinct, in [1, V/2)
    values = torch.randint(vocab // 2, vocab, (B, N), generator=g)
    tokens = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    tokens[:, 0 : 2 * N : 2], tokens[:, 1 : 2 * N : 2] = keys, values
    space = T - 2 * N
    gaps = torch.arange(1, space + 1, dtype=torch.float64)
    p = (power_a * gaps ** (power_a - 1)).expand(B, space)
    pos = 2 * N + torch.multinomial(p, N, replacement=False, generator=g)  # [B, N] query positions
    order = torch.rand(B, N, generator=g).argsort(dim=1)  # which pair each query asks for
    tokens.scatter_(1, pos, keys.gather(1, order))
    labels.scatter_(1, pos, values.gather(1, order))
    return tokens, labels


#: validation streams (learning-rate selection, curves) use seeds offset by this much
VAL_SEED_OFFSET = 1_000_000


def eval_seed(seed: int, split: str) -> int:
    """The evaluation seed of ``split`` ("test" or "val": disjoint streams for every run seed)."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    return seed + (VAL_SEED_OFFSET if split == "val" else 0)


class MQARTask:
    """Trains on ``train_configs`` [(T, N), ...] in turn, one configuration per step.

    ``cfg["positions"]``: ``"learned"`` (absolute positions, Zoology's setting; the default) or
    ``"none"`` (no positional information at all, no short convolutions).
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.vocab = cfg["vocab"]
        self.train_configs = [tuple(c) for c in cfg["train_configs"]]
        self.eval_configs = [tuple(c) for c in cfg["eval_configs"]]
        self._step = 0
        self.positions = cfg.get("positions", "learned")
        if self.positions not in ("learned", "none"):
            raise ValueError(f"positions must be 'learned' or 'none', got {self.positions!r}")

    def model_kwargs(self) -> dict:
        max_len = max(t for t, _ in self.train_configs + self.eval_configs)
        return {"vocab_size": self.vocab, "output_dim": self.vocab, "max_len": max_len if self.positions == "learned" else 0}

    def sample(self, batch, generator):
        # the step index is folded into the generator's seed by the trainer; the config cycles with a draw
        i = int(torch.randint(len(self.train_configs), (1,), generator=generator))
        T, N = self.train_configs[i]
        return make_mqar(batch, T, N, self.vocab, generator)

    @staticmethod
    def loss(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def evaluate(self, model, device, seed: int, split: str = "test") -> tuple[list[dict], list[dict]]:
        rows, curves = [], []
        for T, N in self.eval_configs:
            g = torch.Generator().manual_seed(eval_seed(seed, split) + 17 * T + N)
            correct = total = 0
            for _ in range(self.cfg["eval_batches"]):
                x, y = make_mqar(self.cfg["eval_batch"], T, N, self.vocab, g)
                pred = model(x.to(device)).argmax(-1).cpu()
                m = y != -100
                correct += (pred[m] == y[m]).sum().item()
                total += m.sum().item()
            rows.append({"seq_len": T, "num_kv": N, "positions": self.positions, "metric": "accuracy", "value": correct / total})
        return rows, curves
