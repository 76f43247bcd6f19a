"""Triton backend entry point: argument preparation, launches, the autograd wrapper, fallbacks.

``lla_triton`` has the signature and return of ``lla.ops.lla.torch_backend.lla_torch``:
``(o [B, T, H, Dv], lse [B, T, H] float32, iters, residual, amplification)``, the residual being the
worst TRUE relative residual ``||A x - mu|| / ||mu||`` of the forward solve at exit.

What runs where
---------------
* forward: ``lla_fwd_kernel`` (1-D grid: query tiles x batch x head) -> o, x, m - c, lse.
* backward: ``lla_bwd_query_kernel`` (adjoint CG, dq, dlam, per-row u / gbar and the pivot-relative sums), then
  ``lla_bwd_key_kernel`` (1-D grid: key tiles x batch x key head) -> dk, dv.  No atomics.  The
  adjoint solve's true residual is checked here (``check_solve(stage="backward")``).
* saved for backward: x, m - c ``[B, T, H, D]`` float32, the lse statistics ``[B, T, H, 2]`` and
  the key shifts ``c [B, Hk, n_tiles, D]`` (see ``key_shifts``): ``O(T * H * D)``.

Transparent fallbacks to the PyTorch backend (same results, just not fused): float64 inputs,
``solver="direct"``, non-finite keys or values, head dims above 256, empty inputs (no batch, heads
or positions); and, with a one-time ``RuntimeWarning`` saying why, a (head dim, dtype, precision,
arch) whose kernels do not fit the GPU (``triton_unsupported``, from the compile check).

``precision`` (``"auto"`` | ``"fp32"`` | ``"mixed"``, see ``common.policy.triton_precision`` / ``block_config``): plain
float32 solves, or the CG iterations as bf16/fp16 tensor-core products inside reliable updates with
accurate true residuals (float32 accuracy either way).  The conditioning estimate is the PyTorch
backend's, from per-row statistics the forward kernel writes (``amplification``); the backward adds
the PyTorch backend's logit-rounding and ridge-gradient checks.

Under the Triton interpreter (``TRITON_INTERPRET=1``) every ``tl.dot`` rounds its operands as the
GPU's tensor cores would (TF32 / bf16 / fp16, round to nearest even); ``LLA_TRITON_EMULATE=0`` switches that
off, ``=trunc`` truncates to TF32 instead (the worst case if the hardware drops the low bits).
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from ...common.policy import triton_precision
from ...common.triton_utils import MAX_GRID_X, device_arch, emulation_mode, interpreting, launch_grid  # noqa: F401  (re-exported)
from ...common.result import BackendResult
from ...common.varlen import Varlen, row_ranges
from ..config import LLAConfig
from . import kernels as _k

__all__ = ["lla_triton", "LLATritonFunction", "row_ranges", "block_config", "key_shifts", "launch_grid",
           "triton_unsupported", "launch_precision", "TILES",
           "amplification", "MAX_HEAD_DIM"]

#: largest head dim the kernels take (padded to a power of two up to this)
MAX_HEAD_DIM = 256
#: keys (at most) behind each query tile's shift: the coordinatewise median of the last ones that
#: every row of the tile sees
SHIFT_KEYS = 8


class _Cfg:
    __slots__ = ("scale", "max_iters", "tol", "precondition", "ridge_min", "ridge_dims", "precision")

    def __init__(self, scale, max_iters, tol, precondition, ridge_min=float("nan"), ridge_dims=(), precision="fp32"):
        self.scale, self.max_iters, self.tol, self.precondition = scale, max_iters, tol, precondition
        self.precision = precision  # resolved: "fp32", "mixed" or "authors"
        self.ridge_min = ridge_min
        self.ridge_dims = list(ridge_dims)  # the ridge's broadcast dims of [B, T, H] (autograd sums over them)


#: mixed precision: the true residual is re-measured (a reliable update) each time the low-precision CG's
#: recurrence residual has dropped by this factor, at most ``MIXED_REFINE`` times per solve
MIXED_INNER = 2.0**-5
MIXED_REFINE = 16
#: tiles of the tensor-core precisions: "mma" (16-row tiles, mma.sync, least register spilling in the
#: compile statistics) or "wgmma" (64-row tiles for D <= 64, Hopper's warpgroup products; not in the
#: compile table, not a public configuration); ``benchmarks/bench_gpu.py --impls lla-mixed-wg`` times the second
MIXED_TILES = "mma"


#: tiles ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` per kernel (``fwd``, ``bwd_q``, ``bwd_k``), by tile
#: family (``_tile_kind``), padded head dim (the wider of D, Dv) and arch (90: sm_90 H100/H200; 80: sm_80
#: A100 and any other arch below 90).  Chosen with ``benchmarks/compile_check.py --sweep`` (compiled on a
#: CPU machine with Triton's bundled ptxas): per kernel the tiles with the least spilling among those that
#: fit the arch's shared memory and keep ptxas out of its low-register spill mode; the table it generates
#: (docs/triton.md) shows what each entry costs.  None is timed on a GPU yet.
TILES = {
    # float32 inputs (``fp32``; ``mixed`` keeps ieee dots outside the CG iterations and the same tiles)
    ("fp32", 16): {90: dict(fwd=(32, 32, 8, 1), bwd_q=(32, 32, 8, 1), bwd_k=(32, 32, 8, 1))},
    ("fp32", 32): {90: dict(fwd=(16, 32, 4, 1), bwd_q=(16, 32, 4, 1), bwd_k=(16, 32, 4, 1))},
    ("fp32", 64): {90: dict(fwd=(16, 32, 8, 1), bwd_q=(16, 32, 8, 1), bwd_k=(16, 16, 8, 1))},
    ("fp32", 128): {90: dict(fwd=(16, 16, 8, 1), bwd_q=(16, 16, 8, 1), bwd_k=(16, 16, 8, 1))},
    # D = 256: the solves spill less pipelined (sm_90, fwd / bwd_q spill stores per thread: fp32 2,272 / 1,860 B
    # at 3 stages against 3,184 / 2,960 at 1; mixed 2,856 / 2,056 against the low-register mode / 3,868); the
    # key kernel only unpipelined (3 stages: the low-register mode, 10,284 B; 1 stage: 174 registers, none)
    ("fp32", 256): {90: dict(fwd=(16, 16, 8, 3), bwd_q=(16, 16, 8, 3), bwd_k=(16, 16, 8, 1))},
    # bf16 / fp16 inputs on ``fp32`` (tf32x3 dots)
    ("half", 16): {90: dict(fwd=(32, 32, 8, 1), bwd_q=(32, 32, 8, 1), bwd_k=(32, 32, 8, 1))},
    ("half", 32): {90: dict(fwd=(16, 32, 4, 1), bwd_q=(16, 32, 4, 1), bwd_k=(16, 32, 4, 1))},
    ("half", 64): {90: dict(fwd=(32, 32, 8, 1), bwd_q=(32, 32, 8, 1), bwd_k=(16, 32, 8, 1))},
    ("half", 128): {90: dict(fwd=(16, 32, 8, 1), bwd_q=(16, 32, 8, 1), bwd_k=(16, 16, 8, 1))},
    ("half", 256): {90: dict(fwd=(16, 16, 8, 1), bwd_q=(16, 16, 8, 1), bwd_k=(16, 16, 8, 1))},
    # bf16 / fp16 inputs on ``mixed`` and the ``authors`` scheme: every dot on tensor cores (mma.sync, 16 rows)
    ("lowp", 16): {90: dict(fwd=(32, 32, 4, 1), bwd_q=(32, 32, 4, 1), bwd_k=(32, 32, 4, 1))},
    # D = 32: 32-row tiles spill (sm_90 fwd / bwd_q / bwd_k 1,012 / 1,476 / 604 B per thread; sm_80 up to 1,428),
    # 16-row tiles none (``compile_check.py --sweep``, docs/triton.md)
    ("lowp", 32): {90: dict(fwd=(16, 32, 4, 1), bwd_q=(16, 32, 4, 1), bwd_k=(16, 32, 4, 1))},
    ("lowp", 64): {90: dict(fwd=(16, 32, 4, 1), bwd_q=(16, 32, 4, 1), bwd_k=(16, 32, 4, 1))},
    ("lowp", 128): {90: dict(fwd=(16, 32, 8, 1), bwd_q=(16, 32, 8, 1), bwd_k=(16, 32, 8, 1))},
    ("lowp", 256): {90: dict(fwd=(16, 16, 8, 1), bwd_q=(16, 16, 8, 1), bwd_k=(16, 16, 8, 1))},
    # ``MIXED_TILES = "wgmma"``: 64-row tiles (one warpgroup's wgmma), D <= 64 only (wider ones spill more and
    # outgrow sm_80's shared memory; they take the ``lowp`` / ``fp32`` tiles)
    ("wgmma", 16): {90: dict(fwd=(64, 32, 8, 1), bwd_q=(64, 16, 8, 1), bwd_k=(32, 32, 4, 1))},
    ("wgmma", 32): {90: dict(fwd=(64, 32, 8, 1), bwd_q=(64, 16, 8, 1), bwd_k=(32, 32, 4, 1))},
    ("wgmma", 64): {90: dict(fwd=(64, 32, 8, 1), bwd_q=(64, 16, 8, 1), bwd_k=(32, 32, 4, 1))},
}
#: (tile family, padded head dim, arch) the kernels cannot run at (no tiles fit): the op hands these to
#: the PyTorch backend with a one-time warning saying why.  Found by ``benchmarks/compile_check.py``
#: (``--sweep 16x16/8/1,16x16/8/2,16x16/4/1`` and the table's 16x16/8/3): float32 inputs at D 129-256 on
#: sm_80, whose forward kernel ptxas puts in its low-register spill mode at every tile tried (32 registers,
#: 10.4-37 KB of spill stores per thread), fp32 and mixed alike (they share the ``fp32`` tiles)
UNSUPPORTED: dict = {
    ("fp32", 256, 80): "sm_80's forward kernel at D 129-256 with float32 inputs only compiles in ptxas's "
                       "low-register spill mode (32 registers, >10 KB of spill stores per thread)",
}
#: ``{(padded head dim, arch): why}`` where float32 inputs on ``"mixed"`` run the ``"fp32"`` scheme instead
#: (same float32 accuracy, no tensor cores), with a one-time warning: for a mixed forward kernel (it
#: carries both the bf16 and the ieee matvec) that ptxas would put in its low-register spill mode.
#: Empty: the compile check found none with the tiles above (at D = 256 with 1 stage it was: 32
#: registers, 13,580 B of spill stores; with 3 stages 255 registers, 2,856 B)
MIXED_AS_FP32: dict = {}
_WARNED: set = set()


def launch_precision(D: int, Dv: int, dtype: torch.dtype, precision: str, arch: int):
    """The precision the kernels run for a resolved ``precision`` -> ``(precision, why)``: float32 inputs on
    ``"mixed"`` at a (head dim, arch) of ``MIXED_AS_FP32`` run ``"fp32"`` (``why`` says why), else unchanged
    (``why`` None)."""
    widest = max(16, triton.next_power_of_2(max(D, Dv)))
    if precision == "mixed" and dtype == torch.float32:
        why = MIXED_AS_FP32.get((widest, _arch_class(arch)))
        if why:
            return "fp32", why
    return precision, None


def _tile_kind(dtype: torch.dtype, precision: str, widest: int) -> str:
    half = dtype != torch.float32
    if precision != "fp32" and MIXED_TILES == "wgmma" and widest <= 64:
        return "wgmma"
    if precision == "authors" or (precision == "mixed" and half):
        return "lowp"
    return "half" if half else "fp32"


def _arch_class(arch: int) -> int:
    return 90 if arch >= 90 else 80


def _tiles(widest: int, kind: str, arch: int) -> dict:
    per_arch = TILES[(kind, widest)]
    return per_arch.get(_arch_class(arch), per_arch[90])


def triton_unsupported(D: int, Dv: int, dtype: torch.dtype, precision: str, arch: int):
    """Why the kernels cannot run head dims ``D``/``Dv``, ``dtype``, resolved ``precision`` on compute
    capability ``arch`` (``None`` when they can): no tile configuration fits that arch's shared memory
    without ptxas's low-register spill mode (``UNSUPPORTED``, from the compile check)."""
    widest = max(16, triton.next_power_of_2(max(D, Dv)))
    kind = _tile_kind(dtype, precision, widest)
    return UNSUPPORTED.get((kind, widest, _arch_class(arch)))


def block_config(D: int, Dv: int, dtype: torch.dtype, precision: str = "fp32", arch: int = 90) -> dict:
    """Tile sizes, warps, pipeline stages and dot precisions for head dims ``D``/``Dv`` (padded to powers
    of two) on compute capability ``arch`` (``lla.ops.common.triton_utils.device_arch``).

    Returns ``BLOCK_D``, ``BLOCK_DV``, the dot precisions ``PREC`` (moments, output, true residuals,
    gradients), ``PREC_QK`` (logits q.k and do.v: raw input values), ``PREC_CG`` / ``PREC_CGQ`` (the CG
    iterations' matvec and their logits), ``MIXED``, ``REFINE``, ``INNER`` (see ``kernels._solve``)
    and, per kernel (``fwd``, ``bwd_q``, ``bwd_k``), ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``
    (``TILES``).

    ``precision="fp32"``: float32 inputs use exact fp32 dots (``ieee``, no tensor cores); half inputs
    TF32 dots for the logits (exact for bf16/fp16 values) and ``"tf32x3"`` (three TF32 products,
    about fp32 accuracy) for the rest.  ``"mixed"``: the CG iterations (their matvecs and logits) as
    bf16 tensor-core products (fp16 for fp16 inputs) with fp32 accumulators, inside reliable updates
    whose true residuals, like the moments, output and gradients, keep the accurate precision:
    ``ieee`` for float32 inputs (``tf32x3`` there lost 100x on the ridge gradient at logits ~1e3),
    ``tf32x3`` with native half logits (exact) for half inputs, so every dot of a half-input call is
    on tensor cores.  ``"authors"`` (benchmark only): every dot bf16 / fp16, no refinement.

    The backward kernels' ``BLOCK_M`` never exceeds the forward's (their tiles must sit inside one
    forward tile, whose key shift they use).  Under the interpreter the tiles are 16..32 (few, large
    numpy steps), different per kernel.
    """
    bd = max(16, triton.next_power_of_2(D))
    bdv = max(16, triton.next_power_of_2(Dv))
    widest = max(bd, bdv)
    half = dtype != torch.float32
    lowp = "fp16" if dtype == torch.float16 else "bf16"
    if interpreting():  # different tiles per kernel, so that CI sees tiles that do not line up
        fwd, bwd_q, bwd_k = (32, 32, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1)
    else:
        t = _tiles(widest, _tile_kind(dtype, precision, widest), arch)
        fwd, bwd_q, bwd_k = t["fwd"], t["bwd_q"], t["bwd_k"]
    assert bwd_q[0] <= fwd[0] and bwd_k[0] <= fwd[0], "backward query tiles must fit in forward tiles"
    if precision == "fp32":
        prec, prec_qk = ("ieee", "ieee") if not half else (_HALF_PREC, "tf32")
        cg, cgq, mixed, refine, inner = prec, prec_qk, False, 1, 0.0
    elif precision == "mixed":
        prec, prec_qk = ("tf32x3", lowp) if half else ("ieee", "ieee")
        cg, cgq, mixed, refine, inner = lowp, lowp, True, MIXED_REFINE, MIXED_INNER
    elif precision == "authors":
        prec = prec_qk = cg = cgq = lowp
        mixed, refine, inner = False, 0, 0.0
    else:
        raise ValueError(f"block_config: unknown precision {precision!r} (resolve 'auto' first)")
    # the key kernel's accumulating products for half inputs at D = 256: exact fp32 (``ieee``) instead of
    # ``tf32x3`` / bf16, whose operand splits put it in ptxas's low-register spill mode there (32 registers,
    # 9.2-9.5 KB of spill stores per thread on sm_90 at 8 or 16 warps, 1 or 3 stages); more accurate, no
    # tensor cores for those products (the logits keep ``PREC_QK``)
    prec_k = "ieee" if (half and widest >= 256 and not interpreting()) else prec
    return dict(BLOCK_D=bd, BLOCK_DV=bdv, PREC=prec, PREC_QK=prec_qk, PREC_CG=cg, PREC_CGQ=cgq, MIXED=mixed,
                REFINE=refine, INNER=inner, fwd=fwd, bwd_q=bwd_q, bwd_k=bwd_k, PREC_K=prec_k)


#: dot precision of the non-logit dots for bf16/fp16 inputs
_HALF_PREC = "tf32x3"


def _launch_args(bc: dict, which: str) -> dict:
    bm, bn, warps, stages = bc[which]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bc["BLOCK_D"], BLOCK_DV=bc["BLOCK_DV"],
                PREC=bc["PREC_K"] if which == "bwd_k" else bc["PREC"],
                PREC_QK=bc["PREC_QK"], EMU=emulation_mode(), MIXED=bc["MIXED"], PREC_CG=bc["PREC_CG"],
                PREC_CGQ=bc["PREC_CGQ"], REFINE=bc["REFINE"], INNER=bc["INNER"], num_warps=warps,
                num_stages=stages)


def key_shifts(k: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, block_m: int) -> torch.Tensor:
    """Per forward query tile, a key shift ``c [B, Hk, n_tiles, D]`` float32 built only from keys
    that EVERY row of the tile sees (so no row's arithmetic touches a key it cannot see).

    The rows ``i0 .. i1-1`` of a tile that see any key share the keys ``lo[last] .. hi[first]``
    (both bounds are non-decreasing); ``c`` is the coordinatewise median of the last ``SHIFT_KEYS``
    of them (robust to one outlier among them), zero when they share none.  The kernels' results do
    not depend on ``c`` in exact arithmetic; it removes a common offset of the keys before the
    cancelling products of the matvec.
    """
    B, S, Hk, D = k.shape
    T = lo.shape[0]
    n_tiles = triton.cdiv(T, block_m)
    pad = n_tiles * block_m - T
    lo_t = torch.nn.functional.pad(lo.long(), (0, pad), value=S).view(n_tiles, block_m)
    hi_t = torch.nn.functional.pad(hi.long(), (0, pad), value=-1).view(n_tiles, block_m)
    some = lo_t <= hi_t  # rows that see a key
    a = torch.where(some, lo_t, -1).amax(1)  # [n_tiles]  last such row's lo (the largest)
    z = torch.where(some, hi_t, S).amin(1)  # first such row's hi (the smallest)
    idx = z[:, None] - torch.arange(SHIFT_KEYS, device=k.device)[None, :]  # [n_tiles, SHIFT_KEYS]
    valid = (idx >= a[:, None]) & some.any(1)[:, None] & (idx >= 0) & (idx < S)
    picked = k.index_select(1, idx.clamp(0, max(S - 1, 0)).flatten()).float()  # [B, n_tiles*NS, Hk, D]
    picked = picked.view(B, n_tiles, SHIFT_KEYS, Hk, D)
    picked = torch.where(valid[None, :, :, None, None], picked, float("nan"))
    c = picked.nanmedian(dim=2).values.nan_to_num(0.0)  # [B, n_tiles, Hk, D]; all-NaN -> 0
    return c.permute(0, 2, 1, 3).contiguous()


def _forward(q, k, v, lam, ranges, cfg):
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bc = block_config(D, Dv, q.dtype, cfg.precision, device_arch(q.device))
    lo, hi, _, _ = ranges
    bm = bc["fwd"][0]
    shift = key_shifts(k, lo, hi, bm)  # [B, Hk, n_m, D]
    dev = q.device
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=dev)
    X = torch.empty(B, T, H, D, dtype=torch.float32, device=dev)
    M = torch.empty_like(X)
    stat = torch.empty(B, T, H, 2, dtype=torch.float32, device=dev)  # row max, 1 / mass
    lse = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    res = torch.empty_like(lse)
    amp_rows = torch.empty(B, T, H, _k.NAMP.value, dtype=torch.float32, device=dev)
    n_m = triton.cdiv(T, bm)
    iters = torch.zeros(B * H * n_m, dtype=torch.int32, device=dev)
    _k.lla_fwd_kernel[launch_grid(n_m, B * H)](
        q, k, v, shift, lam, lo, hi,
        o, X, M, stat, lse, res, amp_rows, iters,
        T, S, H, Hk, D, Dv, cfg.scale, cfg.tol, cfg.max_iters, n_m,
        PRECOND=cfg.precondition, **_launch_args(bc, "fwd"),
    )
    amp = amplification(amp_rows, stat[..., 1], lam, D, cfg.scale, q, Hk)
    stats = torch.stack([iters.max().float(), res.max(), amp]).double().cpu()
    return o, lse, stats, X, M, stat, shift


def amplification(rows: torch.Tensor, smax: torch.Tensor, lam: torch.Tensor, D: int, scale: float,
                  q: torch.Tensor, Hk: int) -> torch.Tensor:
    """The worst row's rounding magnifier (``LLAAux.amplification``) from the forward kernel's per-row
    statistics, in the calibrated form of the PyTorch backend (``torch_backend.function._amplification``
    documents each term; both evaluate ``amplification_rows``).

    ``rows [B, T, H, NAMP]``: ``|w|_1``, ``E|k - c|``, ``E|k|``, ``E|k - c|^2``, ``|m - c|``, ``|x|``,
    ``|q - c|``, ``E|v|``, ``|o|``; ``smax [B, T, H]`` the largest weight (the inverse mass, as the
    row max has weight exactly 1 before normalising); ``lam [B, T, H]``.  ``|o|`` is taken relative
    to ``max(|o|, mean |o|)`` over the rows of the same (batch, key head), as the PyTorch backend's
    tile mean.  -> 0-dim float32 tensor."""
    from ..torch_backend.function import amplification_rows

    aw, ekc, ek, ekc2, mn, xn, qcn, ev, on = rows.unbind(-1)
    B, T, H = aw.shape
    seen = smax > 0
    a = amplification_rows(aw, ekc, ek, ekc2, mn, xn, qcn, q.float().norm(dim=-1), smax, lam, D, scale,
                           torch.finfo(torch.float32).eps)
    on_mean = on.view(B, T, Hk, H // Hk).mean(dim=(1, 3), keepdim=True).expand(B, T, Hk, H // Hk).reshape(B, T, H)
    rel = ev / torch.maximum(on, on_mean).clamp_min(torch.finfo(torch.float32).tiny)
    a = torch.where(seen, a * rel, torch.zeros_like(a))
    a = torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a)
    return a.max() if a.numel() else a.new_zeros(())


def _backward(do, q, k, v, lam, X, M, stat, shift, ranges, cfg):
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bc = block_config(D, Dv, q.dtype, cfg.precision, device_arch(q.device))
    lo, hi, qlo, qhi = ranges
    n_shift = shift.shape[2]
    dev = q.device
    do = do.contiguous()
    dq = torch.empty_like(q)
    U = torch.empty(B, T, H, D, dtype=torch.float32, device=dev)
    gbar = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    piv = torch.empty(B, T, H, dtype=torch.int32, device=dev)
    pivs = torch.empty(B, T, H, 8, dtype=torch.float32, device=dev)
    dlam = torch.empty_like(gbar)
    res = torch.empty_like(gbar)
    logit = torch.empty_like(gbar)
    n_m = triton.cdiv(T, bc["bwd_q"][0])
    iters = torch.zeros(B * H * n_m, dtype=torch.int32, device=dev)
    _k.lla_bwd_query_kernel[launch_grid(n_m, B * H)](
        q, k, v, shift, lam, lo, hi, X, M, stat, do,
        dq, U, gbar, piv, pivs, dlam, res, logit, iters,
        T, S, H, Hk, D, Dv, cfg.scale, cfg.tol, cfg.max_iters, n_shift,
        PRECOND=cfg.precondition, SHIFT_M=bc["fwd"][0], **_launch_args(bc, "bwd_q"),
    )
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _k.lla_bwd_key_kernel[launch_grid(triton.cdiv(S, bc["bwd_k"][1]), B * Hk)](
        q, k, v, shift, lo, hi, qlo, qhi, X, M, stat, do, U, gbar, piv, pivs,
        dk, dv,
        T, S, H, Hk, D, Dv, cfg.scale, n_shift,
        SHIFT_M=bc["fwd"][0], **_launch_args(bc, "bwd_k"),
    )
    stats = torch.stack([iters.max().float(), res.max(), logit.max()]).double().cpu()
    return dq, dk, dv, dlam, stats


class LLATritonFunction(torch.autograd.Function):
    """``(q, k, v, lam [B, T, H] float32, ranges, cfg) -> (o, lse, stats)``; stats = (iterations,
    worst true relative residual, worst amplification) as a float64 CPU tensor, like the torch
    backend.  The backward checks its adjoint solve's true residual (``check_solve``, stage
    ``"backward"``) and warns ``LLAConvergenceWarning`` when it missed the tolerance."""

    @staticmethod
    def forward(ctx, q, k, v, lam, ranges, cfg):
        o, lse, stats, X, M, stat, shift = _forward(q, k, v, lam, ranges, cfg)
        ctx.save_for_backward(q, k, v, lam, X, M, stat, shift, *ranges)
        ctx.cfg = cfg
        ctx.amp = float(stats[2])
        ctx.mark_non_differentiable(lse, stats)
        return o, lse, stats

    @staticmethod
    def backward(ctx, do, _dlse, _dstats):
        from ...common.diagnostics import check_conditioning, check_solve
        from ..torch_backend.function import BACKWARD_LOGIT_FACTOR

        q, k, v, lam, X, M, stat, shift, *ranges = ctx.saved_tensors
        cfg = ctx.cfg
        dq, dk, dv, dlam, stats = _backward(do, q, k, v, lam, X, M, stat, shift, ranges, cfg)
        iters, resid, logit = stats.tolist()
        check_solve(stage="backward", solver="cg", residual=resid, tol=cfg.tol, iters=int(iters),
                    ridge_min=cfg.ridge_min, op="local_linear_attention (triton)")
        # the PyTorch backend's two backward checks (``LLATorchFunction.backward``): gradients through
        # nearly one-hot weights are relatively as inexact as the logits ...
        check_conditioning(BACKWARD_LOGIT_FACTOR * logit, q.dtype, op="local_linear_attention (triton backward)")
        # ... and the ridge gradient -u.x, summed by autograd over the ridge's broadcast dims, is as
        # inexact as the output (the forward's estimate) times the sum's cancellation
        if ctx.needs_input_grad[3]:
            canc = ridge_cancellation(dlam, cfg.ridge_dims)
            if canc > 0:
                check_conditioning(ctx.amp * canc, q.dtype, op="local_linear_attention (triton ridge gradient)")
        return dq, dk, dv, (dlam if ctx.needs_input_grad[3] else None), None, None


def ridge_cancellation(dlam: torch.Tensor, dims) -> float:
    """``||dlam|| / ||dlam summed over dims||``: how much the sum autograd makes of the per-row ridge
    gradients ``dlam [B, T, H]`` (over the ridge's broadcast dims ``dims``) cancels (1: none)."""
    num = float(dlam.norm())
    den = float((dlam.sum(dims) if dims else dlam).norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def _warn_fallback(msg: str) -> None:
    """Warn once per message (per process) that a configuration runs on the PyTorch backend."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        import warnings

        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _use_torch(q, k, v, solver) -> bool:
    if q.dtype == torch.float64 or solver == "direct":
        return True
    if q.shape[3] > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM or q.numel() == 0 or k.numel() == 0:
        return True
    return not bool(torch.isfinite(k).all() & torch.isfinite(v).all())


def lla_triton(q, k, v, ridge, varlen: Varlen | None, config: LLAConfig) -> tuple[torch.Tensor, BackendResult]:
    """Triton backend entry, the same contract as ``torch_backend.lla_torch``: ``ridge [B, T, H]`` (any float
    dtype, possibly an expanded view, differentiable) -> ``(o [B, T, H, Dv], BackendResult)`` with ``lse``,
    ``iters``, ``residual`` and ``amplification``.  ``config.precision``: ``"auto"`` | ``"fp32"`` | ``"mixed"``
    (see ``common.policy.triton_precision`` and ``block_config``; both give float32 accuracy, ``"mixed"`` runs the CG
    iterations on bf16/fp16 tensor cores inside iterative refinement).  See the module docstring for the
    cases handed to the PyTorch backend.
    """
    precision = triton_precision(config.precision, q.dtype)
    use_torch = _use_torch(q, k, v, config.solver)
    if not use_torch and not interpreting():
        arch = device_arch(q.device)
        precision, why = launch_precision(q.shape[3], v.shape[3], q.dtype, precision, arch)
        if why:
            _warn_fallback(f"local_linear_attention: float32 inputs at D={q.shape[3]}, Dv={v.shape[3]} on sm_{arch} "
                           f"run precision='fp32' instead of 'mixed' (same float32 accuracy): {why}")
        why = triton_unsupported(q.shape[3], v.shape[3], q.dtype, precision, arch)
        if why:
            _warn_fallback(f"local_linear_attention: the Triton kernels cannot run D={q.shape[3]}, Dv={v.shape[3]}, "
                           f"{q.dtype}, precision={precision!r} on sm_{arch} ({why}); using the PyTorch backend")
            use_torch = True
    if use_torch:
        from ..torch_backend import lla_torch

        return lla_torch(q, k, v, ridge, varlen, dataclasses.replace(config, precision=precision))
    T, S = q.shape[1], k.shape[1]
    ranges = row_ranges(T, S, tuple(config.window), varlen, q.device)
    dims = [d for d in range(3) if ridge.stride(d) == 0 and ridge.shape[d] > 1]  # before .contiguous()
    ridge32 = ridge.float().contiguous()  # [B, T, H]; autograd casts the ridge gradient back to its dtype
    cfg = _Cfg(float(config.scale), int(config.max_iters), float(config.tol), bool(config.precondition),
               float(ridge32.detach().min()), dims, precision)
    o, lse, stats = LLATritonFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), ridge32, ranges, cfg)
    iters, resid, amp = stats.tolist()
    return o, BackendResult(lse=lse, iters=int(iters), residual=resid, amplification=amp)
