"""The public Parallax op: argument checks, defaults and backend dispatch."""

from __future__ import annotations

import torch

from ..common.checks import check_bool, check_qkv, check_scale, check_tensor, check_varlen, check_window
from ..common.policy import pick_backend
from ..common.varlen import Varlen
from .config import ParallaxConfig

__all__ = ["parallax_attention"]


def parallax_attention(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Parallax (Zuo et al. 2026): softmax attention minus the weighted covariance of ``r . k`` and ``v``.

    ``o_i = sum_j s_ij (1 + c_i - r_i . k_j) v_j`` with ``s_ij = softmax_j(scale q_i . k_j)`` over the
    visible keys and ``c_i = sum_j s_ij r_i . k_j`` (``r . k`` is not scaled).  LLA is the case
    ``r_i = A_i^{-1} (E_s[k] - q_i)``, ``A_i = Cov_s(k) + ridge I``.

    Args:
        q: ``[B, T, H, D]`` queries.
        r: ``[B, T, H, D]`` the second (slope) queries, shaped like ``q``.
        k: ``[B, S, Hk, D]`` keys; ``H % Hk == 0`` (grouped-query: query head ``h`` reads key head
            ``h // (H // Hk)``).
        v: ``[B, S, Hk, Dv]`` values.
        scale: logit scale, default ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask (query ``i`` sees keys ``j <= i + S - T``).  A query
            that sees no key outputs zeros.
        window_size: ``(left, right)``, flash-attn semantics, ``-1`` unbounded.
        cu_seqlens_q, cu_seqlens_k: ``[N + 1]`` int32/int64 offsets of ``N`` packed sequences
            (flash-attn's varlen; ``B == 1``, given together): sequence ``n`` is queries
            ``cu_seqlens_q[n]:cu_seqlens_q[n + 1]`` against keys ``cu_seqlens_k[n]:cu_seqlens_k[n + 1]``
            and sees nothing else; ``causal`` and ``window_size`` apply per sequence, bottom-right
            aligned on each.  Sequences may be empty.
        cu_seqlens: the self-attention shorthand, ``cu_seqlens_q = cu_seqlens_k = cu_seqlens`` (``S == T``).
        max_seqlen_q, max_seqlen_k: optional, flash-attn's longest query / key sequence; checked, not needed.
        backend: ``"auto"`` (Triton on CUDA when available, else PyTorch; PyTorch under
            ``torch.compile``), ``"torch"``, ``"triton"`` (CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``; a ``ValueError`` where it cannot run, e.g. under ``torch.compile``).
        return_lse: also return the softmax log-sum-exp ``[B, T, H]`` float32 (``-inf`` for a row
            that sees no key).

    Returns:
        ``o [B, T, H, Dv]`` in the dtype of ``q`` (computed in float32, float64 for float64 inputs),
        or ``(o, lse)`` with ``return_lse=True``.  Differentiable in ``q, r, k, v`` (exact gradients).
    """
    check_tensor("r", r, 4)  # (``check_qkv`` reads ``r=None`` as LLA's "no second query")
    B, T, H, D, S, _Hk, _Dv = check_qkv(q, k, v, r=r)
    scale = check_scale(scale, D)
    window = check_window(window_size, causal)
    check_bool("return_lse", return_lse)
    varlen = check_varlen(cu_seqlens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, B=B, T=T, S=S,
                          device=q.device)
    o, lse = _dispatch(pick_backend(backend, q), q, r, k, v, varlen, scale=scale, window=window, return_lse=return_lse)
    return (o, lse) if return_lse else o


def _dispatch(name: str, q, r, k, v, varlen: Varlen | None, *, scale, window, return_lse):
    """The one way from checked arguments to a backend: the custom op while ``torch.compile`` traces
    (it checks the offsets' values inside), else the backend ``name``.  -> ``(o, lse or None)``."""
    if torch.compiler.is_compiling():
        from .custom_op import parallax_compiled

        return parallax_compiled(q, r, k, v, varlen, scale=scale, window_size=window)
    if name == "triton":
        from .triton_backend import parallax_triton as fn
    else:
        from .torch_backend import parallax_torch as fn
    o, res = fn(q, r, k, v, varlen, ParallaxConfig(scale=scale, window=window, need_lse=return_lse))
    return o, res.lse
