"""Task 4: state tracking, word problems over S5, A5 and Z60 (Merrill et al. 2024), and the paper's
permutation composition with swap instructions.

Tokens are group elements ``g_1 .. g_T``; the target at every position is the running product
``g_1 g_2 ... g_t``.  Permutation groups are built with itertools (no dependency); Z60 is addition
mod 60 (abelian, the easy control).  ``"S<N>-swap"`` (N = 2..6) is the swap task: every token is a
transposition of two of ``N`` positions (``N (N - 1) / 2`` instructions) and the target is the
arrangement reached so far (one of ``N!`` states), which is the word problem over S_N with the
transpositions as its alphabet; sweeping N sweeps the number of positions.
Metric: accuracy at each position t (= accuracy vs length).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
import torch.nn.functional as F

from .mqar import eval_seed


def _parity(p) -> int:
    return sum(1 for i in range(len(p)) for j in range(i + 1, len(p)) if p[i] > p[j]) % 2


SWAP_GROUPS = tuple(f"S{n}-swap" for n in range(2, 7))
GROUPS = ("S5", "A5", "Z60") + SWAP_GROUPS


def _perms(name: str) -> list[tuple[int, ...]]:
    if name not in GROUPS or name == "Z60":
        raise ValueError(f"group must be one of {list(GROUPS)}, got {name!r}")
    n = 5 if name in ("S5", "A5") else int(name[1])
    return [p for p in itertools.permutations(range(n)) if name != "A5" or _parity(p) == 0]


@lru_cache(maxsize=None)
def group_table(name: str) -> torch.Tensor:
    """Multiplication table ``[n, n]``: ``table[a, b]`` = index of ``a * b`` (apply b, then a: ``a(b(i))``)."""
    if name == "Z60":
        n = torch.arange(60)
        return (n[:, None] + n[None, :]) % 60
    perms = _perms(name)
    index = {p: i for i, p in enumerate(perms)}
    return torch.tensor([[index[tuple(a[b[i]] for i in range(len(a)))] for b in perms] for a in perms])


@lru_cache(maxsize=None)
def alphabet(name: str) -> torch.Tensor:
    """Element ids a word may use: every element, or the transpositions for a swap task."""
    if name not in SWAP_GROUPS:
        return torch.arange(group_table(name).shape[0])
    perms = _perms(name)
    return torch.tensor([i for i, p in enumerate(perms) if sum(a != b for a, b in enumerate(p)) == 2])


def make_word_problem(batch: int, seq_len: int, group: str, generator):
    """``tokens [B, T]`` (element ids) and ``targets [B, T]`` (running products)."""
    table, letters = group_table(group), alphabet(group)
    tokens = letters[torch.randint(len(letters), (batch, seq_len), generator=generator)]
    targets = torch.empty_like(tokens)
    acc = tokens[:, 0]
    targets[:, 0] = acc
    for t in range(1, seq_len):
        acc = table[acc, tokens[:, t]]
        targets[:, t] = acc
    return tokens, targets


class StateTask:
    def __init__(self, cfg: dict, group: str):
        self.cfg, self.group = cfg, group
        self.n = group_table(group).shape[0]

    def model_kwargs(self) -> dict:
        return {"vocab_size": self.n, "output_dim": self.n, "max_len": self.cfg["seq_len"]}

    def sample(self, batch, generator):
        return make_word_problem(batch, self.cfg["seq_len"], self.group, generator)

    @staticmethod
    def loss(logits, targets):
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    @torch.no_grad()
    def evaluate(self, model, device, seed: int, split: str = "test"):
        g = torch.Generator().manual_seed(eval_seed(seed, split) + 2000)
        x, y = make_word_problem(self.cfg["eval_batch"], self.cfg["seq_len"], self.group, g)
        acc = (model(x.to(device)).argmax(-1).cpu() == y).double().mean(0)  # [T] accuracy per position
        T = self.cfg["seq_len"]
        rows = [{"metric": "accuracy", "group": self.group, "value": acc.mean().item()}]
        for L in sorted({min(T, L) for L in self.cfg.get("report_lengths", [T])}):
            rows.append({"metric": "accuracy_at_length", "group": self.group, "length": L, "value": acc[L - 1].item()})
        return rows, [{"group": self.group, "x": list(range(1, T + 1)), "y": acc.tolist()}]
