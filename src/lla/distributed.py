"""Context parallelism: one sequence sharded over the processes of a ``torch.distributed`` group.

Every row of LLA (and of Parallax) needs only the keys and values it can see, so the scheme large
training stacks use for softmax attention carries over unchanged:

1. each rank holds a shard of the sequence (dim 1 of ``[B, T, H, D]``) in a named layout,
2. the keys and values are all-gathered over the group (one collective for both),
3. each rank runs the single-device op on its own queries against the keys they can see,
4. in the backward the key/value gradients are reduce-scattered back to the ranks that own them.

Layouts, for a group of ``P`` ranks and a (padded) length ``T = P * T_local``:

* ``"zigzag"``: the sequence is cut into ``2P`` chunks; rank ``p`` holds chunks ``p`` and
  ``2P - 1 - p`` (in that order).  Under a causal mask every rank then does the same work.
* ``"contiguous"``: rank ``p`` holds chunk ``p`` of ``P``.

A length that is not a multiple of ``2P`` (zigzag) or ``P`` (contiguous) is refused by ``shard``
unless ``pad=True``: then the sequence is padded at its end, and ``context_parallel_attention``
takes the real length as ``seqlen=`` so that no query ever sees a padded key; ``unshard(...,
seqlen=T)`` drops the padding again.  (With a causal mask, padding at the end is invisible to the
real tokens anyway; the non-causal case needs ``seqlen``.)

Without an initialised process group (or with a group of one rank) everything runs on this process.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from .ops.common.checks import check_window
from .ops.lla.api import LLAAux, local_linear_attention

__all__ = [
    "context_parallel_attention",
    "shard",
    "unshard",
    "shard_positions",
    "shard_ranges",
    "all_gather_seq",
    "set_context_parallel",
    "SHARDINGS",
]

SHARDINGS = ("zigzag", "contiguous")
MECHANISMS = ("lla", "parallax")


# --------------------------------------------------------------------------------------- groups
def _rank_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_sharding(sharding) -> None:
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")


def _n_chunks(world: int, sharding: str) -> int:
    return 2 * world if sharding == "zigzag" else world


def shard_ranges(T_local: int, rank: int, world: int, sharding: str = "zigzag") -> list[tuple[int, int]]:
    """The global position ranges ``[(c0, c1), ...]`` held by ``rank``, in local order.

    ``T_local`` is the per-rank length (the padded global length is ``world * T_local``).
    """
    _check_sharding(sharding)
    if sharding == "contiguous":
        return [(rank * T_local, (rank + 1) * T_local)]
    if T_local % 2:
        raise ValueError(f"zigzag shards hold two equal chunks: the local length must be even, got {T_local}")
    c = T_local // 2
    a, b = rank, 2 * world - 1 - rank
    return [(a * c, (a + 1) * c), (b * c, (b + 1) * c)]


def shard_positions(T_local: int, group=None, sharding: str = "zigzag", device=None) -> torch.Tensor:
    """Global positions ``[T_local]`` (int64) of this rank's tokens: what rotary embeddings and
    learned absolute positions must use instead of ``arange(T_local)``."""
    rank, world = _rank_world(group)
    idx = [torch.arange(c0, c1, device=device) for c0, c1 in shard_ranges(T_local, rank, world, sharding)]
    return torch.cat(idx)


def _global_order(x: torch.Tensor, world: int, sharding: str, dim: int) -> torch.Tensor:
    """Rank-ordered concatenation of the shards (what an all-gather returns) -> sequence order."""
    if sharding == "contiguous":
        return x
    n = x.shape[dim] // (2 * world)
    parts = x.split(n, dim=dim)  # rank p: parts[2p] = chunk p, parts[2p + 1] = chunk 2P-1-p
    return torch.cat([parts[2 * p] for p in range(world)] + [parts[2 * p + 1] for p in reversed(range(world))], dim=dim)


# ---------------------------------------------------------------------------------- collectives
def _ag(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _rs(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.SUM, group=group)


class _AllGather(torch.autograd.Function):
    """All-gather along ``dim`` (rank order); the backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x, group, world, dim):
        ctx.group, ctx.world, ctx.dim = group, world, dim
        xt = x.movedim(dim, 0).contiguous()
        out = xt.new_empty((world * xt.shape[0], *xt.shape[1:]))
        _ag(out, xt, group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        gt = grad.movedim(ctx.dim, 0).contiguous()
        out = gt.new_empty((gt.shape[0] // ctx.world, *gt.shape[1:]))
        _rs(out, gt, ctx.group)
        return out.movedim(0, ctx.dim), None, None, None


def all_gather_seq(x_local: torch.Tensor, group=None, sharding: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Differentiable all-gather of a sharded sequence, returned in sequence order (padded length).

    The backward sums every rank's gradient of the full sequence and hands each rank the slice it
    owns (one reduce-scatter), so ``loss_r`` on every rank back-propagates into every shard.
    """
    _check_sharding(sharding)
    rank, world = _rank_world(group)
    dim = dim % x_local.dim()
    if world == 1:
        return x_local
    full = _AllGather.apply(x_local, group, world, dim)
    return _global_order(full, world, sharding, dim)


# ------------------------------------------------------------------------------- shard, unshard
def shard(x: torch.Tensor, group=None, sharding: str = "zigzag", dim: int = 1, *, pad: bool = False,
          pad_value: float = 0) -> torch.Tensor:
    """This rank's shard of the full sequence ``x`` (every rank passes the same ``x``).

    ``x.shape[dim]`` must be a multiple of ``2P`` (zigzag) or ``P`` (contiguous); with ``pad=True``
    the sequence is first padded at its end with ``pad_value`` (then pass the real length as
    ``seqlen=`` to ``context_parallel_attention`` and ``unshard``).  Differentiable (a slice).
    """
    _check_sharding(sharding)
    rank, world = _rank_world(group)
    dim = dim % x.dim()
    n = _n_chunks(world, sharding)
    T = x.shape[dim]
    if T % n:
        if not pad:
            raise ValueError(
                f"the sequence length {T} (dim {dim}) is not a multiple of {n} ({sharding} over {world} ranks); "
                "pass pad=True to pad it at the end (and seqlen= to context_parallel_attention / unshard)"
            )
        extra = n - T % n
        shape = list(x.shape)
        shape[dim] = extra
        x = torch.cat([x, x.new_full(shape, pad_value)], dim=dim)
    T_local = x.shape[dim] // world
    return torch.cat([x.narrow(dim, c0, c1 - c0) for c0, c1 in shard_ranges(T_local, rank, world, sharding)], dim=dim)


def unshard(x_local: torch.Tensor, group=None, sharding: str = "zigzag", dim: int = 1, *,
            seqlen: int | None = None) -> torch.Tensor:
    """The full sequence from every rank's shard (an all-gather; differentiable), cut to ``seqlen``."""
    full = all_gather_seq(x_local, group, sharding, dim)
    if seqlen is not None:
        full = full.narrow(dim % x_local.dim(), 0, seqlen)
    return full


# ------------------------------------------------------------------------------------ attention
def _slice_rows(x, c0: int, c1: int, T_local: int):
    """Rows ``[c0, c1)`` (local positions) of a per-position tensor; broadcast tensors pass through."""
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-2] == T_local and T_local > 1:
        return x[..., c0:c1, :]
    return x


def _check_local(name: str, x, T_local: int | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4 ([B, T_local, H, D] layout), got shape {tuple(x.shape)}")
    if T_local is not None and x.shape[1] != T_local:
        raise ValueError(
            f"{name} holds {x.shape[1]} positions but q holds {T_local}: every shard of q, k, v (and r) must "
            "cover the same positions (self-attention over one sharded sequence)"
        )


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ridge=None,
    r: torch.Tensor | None = None,
    group=None,
    sharding: str = "zigzag",
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    seqlen: int | None = None,
    mechanism: str = "lla",
    **op_kwargs,
):
    """LLA (or Parallax) over a sequence sharded across the ranks of ``group``.

    Args:
        q: ``[B, T_local, H, D]`` this rank's queries, in the layout ``sharding``.
        k: ``[B, T_local, Hk, D]`` this rank's keys (``H % Hk == 0``).
        v: ``[B, T_local, Hk, Dv]`` this rank's values.
        ridge: ``mechanism="lla"`` only (default 1.0): a float, a per-head tensor ``[H]``, or a
            per-position tensor ``[B, T_local, H]`` sharded like ``q``; differentiable.  The gradient
            of a shared (scalar / per-head) ridge is this rank's share: sum it over the group, as
            DDP does for any parameter.
        r: ``mechanism="parallax"`` only: ``[B, T_local, H, D]`` second queries, sharded like ``q``.
        group: the context-parallel process group (default: the whole world; this process alone
            when ``torch.distributed`` is not initialised).
        sharding: ``"zigzag"`` (rank ``p`` holds chunks ``p`` and ``2P - 1 - p`` of ``2P``) or
            ``"contiguous"`` (chunk ``p`` of ``P``); see ``shard``.
        causal, window_size: the masks of the *global* sequence (causal: query ``i`` sees keys
            ``j <= i``; window ``(left, right)`` keeps ``i - left <= j <= i + right``).
        seqlen: the real global length when the sequence was padded at its end (``shard(...,
            pad=True)``): keys at ``>= seqlen`` are never seen and queries there output zeros.
        mechanism: ``"lla"`` (``lla.local_linear_attention``) or ``"parallax"``
            (``lla.parallax_attention``).
        **op_kwargs: passed to the op unchanged (``scale``, ``solver``, ``max_iters``, ``tol``,
            ``precondition``, ``backend``; ``return_aux`` for LLA).  ``cu_seqlens`` is not supported.

    Returns:
        ``o [B, T_local, H, Dv]`` sharded like ``q`` (and an ``LLAAux`` over this rank's rows when
        ``return_aux=True``: worst iterations / residual / amplification, ``lse`` in local order).

    Forward: one all-gather of ``[B, T_local, Hk, D + Dv]`` (K and V together); each local query
    chunk ``[c0, c1)`` then runs the op against keys ``[c0 - left, c1)`` (causal, bottom-right
    aligned: exactly the global mask) or ``[c0 - left, c1 + right)`` (non-causal, window shifted to
    match).  Backward: the op's own backward, then one reduce-scatter of dK, dV.  A solve that
    misses its tolerance warns on the rank where it ran, with the rank and rows in the message.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    _check_sharding(sharding)
    _check_local("q", q, None)
    T_local = q.shape[1]
    _check_local("k", k, T_local)
    _check_local("v", v, T_local)
    if "cu_seqlens" in op_kwargs:
        raise ValueError("cu_seqlens is not supported by context_parallel_attention (shard one sequence per batch row)")
    check_window(window_size, causal)
    if mechanism == "lla":
        if r is not None:
            raise ValueError("r is the second query of mechanism='parallax'; mechanism='lla' takes no r")
        op, extra = local_linear_attention, {"ridge": 1.0 if ridge is None else ridge}
    else:
        if ridge is not None:
            raise ValueError("mechanism='parallax' has no ridge (it solves nothing); drop ridge=")
        _check_local("r", r, T_local)
        op, extra = _parallax_op(), {}
        if op_kwargs.get("return_aux"):
            raise ValueError("return_aux is an option of mechanism='lla'")
    rank, world = _rank_world(group)
    T_pad = world * T_local
    if seqlen is None:
        seqlen = T_pad
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or not (1 <= seqlen <= T_pad):
        raise ValueError(
            f"seqlen must be the real global length, an int in [1, {T_pad}] for {world} shards of {T_local}, got {seqlen!r}"
        )
    left, right = int(window_size[0]), (0 if causal else int(window_size[1]))

    Dk = k.shape[-1]
    kv = all_gather_seq(torch.cat([k, v], dim=-1), group, sharding, dim=1)  # [B, T_pad, Hk, D + Dv]
    k_all, v_all = kv[..., :Dk], kv[..., Dk:]
    return_aux = bool(op_kwargs.get("return_aux", False))

    outs, auxes, start = [], [], 0
    for c0, c1 in shard_ranges(T_local, rank, world, sharding):
        n = c1 - c0
        e1 = min(c1, seqlen)  # real queries of this chunk: [c0, e1)
        lo, hi = start, start + n
        start = hi
        if e1 <= c0:  # all padding
            outs.append(q.new_zeros(q.shape[0], n, q.shape[2], v.shape[-1]))
            if return_aux:
                auxes.append((n, None))
            continue
        k0 = 0 if left < 0 else max(0, c0 - left)
        k1 = e1 if causal else (seqlen if right < 0 else min(seqlen, e1 + right))
        # the op aligns query row i with key row i + S - T (bottom-right): shift the window to match
        win = (-1 if left < 0 else k1 - e1 + left, 0 if causal else (-1 if right < 0 else e1 + right - k1))
        rows = slice(lo, lo + (e1 - c0))
        args = (q[:, rows], k_all[:, k0:k1], v_all[:, k0:k1])
        kw = dict(op_kwargs, causal=causal, window_size=win)
        if mechanism == "lla":
            kw["ridge"] = _slice_rows(extra["ridge"], rows.start, rows.stop, T_local)
            res = _warn_with_rank(op, args, kw, rank, world, (c0, e1))
        else:
            res = _warn_with_rank(op, (args[0], r[:, rows], args[1], args[2]), kw, rank, world, (c0, e1))
        o, aux = (res if return_aux else (res, None))
        if e1 < c1:
            o = torch.cat([o, o.new_zeros(o.shape[0], c1 - e1, *o.shape[2:])], dim=1)
        outs.append(o)
        if return_aux:
            auxes.append((c1 - e1, aux))
    o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    if not return_aux:
        return o
    return o, _merge_aux(auxes, q)


def _warn_with_rank(op, args, kw, rank, world, rows):
    """Run the op; re-issue its warnings with the rank and global rows they concern."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = op(*args, **kw)
    for w in caught:
        msg = f"[context parallel rank {rank}/{world}, query rows {rows[0]}..{rows[1] - 1}] {w.message}"
        warnings.warn(msg, w.category, stacklevel=3)
    return res


def _merge_aux(auxes, q) -> LLAAux:
    real = [a for _, a in auxes if a is not None]
    B, H = q.shape[0], q.shape[2]
    lse = []
    for npad, a in auxes:
        if a is not None:
            lse.append(a.lse)
        if npad:
            lse.append(torch.full((B, npad, H), float("-inf"), dtype=torch.float32, device=q.device))
    return LLAAux(
        iters=max((a.iters for a in real), default=0),
        residual=max((a.residual for a in real), default=0.0),
        lse=torch.cat(lse, dim=1),
        solver=real[0].solver if real else "none",
        amplification=max((a.amplification for a in real), default=float("nan")),
    )


def _parallax_op():
    from .ops.parallax import parallax_attention

    return parallax_attention


# ----------------------------------------------------------------------------------------- models
def set_context_parallel(model: torch.nn.Module, group=None, sharding: str = "zigzag", *, enabled: bool = True):
    """Switch every submodule that supports it (those with a ``cp_group`` attribute:
    ``LocalLinearAttention``, the experiments' mixers and ``CausalModel``) to context parallelism
    over ``group`` (default: the whole world) in ``sharding`` -- or back off with ``enabled=False``.

    Inputs must then be sharded (``shard``) along the sequence; positions are the global ones.
    """
    _check_sharding(sharding)
    if enabled and group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("set_context_parallel needs an initialised torch.distributed process group")
        group = dist.group.WORLD
    for m in model.modules():
        if hasattr(m, "cp_group"):
            m.cp_group = group if enabled else None
            m.cp_sharding = sharding
    return model
