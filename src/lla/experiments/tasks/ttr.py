"""Task 1: test-time regression on a non-stationary stream (no training).

The attention op itself is the regressor: keys are the inputs ``x_j``, values the targets ``y_j``,
and the query is the next input ``x_i``; the prediction for ``y_i`` uses only the pairs ``j < i``.
The stream of length ``T`` is cut into segments of ``seg_len``; every segment draws its own linear
map ``A_s`` (``y = A_s x + noise``) and, when ``shift > 0``, its own input centre
``c_s ~ N(0, shift^2 I)`` (``x = c_s + N(0, I)``).  ``shift = 0`` is the shared-distribution case.
"""

from __future__ import annotations

import math

import torch

import lla
from lla.baselines import linear_attention, mesa_attention, softmax_attention

#: mixers this task can evaluate: name -> f(q, k, v, ridge) with q/k/v [B, T, 1, D] (S == T)
TTR_MIXERS = {
    "lla": lambda q, k, v, ridge: lla.local_linear_attention(q, k, v, ridge=ridge, solver="direct"),
    "softmax": lambda q, k, v, ridge: softmax_attention(q, k, v),
    "mesa": lambda q, k, v, ridge: mesa_attention(q, k, v, ridge=ridge),
    "linear": lambda q, k, v, ridge: linear_attention(q, k, v, feature_map="elu1", normalize=True),
}


def make_stream(batch: int, seq_len: int, dim: int, seg_len: int, shift: float, noise: float, generator):
    """Inputs ``x [B, T, D]`` and targets ``y [B, T, D]`` (float64), piecewise linear in segments."""
    n_seg = math.ceil(seq_len / seg_len)
    g = generator
    A = torch.randn(batch, n_seg, dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)  # [B, nS, D, D]
    centre = shift * torch.randn(batch, n_seg, dim, generator=g, dtype=torch.float64)  # [B, nS, D]
    seg = torch.arange(seq_len) // seg_len  # [T] segment of each position
    x = centre[:, seg] + torch.randn(batch, seq_len, dim, generator=g, dtype=torch.float64)
    y = torch.einsum("btij,btj->bti", A[:, seg], x)
    y = y + noise * torch.randn(batch, seq_len, dim, generator=g, dtype=torch.float64)
    return x, y


def ttr_predict(mixer: str, x: torch.Tensor, y: torch.Tensor, ridge: float, dtype=torch.float32) -> torch.Tensor:
    """Predictions ``[B, T - 1, D]`` (float64) of ``y_i`` from ``(x_j, y_j), j < i``, for positions ``i = 1..T-1``.

    Query i (stream position i + 1) reads keys 0..i: the op's causal mask with the stream shifted
    by one, so S == T and nothing at or after the predicted position is seen.
    """
    if mixer not in TTR_MIXERS:
        raise ValueError(f"mixer must be one of {sorted(TTR_MIXERS)}, got {mixer!r}")
    q = x[:, 1:, None].to(dtype)  # [B, T-1, 1, D]
    k = x[:, :-1, None].to(dtype)
    v = y[:, :-1, None].to(dtype)
    with torch.no_grad():
        return TTR_MIXERS[mixer](q, k, v, ridge)[:, :, 0].double()


def ttr_mse(mixer: str, x: torch.Tensor, y: torch.Tensor, ridge: float, dtype=torch.float32) -> torch.Tensor:
    """Per-position MSE ``[T - 1]`` (mean over batch and output dims) of ``ttr_predict``."""
    return ((ttr_predict(mixer, x, y, ridge, dtype) - y[:, 1:]) ** 2).mean(dim=(0, 2))


def run(cfg: dict, mixers, log) -> list[dict]:
    """Sweep ``seg_lens x dims x shifts``; returns summary rows and logs per-position curves."""
    rows = []
    T = cfg["seq_len"]
    for shift in cfg["shifts"]:
        for dim in cfg["dims"]:
            for seg_len in cfg["seg_lens"]:
                g = torch.Generator().manual_seed(cfg["seed"])
                x, y = make_stream(cfg["batch"], T, dim, seg_len, shift, cfg["noise"], g)
                key = {"experiment": "ttr", "seg_len": seg_len, "dim": dim, "shift": shift}
                for mixer in mixers:
                    mse = ttr_mse(mixer, x, y, cfg["ridge"])  # [T-1], index i = stream position i+1
                    first = mse[: seg_len - 1].mean().item()
                    later = mse[seg_len - 1 :].mean().item() if T > seg_len else float("nan")
                    for metric, value in (("mse", mse.mean().item()), ("mse_first_seg", first), ("mse_later_segs", later)):
                        rows.append({**key, "mixer": mixer, "metric": metric, "value": value})
                    log({"kind": "curve", **key, "mixer": mixer, "x": list(range(1, T)), "mse": mse.tolist()})
    return rows
