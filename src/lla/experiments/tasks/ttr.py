"""Task 1: test-time regression on a non-stationary stream (no training).

The attention op itself is the regressor: keys are the inputs ``x_j``, values the targets ``y_j``,
and the query is the next input ``x_i``; the prediction for ``y_i`` uses only the pairs ``j < i``.
The stream of length ``T`` is cut into segments of ``seg_len``; every segment draws its own linear
map ``A_s`` (``y = A_s x + noise``) and, when ``shift > 0``, its own input centre
``c_s ~ N(0, shift^2 I)`` (``x = c_s + N(0, I)``).  ``shift = 0`` is the shared-distribution case.
"""

from __future__ import annotations

import itertools
import math

import torch

from lla import ops as lla
from lla.baselines import gated_delta_attention, linear_attention, mesa_attention, softmax_attention

#: the held-out (validation) streams use seeds offset by this much: never a test stream's seed
VAL_SEED_OFFSET = 1_000_000


def _gated_delta(q, k, v, beta: float = 1.0, alpha: float = 1.0):
    """Normalised delta rule (NLMS) with a constant decay: ``beta_t = beta / |k_t|^2``."""
    B, T, H, _ = q.shape
    b = beta / k.pow(2).sum(-1).clamp_min(1e-12)  # [B, T, H]
    return gated_delta_attention(q, k, v, torch.full_like(b, alpha), b)


def _parallax_untrained(q, k, v, gain: float = 1.0):
    """Parallax without training: its second query ``r_i`` is learned in a model, and LLA's output is
    Parallax with ``r_i = A_i^-1 (m_i - q_i)`` (``m_i = E_s[k]``, ``A_i = Cov_s(k) + lam I``; see
    ``docs``/LLA.md section 7), so at test time the solver-free choice is ``A_i ~ I / gain``:
    ``r_i = gain (m_i - q_i)``, ``gain`` tuned like the other methods' hyperparameters."""
    scale = 1.0 / math.sqrt(q.shape[-1])  # the weights LLA uses here (the op's default scale)
    m = softmax_attention(q, k, k, scale=scale)  # E_s[k]  [B, T, 1, D]
    return lla.parallax_attention(q, gain * (m - q), k, v, scale=scale)


#: mixers this task can evaluate: name -> f(q, k, v, ridge, **hparams) with q/k/v [B, T, 1, D] (S == T);
#: ``ridge`` is lla's and mesa's hyperparameter, the others take theirs as keywords
TTR_MIXERS = {
    "lla": lambda q, k, v, ridge, **h: lla.local_linear_attention(q, k, v, ridge=ridge, solver="direct"),
    "softmax": lambda q, k, v, ridge, **h: softmax_attention(q, k, v, scale=h.get("scale", 1.0) / math.sqrt(q.shape[-1])),
    "mesa": lambda q, k, v, ridge, **h: mesa_attention(q, k, v, ridge=ridge),
    "linear": lambda q, k, v, ridge, **h: linear_attention(q, k, v, feature_map=h.get("feature_map", "elu1"), normalize=True),
    "gated_deltanet": lambda q, k, v, ridge, **h: _gated_delta(q, k, v, h.get("beta", 1.0), h.get("alpha", 1.0)),
    "parallax": lambda q, k, v, ridge, **h: _parallax_untrained(q, k, v, h.get("gain", 1.0)),
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


def ttr_predict(mixer: str, x: torch.Tensor, y: torch.Tensor, ridge: float, dtype=torch.float32, **hparams) -> torch.Tensor:
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
        return TTR_MIXERS[mixer](q, k, v, ridge, **hparams)[:, :, 0].double()


def ttr_mse(mixer: str, x: torch.Tensor, y: torch.Tensor, ridge: float, dtype=torch.float32, **hparams) -> torch.Tensor:
    """Per-position MSE ``[T - 1]`` (mean over batch and output dims) of ``ttr_predict``."""
    return ((ttr_predict(mixer, x, y, ridge, dtype, **hparams) - y[:, 1:]) ** 2).mean(dim=(0, 2))


def hparam_grid(cfg: dict, mixer: str) -> list[dict]:
    """Every combination of ``cfg["hparams"][mixer]`` (``[{}]``: the defaults alone)."""
    grid = (cfg.get("hparams") or {}).get(mixer) or {}
    names = list(grid)
    return [dict(zip(names, vals)) for vals in itertools.product(*(grid[n] for n in names))]


def _mse(mixer, x, y, cfg, hp) -> torch.Tensor:
    hp = dict(hp)
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    return ttr_mse(mixer, x, y, hp.pop("ridge", cfg["ridge"]), dtype, **hp)


def _safe(v: float) -> float:
    return v if math.isfinite(v) else float("inf")


def run(cfg: dict, mixers, log, seeds=None) -> list[dict]:
    """Sweep ``shifts x dims x seg_lens``; returns summary rows and logs per-position curves.

    Computed in ``cfg["dtype"]`` (default float32; the presets use float64, so that a small ridge is
    judged on its statistics, not on float32 rounding).  Per setting and method: every hyperparameter combination of ``hparam_grid`` is scored (mean MSE)
    on a held-out stream (seed ``VAL_SEED_OFFSET + cfg["seed"]``; rows ``kind="sweep"``), the best
    is chosen (rows ``kind="chosen"``, one per hyperparameter), then evaluated on a fresh stream per
    seed in ``seeds`` (default ``[cfg["seed"]]``; rows ``kind="seed"`` carrying ``seed``).
    """
    rows = []
    T = cfg["seq_len"]
    seeds = [cfg["seed"]] if seeds is None else list(seeds)
    for shift in cfg["shifts"]:
        for dim in cfg["dims"]:
            for seg_len in cfg["seg_lens"]:
                key = {"experiment": "ttr", "seg_len": seg_len, "dim": dim, "shift": shift}
                g = torch.Generator().manual_seed(VAL_SEED_OFFSET + cfg["seed"])
                xv, yv = make_stream(cfg["batch"], T, dim, seg_len, shift, cfg["noise"], g)
                chosen = {}
                for mixer in mixers:
                    grid = hparam_grid(cfg, mixer)
                    scores = []
                    for hp in grid:
                        score = _safe(_mse(mixer, xv, yv, cfg, hp).mean().item()) if len(grid) > 1 else 0.0
                        scores.append(score)
                        if len(grid) > 1:
                            rows.append({**key, "mixer": mixer, "kind": "sweep", "metric": "val_mse", "value": score,
                                         "hparams": ",".join(f"{k}={v}" for k, v in hp.items())})
                    chosen[mixer] = grid[min(range(len(grid)), key=scores.__getitem__)]
                    for name, v in chosen[mixer].items():
                        rows.append({**key, "mixer": mixer, "kind": "chosen", "metric": f"chosen_{name}", "value": v})
                for seed in seeds:
                    g = torch.Generator().manual_seed(seed)
                    x, y = make_stream(cfg["batch"], T, dim, seg_len, shift, cfg["noise"], g)
                    for mixer in mixers:
                        mse = _mse(mixer, x, y, cfg, chosen[mixer])  # [T-1], index i = stream position i+1
                        first = mse[: seg_len - 1].mean().item()
                        later = mse[seg_len - 1 :].mean().item() if T > seg_len else float("nan")
                        for metric, value in (("mse", mse.mean().item()), ("mse_first_seg", first), ("mse_later_segs", later)):
                            rows.append({**key, "mixer": mixer, "kind": "seed", "seed": seed, "metric": metric, "value": value})
                        log({"kind": "curve", **key, "mixer": mixer, "seed": seed, "x": list(range(1, T)), "mse": mse.tolist()})
    return rows
