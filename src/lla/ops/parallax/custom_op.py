"""``torch.library`` registration of Parallax for ``torch.compile(fullgraph=True)``: one opaque node
with a fake implementation and an autograd formula, instead of the backend's Python loops.

``lla.parallax_attention`` routes here (``api._dispatch``) when ``torch.compiler.is_compiling()``; the
eager path does not touch this module.  Both ops run the PyTorch backend's plain functions, so
compiled and eager results agree to rounding.

    lla::parallax_fwd(q, r, k, v, cu_seqlens?, scale, window_left, window_right, cu_seqlens_k?)
        -> (o [B, T, H, Dv], lse [B, T, H] float32, c [B, Hk, G, T])
    lla::parallax_bwd(do, q, r, k, v, c, cu_seqlens?, scale, window_left, window_right, cu_seqlens_k?)
        -> (dq, dr, dk, dv)

``cu_seqlens`` are the packed query offsets, ``cu_seqlens_k`` the key offsets (None: the same); their
values are checked inside ``parallax_fwd`` (``lla.ops.common.checks.check_varlen_values``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..common.checks import check_varlen_values
from ..common.varlen import Varlen, varlen_of
from . import torch_backend as _tb

__all__ = ["parallax_compiled"]


@torch.library.custom_op("lla::parallax_fwd", mutates_args=())
def _fwd(
    q: Tensor, r: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], scale: float, window_left: int,
    window_right: int, cu_seqlens_k: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    varlen = varlen_of(cu_seqlens_q, cu_seqlens_k)
    if varlen is not None:
        check_varlen_values(varlen, q.shape[1], k.shape[1])
    cfg = _tb._Cfg(scale, (window_left, window_right), need_lse=True)
    o, C, lse = _tb.forward_varlen(q, r, k, v, cfg, varlen)
    return o.contiguous(), lse.contiguous(), C.contiguous()


@_fwd.register_fake
def _fwd_fake(q, r, k, v, cu_seqlens_q, scale, window_left, window_right, cu_seqlens_k=None):
    B, T, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(B, T, H, Dv), q.new_empty(B, T, H, dtype=torch.float32), q.new_empty(B, Hk, H // Hk, T, dtype=cdt)


@torch.library.custom_op("lla::parallax_bwd", mutates_args=())
def _bwd(
    do: Tensor, q: Tensor, r: Tensor, k: Tensor, v: Tensor, C: Tensor, cu_seqlens_q: Optional[Tensor], scale: float,
    window_left: int, window_right: int, cu_seqlens_k: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = _tb._Cfg(scale, (window_left, window_right))
    return tuple(g.contiguous() for g in _tb.backward_varlen(do, q, r, k, v, C, cfg, varlen_of(cu_seqlens_q, cu_seqlens_k)))


@_bwd.register_fake
def _bwd_fake(do, q, r, k, v, C, cu_seqlens_q, scale, window_left, window_right, cu_seqlens_k=None):
    return torch.empty_like(q), torch.empty_like(r), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, r, k, v, cu_seqlens_q, *config, cu_seqlens_k = inputs
    ctx.save_for_backward(q, r, k, v, output[2], cu_seqlens_q, cu_seqlens_k)
    ctx.config = config


def _backward(ctx, do, _dlse, _dc):
    q, r, k, v, C, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dr, dk, dv = _bwd(do.contiguous(), q, r, k, v, C, cu_seqlens_q, *ctx.config, cu_seqlens_k)
    return dq, dr, dk, dv, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def parallax_compiled(q, r, k, v, varlen: Varlen | None, *, scale, window_size):
    """The op through the custom op: ``(o [B, T, H, Dv], lse [B, T, H])``; types and shapes already
    checked (``varlen`` with int64 offsets, or None)."""
    cu_seqlens_q, cu_seqlens_k = (None, None) if varlen is None else varlen[:2]
    same = cu_seqlens_k is cu_seqlens_q
    o, lse, _c = _fwd(q, r, k, v, cu_seqlens_q, float(scale), int(window_size[0]), int(window_size[1]),
                      None if same else cu_seqlens_k)
    return o, lse
