"""Task 2: in-context linear regression (Garg et al. 2022) with segment structure (trained).

A prompt holds ``n`` pairs; every ``seg_len`` pairs the task vector switches (``W_s ~ N(0, I/d)``,
``y = W_s x + noise``, ``x ~ N(0, I) + c_s`` with ``c_s ~ N(0, shift^2 I)``; ``shift = 0`` is Garg's
setting).  Tokens interleave ``[x_t, 0]`` and ``[0, y_t]`` (width ``dx + dy``); the model predicts
``y_t`` at the ``x_t`` token.  Metric: MSE / dy per pair index, against least squares (on all
earlier pairs, and on the earlier pairs of the current segment: an oracle that knows the
boundaries), 3-nearest-neighbours and averaging baselines.
"""

from __future__ import annotations

import math

import torch

from ...ops.common.linalg import solve
from .mqar import eval_seed


def make_icr(batch: int, n_pairs: int, dim: int, seg_len: int, shift: float, noise: float, generator):
    """``tokens [B, 2n, 2d]``, inputs ``x [B, n, d]``, targets ``y [B, n, d]`` (float32)."""
    g = generator
    n_seg = math.ceil(n_pairs / seg_len)
    W = torch.randn(batch, n_seg, dim, dim, generator=g) / math.sqrt(dim)
    centre = shift * torch.randn(batch, n_seg, dim, generator=g)
    seg = torch.arange(n_pairs) // seg_len
    x = centre[:, seg] + torch.randn(batch, n_pairs, dim, generator=g)
    y = torch.einsum("bnij,bnj->bni", W[:, seg], x) + noise * torch.randn(batch, n_pairs, dim, generator=g)
    tokens = torch.zeros(batch, 2 * n_pairs, 2 * dim)
    tokens[:, 0::2, :dim] = x
    tokens[:, 1::2, dim:] = y
    return tokens, x, y


def baselines(x: torch.Tensor, y: torch.Tensor, seg_len: int, k_nn: int = 3, ridge: float = 1e-6) -> dict:
    """Per-pair MSE / d ``[n]`` of the classical predictors of ``y_t`` from pairs ``j < t``."""
    B, n, d = x.shape
    x64, y64 = x.double(), y.double()
    preds = {name: torch.zeros(B, n, d, dtype=torch.float64) for name in ("least_squares", "segment_ls", "knn", "averaging")}
    for t in range(1, n):
        for name, lo in (("least_squares", 0), ("segment_ls", (t // seg_len) * seg_len)):
            if lo >= t:
                continue  # no earlier pair in this segment: predict 0
            X, Y = x64[:, lo:t], y64[:, lo:t]  # [B, m, d]
            # min-norm least squares through the ridge limit: W = Y^T X (X^T X + eps I)^-1
            gram = X.transpose(1, 2) @ X + ridge * torch.eye(d, dtype=torch.float64)
            W = solve(gram, X.transpose(1, 2) @ Y).transpose(1, 2)  # [B, d_out, d_in]
            preds[name][:, t] = (W @ x64[:, t, :, None]).squeeze(-1)
        dist = ((x64[:, :t] - x64[:, t : t + 1]) ** 2).sum(-1)  # [B, t]
        idx = dist.topk(min(k_nn, t), largest=False).indices
        preds["knn"][:, t] = y64.gather(1, idx[..., None].expand(-1, -1, d)).mean(1)
        w_avg = torch.einsum("bmi,bmj->bij", y64[:, :t], x64[:, :t]) / t  # averaging estimator mean(y x^T)
        preds["averaging"][:, t] = (w_avg @ x64[:, t, :, None]).squeeze(-1)
    return {k: ((p - y64) ** 2).mean(dim=(0, 2)) for k, p in preds.items()}


class ICRTask:
    def __init__(self, cfg: dict, seg_len: int):
        self.cfg, self.seg_len = cfg, seg_len
        self.dim, self.n = cfg["dim"], cfg["n_pairs"]

    def model_kwargs(self) -> dict:
        return {"input_dim": 2 * self.dim, "output_dim": self.dim, "max_len": 0}

    def sample(self, batch, generator):
        tokens, _, y = make_icr(batch, self.n, self.dim, self.seg_len, self.cfg["shift"], self.cfg["noise"], generator)
        return tokens, y

    @staticmethod
    def loss(out, y):
        return ((out[:, 0::2].float() - y) ** 2).mean()

    @torch.no_grad()
    def evaluate(self, model, device, seed: int, split: str = "test"):
        g = torch.Generator().manual_seed(eval_seed(seed, split) + 1000 + self.seg_len)
        tokens, x, y = make_icr(self.cfg["eval_batch"], self.n, self.dim, self.seg_len, self.cfg["shift"], self.cfg["noise"], g)
        pred = model(tokens.to(device))[:, 0::2].double().cpu()
        curves = {"model": ((pred - y.double()) ** 2).mean(dim=(0, 2))}
        if self.cfg.get("baselines", True) and split == "test":
            curves.update(baselines(x, y, self.seg_len))
        rows = []
        for name, c in curves.items():
            rows.append({"metric": "mse", "value": c.mean().item(), "seg_len": self.seg_len, "predictor": name})
            rows.append({"metric": "mse_last_quarter_of_segments", "seg_len": self.seg_len, "predictor": name,
                         "value": c[(torch.arange(self.n) % self.seg_len) >= (3 * self.seg_len) // 4].mean().item()})
        return rows, [{"seg_len": self.seg_len, "predictor": k, "x": list(range(self.n)), "y": c.tolist()} for k, c in curves.items()]
