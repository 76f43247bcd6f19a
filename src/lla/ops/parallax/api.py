"""The public Parallax op: argument checks, defaults and backend dispatch."""

from __future__ import annotations

import math

import torch

from ..lla.api import _check_cu_seqlens, _check_qkv, _check_tensor, _check_window, _pick_backend

__all__ = ["parallax_attention"]

BACKENDS = ("auto", "torch", "triton")


def _check_qrkv(q, r, k, v):
    """Shapes, dtypes and devices shared by the ops -> ``(B, T, H, D, S, Hk, Dv)``."""
    _check_tensor("r", r, 4)  # (``_check_qkv`` takes ``r=None`` for "no second query")
    return _check_qkv(q, k, v, r=r)


def _check_scale(scale, D):
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


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
        cu_seqlens: ``[N + 1]`` int offsets of packed sequences (``B == 1``, ``S == T``); each
            sequence only attends within itself.
        backend: ``"auto"`` (Triton on CUDA when available, else PyTorch), ``"torch"``, ``"triton"``
            (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
        return_lse: also return the softmax log-sum-exp ``[B, T, H]`` float32 (``-inf`` for a row
            that sees no key).

    Returns:
        ``o [B, T, H, Dv]`` in the dtype of ``q`` (computed in float32, float64 for float64 inputs),
        or ``(o, lse)`` with ``return_lse=True``.  Differentiable in ``q, r, k, v`` (exact gradients).
    """
    B, T, H, D, S, Hk, Dv = _check_qrkv(q, r, k, v)
    scale = _check_scale(scale, D)
    window_size = _check_window(window_size, causal)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if torch.compiler.is_compiling():
        # one opaque custom op (fake impl + autograd) for torch.compile; the eager path is below
        from .custom_op import parallax_compiled

        o, lse = parallax_compiled(q, r, k, v, cu_seqlens, scale=scale, window_size=window_size)
        return (o, lse) if return_lse else o
    if cu_seqlens is not None:
        cu_seqlens = _check_cu_seqlens(cu_seqlens, B, T, S, q.device)
    name = _pick_backend(backend, q)
    if name == "triton":
        from .triton_backend import parallax_triton as fn
    else:
        from .torch_backend import parallax_torch as fn
    o, lse = fn(q, r, k, v, scale=scale, window_size=window_size, cu_seqlens=cu_seqlens, return_lse=return_lse)
    return (o, lse) if return_lse else o
