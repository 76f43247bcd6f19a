"""Argument checks shared by every public op (LLA, Parallax, and their KV-cache ops), written once.

Each ``check_*`` raises a ``TypeError`` / ``ValueError`` naming the argument and what was expected,
and returns the argument in the form the backends take.  Checks that read tensor *values* on the
host (offsets, ridge signs) are separate functions (``check_varlen_values``, ``check_ridge_values``):
the eager path calls them before dispatch, the ``torch.compile`` custom ops inside their
implementation (where the values exist), so both paths run the same checks.

The packed-sequence structure itself is ``varlen.Varlen``; the choices made from checked arguments
(backend, solver, precision) are ``policy``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .varlen import Varlen, segments

__all__ = [
    "FLOAT_DTYPES", "BACKENDS", "QKVShape",
    "check_tensor", "check_qkv", "check_window", "check_scale", "check_ridge", "check_ridge_values",
    "check_choice", "check_bool", "check_solver_options", "check_varlen", "check_varlen_values",
    "check_new_kv", "check_cache_seqlens", "check_cache_batch_idx",
]

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "torch", "triton")
_INT_DTYPES = (torch.int32, torch.int64)


class QKVShape(NamedTuple):
    """``q [B, T, H, D]``, ``k [Bk, S, Hk, D]``, ``v [Bk, S, Hk, Dv]`` (``Bk == B`` unless a cache is indexed)."""

    B: int
    T: int
    H: int
    D: int
    S: int
    Hk: int
    Dv: int


def check_tensor(name: str, x, rank: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} ([B, T, H, D] layout), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {x.dtype}")


def check_qkv(q, k, v, r=None, *, k_name: str = "k", v_name: str = "v", same_batch: bool = True) -> QKVShape:
    """``q [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` (and Parallax's ``r``, shaped like
    ``q``): one float dtype, one device, ``H % Hk == 0``.  ``same_batch=False`` lets ``k``/``v`` have
    another batch size (a cache indexed by ``cache_batch_idx``)."""
    pairs = [("q", q)] + ([("r", r)] if r is not None else []) + [(k_name, k), (v_name, v)]
    names = ", ".join(n for n, _ in pairs)
    for name, t in pairs:
        check_tensor(name, t, 4)
    if len({t.dtype for _, t in pairs}) != 1:
        raise TypeError(f"{names} must share a dtype, got {', '.join(str(t.dtype) for _, t in pairs)}")
    if len({t.device for _, t in pairs}) != 1:
        raise ValueError(f"{names} must be on one device, got {', '.join(str(t.device) for _, t in pairs)}")
    if r is not None and r.shape != q.shape:
        raise ValueError(f"r must have the shape of q {tuple(q.shape)}, got {tuple(r.shape)}")
    B, T, H, D = q.shape
    Bk, S, Hk, Dk = k.shape
    if v.shape[0] != Bk or (same_batch and Bk != B):
        raise ValueError(f"batch sizes differ: q {B}, {k_name} {Bk}, {v_name} {v.shape[0]}")
    if v.shape[1] != S:
        raise ValueError(f"{k_name} and {v_name} must have the same length S, got {S} and {v.shape[1]}")
    if v.shape[2] != Hk:
        raise ValueError(f"{k_name} and {v_name} must have the same number of heads, got {Hk} and {v.shape[2]}")
    if Dk != D:
        raise ValueError(f"q and {k_name} must have the same head dim D, got {D} and {Dk}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the key/value heads ({Hk})")
    if D == 0 or v.shape[3] == 0:
        raise ValueError("head dims must be > 0")
    return QKVShape(B, T, H, D, S, Hk, v.shape[3])


def check_window(window_size, causal) -> tuple[int, int]:
    """``causal`` a bool and ``window_size`` a pair of ints >= -1 -> the ``(left, right)`` the backends
    take (``right = 0`` when causal)."""
    check_bool("causal", causal)
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    ):
        raise ValueError(f"window_size must be a pair of ints >= -1 (left, right), got {window_size!r}")
    return int(window_size[0]), 0 if causal else int(window_size[1])


def check_scale(scale, D: int) -> float:
    """``None`` -> ``1 / sqrt(D)``; else a finite number."""
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_solver_options(solver, max_iters, tol, solvers=("auto", "cg", "direct")) -> None:
    check_choice("solver", solver, solvers)
    if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1):
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol > 0)):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")


def check_ridge(ridge, B: int, T: int, H: int, q: torch.Tensor) -> torch.Tensor:
    """The ridge as a ``[B, T, H]`` float tensor on q's device (an expanded view when given smaller).
    Its values (finite, > 0) are checked here in eager mode, by the custom op under ``torch.compile``."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float, torch.Tensor)):
        raise TypeError(f"ridge must be a float or a tensor broadcastable to [B, T, H], got {type(ridge).__name__}")
    if not isinstance(ridge, torch.Tensor):
        if not math.isfinite(ridge) or ridge <= 0:
            raise ValueError(f"ridge must be a finite number > 0, got {ridge}")
        return torch.full((1, 1, 1), float(ridge), dtype=torch.float64, device=q.device).expand(B, T, H)
    if not ridge.is_floating_point():
        raise TypeError(f"ridge must be a floating-point tensor, got {ridge.dtype}")
    if ridge.device != q.device:
        raise ValueError(f"ridge is on {ridge.device} but q is on {q.device}")
    if ridge.dim() > 3:
        raise ValueError(f"ridge must be broadcastable to [B, T, H] = {[B, T, H]}, got shape {tuple(ridge.shape)}")
    try:
        lam = ridge.expand(B, T, H) if ridge.dim() else ridge.reshape(1, 1, 1).expand(B, T, H)
    except RuntimeError:
        raise ValueError(
            f"ridge must be broadcastable to [B, T, H] = {[B, T, H]}, got shape {tuple(ridge.shape)} "
            "(a per-head ridge has shape [H])"
        ) from None
    if not torch.compiler.is_compiling():
        check_ridge_values(ridge)
    return lam


def check_ridge_values(ridge: torch.Tensor) -> None:
    """Host read: every ridge value finite and > 0."""
    if ridge.numel() and not bool((torch.isfinite(ridge) & (ridge > 0)).all()):
        raise ValueError("ridge must be finite and > 0 everywhere")


def _check_offsets(name: str, cu) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32/int64 tensor [N + 1], got {type(cu).__name__}")
    if cu.dtype not in _INT_DTYPES or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D int32/int64 tensor [N + 1] with N >= 1, got {cu.dtype} of shape {tuple(cu.shape)}"
        )


def _check_max_seqlen(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be an int >= 0 (or None), got {value!r}")


def check_varlen(cu_seqlens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, B: int, T: int, S: int,
                 device) -> Varlen | None:
    """flash-attn's packed-sequence arguments -> ``Varlen`` (int64 offsets on ``device``) or None.

    ``cu_seqlens`` is the self-attention shorthand (``cu_seqlens_q = cu_seqlens_k = cu_seqlens``,
    needs ``S == T``); ``cu_seqlens_q`` / ``cu_seqlens_k`` come together, with the same number of
    sequences; packed inputs have batch size 1.  The offsets' values are checked here in eager mode
    (``check_varlen_values``), by the custom op under ``torch.compile``.
    """
    if cu_seqlens is not None and (cu_seqlens_q is not None or cu_seqlens_k is not None):
        raise ValueError("give cu_seqlens (self-attention) or cu_seqlens_q and cu_seqlens_k, not both")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if cu_seqlens is None and cu_seqlens_q is None and cu_seqlens_k is None:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q / max_seqlen_k need cu_seqlens_q and cu_seqlens_k")
        return None
    if cu_seqlens is not None:
        _check_offsets("cu_seqlens", cu_seqlens)
        if S != T:
            raise ValueError(f"cu_seqlens needs self-attention shapes (S == T), got T = {T}, S = {S}; "
                             "give cu_seqlens_q and cu_seqlens_k for packed cross-attention")
        cu_seqlens_q = cu_seqlens_k = cu_seqlens
    elif cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    else:
        _check_offsets("cu_seqlens_q", cu_seqlens_q)
        _check_offsets("cu_seqlens_k", cu_seqlens_k)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got "
                             f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    if B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need inputs with batch size 1, got B = {B}")
    cu_q = cu_seqlens_q.to(device=device, dtype=torch.int64)
    cu_k = cu_q if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k.to(device=device, dtype=torch.int64)
    varlen = Varlen(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    if not torch.compiler.is_compiling():
        check_varlen_values(varlen, T, S)
    return varlen


def check_varlen_values(varlen: Varlen, T: int, S: int) -> list[tuple[slice, slice]]:
    """Host read of the offsets: each starts at 0, ends at the packed length (``T`` queries, ``S``
    keys) and never decreases (empty sequences are allowed); ``max_seqlen_*`` at least the longest.
    Returns ``varlen.segments`` of them."""
    cu_q, cu_k = varlen.cu_seqlens_q, varlen.cu_seqlens_k
    names = ("cu_seqlens_q", "cu_seqlens_k") if cu_q is not cu_k else ("cu_seqlens", "cu_seqlens")
    for name, cu, total, what, mx, mx_name in ((names[0], cu_q, T, "T", varlen.max_seqlen_q, "max_seqlen_q"),
                                               (names[1], cu_k, S, "S", varlen.max_seqlen_k, "max_seqlen_k")):
        c = cu.tolist()
        if c[0] != 0 or c[-1] != total:
            raise ValueError(f"{name} must start at 0 and end at {what} = {total}, got {c[0]} ... {c[-1]}")
        lengths = [b - a for a, b in zip(c, c[1:])]
        if min(lengths) < 0:
            raise ValueError(f"{name} must be non-decreasing, got {c}")
        if mx is not None and mx < max(lengths):
            raise ValueError(f"{mx_name} = {mx} is smaller than the longest sequence in {name} ({max(lengths)})")
    return segments(varlen, T, S)


def check_new_kv(k, v, shape: QKVShape) -> None:
    """New keys/values of a KV-cache call: both or neither, ``[B, T_new, Hk, D]`` / ``[B, T_new, Hk, Dv]``."""
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or both None)")
    if k is None:
        return
    B, T, _, D, _, Hk, Dv = shape
    for name, x, want, last in (("k", k, (B, T, Hk, D), "D"), ("v", v, (B, T, Hk, Dv), "Dv")):
        check_tensor(name, x, 4)
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape [B, T_new, Hk, {last}] = {list(want)}, got {tuple(x.shape)}")


def check_cache_seqlens(cache_seqlens, B: int, t_add: int, S_max: int, device) -> torch.Tensor:
    """``cache_seqlens`` (an int, or an int32/int64 tensor ``[B]``) -> int64 ``[B]`` on ``device``, each
    in ``[0, S_max - t_add]`` (``t_add`` new entries are about to be written)."""
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int64, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in _INT_DTYPES:
        raise TypeError("cache_seqlens must be an int32/int64 tensor [B] (or an int)")
    if cache_seqlens.dim() != 1 or cache_seqlens.numel() != B:
        raise ValueError(f"cache_seqlens must have shape [B] = [{B}], got {tuple(cache_seqlens.shape)}")
    seqlens = cache_seqlens.to(device=device, dtype=torch.int64)
    if B and (int(seqlens.min()) < 0 or int(seqlens.max()) + t_add > S_max):
        raise ValueError(
            f"cache_seqlens must lie in [0, S_max - T_new] = [0, {S_max - t_add}], got {seqlens.tolist()}"
        )
    return seqlens


def check_cache_batch_idx(cache_batch_idx, B: int, B_cache: int, writes: bool, device) -> torch.Tensor | None:
    """flash-attn's ``cache_batch_idx``: int32/int64 ``[B]``, the cache row each batch element uses,
    in ``[0, B_cache)``; distinct when new keys/values are written (``writes``).  None: row ``b`` for
    element ``b`` (then the cache's batch size must be ``B``).  -> int64 ``[B]`` on ``device`` or None."""
    if cache_batch_idx is None:
        if B_cache != B:
            raise ValueError(f"batch sizes differ: q {B}, k_cache {B_cache} (pass cache_batch_idx to index the cache)")
        return None
    if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.dtype not in _INT_DTYPES:
        raise TypeError(f"cache_batch_idx must be an int32/int64 tensor [B], got "
                        f"{getattr(cache_batch_idx, 'dtype', type(cache_batch_idx).__name__)}")
    if cache_batch_idx.dim() != 1 or cache_batch_idx.numel() != B:
        raise ValueError(f"cache_batch_idx must have shape [B] = [{B}], got {tuple(cache_batch_idx.shape)}")
    idx = cache_batch_idx.to(device=device, dtype=torch.int64)
    rows = idx.tolist()
    if B and (min(rows) < 0 or max(rows) >= B_cache):
        raise ValueError(f"cache_batch_idx must lie in [0, {B_cache}) (the cache's batch size), got {rows}")
    if writes and len(set(rows)) != len(rows):
        raise ValueError(f"cache_batch_idx must not repeat a cache row when k and v are written, got {rows}")
    return idx
