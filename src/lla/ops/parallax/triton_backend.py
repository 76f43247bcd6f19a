"""Fused Triton Parallax: forward and backward kernels and their launcher (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``).  Imported lazily by ``api.py`` only when this backend is picked.

Forward (1-D grid: query tiles x (batch, head)), one pass over the key tiles a row can see, flash-style
with an online softmax.  The ``r . k`` moments are kept *centred* with a running centre ``cbar``
(Chan / Welford merge), never as the raw ``d2 = sum p a`` and ``O2 = sum p a v`` whose difference
``O1 d2 / d1 - O2`` cancels catastrophically when ``r . k`` is large (e.g. ``9000 + O(1)``).  Per
row, with ``p = exp(logit - max)`` (old partial sums rescaled by ``alpha = exp(max_old - max)``):

    n      = alpha d1 + sum_tile p
    shift  = sum_tile p (a - cbar) / n                       (the old part sums to zero about cbar)
    C      = alpha (C - shift O1) + sum_tile p (a - cbar - shift) v
    O1     = alpha O1 + sum_tile p v,   d1 = n,   cbar += shift

so that at the end ``cbar = c`` and ``o = (O1 - C) / d1 = E_s[v] - Cov_s(a, v)``.  The centre only
ever moves by the weighted mean of keys the row sees (no statistic over invisible keys).

Saved for the backward (``O(T H D)``): the row max and ``1 / d1`` (kept apart: folding them into
one lse rounds it to ulp(max), which at logits ~1e4 moves every weight by ~1e-3), ``c``, and
``Ev = O1 / d1``, ``Cv = C / d1`` (float32 ``[B, T, H, Dv]``), from which ``gbar = do . Ev`` and
``beta = do . Cv`` (= ``Cov_s(a, do . v)``) are formed before the backward kernels.

Backward: ``parallax_bwd_query_kernel`` (dq, dr; 1-D grid: query tiles x (batch, head)) and
``parallax_bwd_key_kernel`` (dk, dv; 1-D grid: key tiles x (batch, key head), looping over the query
heads of its group and the rows that see the tile).  No atomics.  With ``b = a - c``,
``w = s (1 - b)``, ``e = do . v - gbar``: ``dl = w e + s beta``, ``da = -s e``.

Dots (float32 accumulation): float32 inputs use exact fp32 products (``ieee``) throughout.  For
bf16/fp16 inputs, ``PREC_QK`` = ``"tf32"`` for the dots whose operands are raw input-dtype values
(``q . k``, ``r . k``, ``do . v``: the tiles are widened to float32, which TF32 holds exactly), and
``PREC`` (per kernel, ``_HALF_PREC``) for the dots with a float32 intermediate operand (weights
times values, keys, queries or ``do``): ``"tf32x3"`` (three TF32 products, about fp32 accuracy)
wherever plain TF32 measurably raised the error under emulation (every kernel for fp16; for bf16
the query-gradient kernel, whose key centring cancels), ``"tf32"`` elsewhere (docs/parallax.md).
Every product goes through the LLA kernels' ``_dot`` (``lla.ops.common.triton_utils``), which under the
interpreter rounds the operands as the GPU's tensor cores would (``EMU``; ``LLA_TRITON_EMULATE`` as
for LLA), and every store goes through ``_cast``, which with ``EMU`` rounds float32 -> bf16 to
nearest even as the GPU does (the interpreter truncates).

Transparent fallbacks to the PyTorch backend: float64 inputs, non-finite keys or values, head dims
above 256, empty sequences; and, with a one-time ``RuntimeWarning`` saying why, a (head dim, dtype,
arch) whose kernels do not fit the GPU (``triton_unsupported``, from the compile check).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.result import BackendResult
from ..common.varlen import Varlen, row_ranges
from .config import ParallaxConfig
from ..common.triton_utils import _cast, _dot, _program_ids, device_arch, emulation_mode, interpreting, launch_grid

__all__ = ["parallax_triton", "ParallaxTritonFunction", "block_config", "MAX_HEAD_DIM", "TILES", "triton_unsupported"]

#: largest head dim the kernels take (padded to a power of two up to this)
MAX_HEAD_DIM = 256

_BIG = tl.constexpr(1.0e30)  # finite stand-in for -inf as the initial running maximum


@triton.jit
def _load_rows(P, row, offs, n_cols, row_ok):
    """``[BM, BLOCK]`` float32 tile of a ``[..., n_cols]`` tensor at flat rows ``row`` (zero padded)."""
    return tl.load(P + row[:, None] * n_cols + offs[None, :], mask=row_ok[:, None] & (offs[None, :] < n_cols),
                   other=0.0).to(tl.float32)


@triton.jit
def _load_keys(Kb, j, offs, S, n_cols, stride):
    """``[BN, BLOCK]`` float32 tile of keys (or values) ``j`` of one (batch, key head)."""
    return tl.load(Kb + j[:, None].to(tl.int64) * stride + offs[None, :],
                   mask=(j[:, None] < S) & (offs[None, :] < n_cols), other=0.0).to(tl.float32)


@triton.jit
def parallax_fwd_kernel(
    Q, R, K, V, LO, HI,  # inputs
    O, STAT, EV, CV, LSE,  # outputs
    T, S, H, Hk, D, Dv, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr, PREC_QK: tl.constexpr, EMU: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (batch, head).  Writes o, the row statistics
    ``STAT [B, T, H, 3]`` = (max, 1 / d1, c) (zeros for a row that sees no key), ``Ev``, ``Cv`` and
    the lse (``-inf`` for a row that sees no key)."""
    pid_m, pid_bh = _program_ids(T, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // Hk)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < T
    row = (b.to(tl.int64) * T + offs_m) * H + h  # [BM] flat index into [B, T, H]
    q = _load_rows(Q, row, offs_d, D, row_ok)
    r = _load_rows(R, row, offs_d, D, row_ok)
    lo = tl.load(LO + offs_m, mask=row_ok, other=S)
    hi = tl.load(HI + offs_m, mask=row_ok, other=-1)
    j_start = tl.min(tl.where(lo <= hi, lo, S), 0)
    j_end = tl.max(tl.where(lo <= hi, hi, -1), 0) + 1
    Kb = K + b.to(tl.int64) * S * Hk * D + hk * D
    Vb = V + b.to(tl.int64) * S * Hk * Dv + hk * Dv

    mx = tl.full([BLOCK_M], -_BIG, tl.float32)
    d1 = tl.zeros([BLOCK_M], tl.float32)
    cbar = tl.zeros([BLOCK_M], tl.float32)
    O1 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    C = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_n
        kt = _load_keys(Kb, j, offs_d, S, D, Hk * D)
        vt = _load_keys(Vb, j, offs_dv, S, Dv, Hk * Dv)
        vis = (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])
        logits = tl.where(vis, _dot(q, tl.trans(kt), PREC_QK, EMU) * scale, -float("inf"))
        a = tl.where(vis, _dot(r, tl.trans(kt), PREC_QK, EMU), 0.0)
        mx_new = tl.maximum(mx, tl.max(logits, 1))
        alpha = tl.exp(mx - mx_new)
        p = tl.exp(logits - mx_new[:, None])
        n = alpha * d1 + tl.sum(p, 1)
        shift = tl.where(n > 0, tl.sum(p * (a - cbar[:, None]), 1) / tl.where(n > 0, n, 1.0), 0.0)
        cbar = cbar + shift
        C = alpha[:, None] * (C - shift[:, None] * O1) + _dot(p * (a - cbar[:, None]), vt, PREC, EMU)
        O1 = alpha[:, None] * O1 + _dot(p, vt, PREC, EMU)
        d1 = n
        mx = mx_new
    seen = d1 > 0
    iom = tl.where(seen, 1.0 / tl.where(seen, d1, 1.0), 0.0)
    ev = O1 * iom[:, None]
    cv = C * iom[:, None]
    dvm = row_ok[:, None] & (offs_dv[None, :] < Dv)
    tl.store(O + row[:, None] * Dv + offs_dv[None, :], _cast(ev - cv, O.dtype.element_ty, EMU), mask=dvm)
    tl.store(EV + row[:, None] * Dv + offs_dv[None, :], ev, mask=dvm)
    tl.store(CV + row[:, None] * Dv + offs_dv[None, :], cv, mask=dvm)
    tl.store(STAT + 3 * row, tl.where(seen, mx, 0.0), mask=row_ok)
    tl.store(STAT + 3 * row + 1, iom, mask=row_ok)
    tl.store(STAT + 3 * row + 2, tl.where(seen, cbar, 0.0), mask=row_ok)
    lse = tl.where(seen, mx + tl.log(tl.where(seen, d1, 1.0)), -float("inf"))
    tl.store(LSE + row, lse, mask=row_ok)


@triton.jit
def _grad_weights(q, r, kt, vt, do, mxs, iom, cm, gbar, beta, lo, hi, j, scale, PREC_QK: tl.constexpr,
                  EMU: tl.constexpr):
    """A (rows x key tile) block of the backward: ``(s, w, dl, da)`` [BM, BN], zero where hidden."""
    vis = (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])
    s = tl.where(vis, tl.exp(_dot(q, tl.trans(kt), PREC_QK, EMU) * scale - mxs[:, None]) * iom[:, None], 0.0)
    bb = tl.where(vis, _dot(r, tl.trans(kt), PREC_QK, EMU) - cm[:, None], 0.0)  # b_j = a_j - c
    e = _dot(do, tl.trans(vt), PREC_QK, EMU) - gbar[:, None]  # e_j = do . v_j - gbar
    w = s * (1.0 - bb)
    dl = w * e + s * beta[:, None]
    da = -s * e
    return s, w, dl, da


@triton.jit
def parallax_bwd_query_kernel(
    Q, R, K, V, LO, HI, STAT, DO, GB,  # inputs
    DQ, DR,  # outputs
    T, S, H, Hk, D, Dv, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr, PREC_QK: tl.constexpr, EMU: tl.constexpr,
):
    """dq = scale sum_j dl_j (k_j - m) and dr = sum_j da_j (k_j - m) (``m = E_s[k]``, see below) for
    BLOCK_M rows of one (batch, head)."""
    pid_m, pid_bh = _program_ids(T, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // Hk)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < T
    row = (b.to(tl.int64) * T + offs_m) * H + h
    q = _load_rows(Q, row, offs_d, D, row_ok)
    r = _load_rows(R, row, offs_d, D, row_ok)
    do = _load_rows(DO, row, offs_dv, Dv, row_ok)
    mxs = tl.load(STAT + 3 * row, mask=row_ok, other=0.0)
    iom = tl.load(STAT + 3 * row + 1, mask=row_ok, other=0.0)
    cm = tl.load(STAT + 3 * row + 2, mask=row_ok, other=0.0)
    gbar = tl.load(GB + 2 * row, mask=row_ok, other=0.0)
    beta = tl.load(GB + 2 * row + 1, mask=row_ok, other=0.0)
    lo = tl.load(LO + offs_m, mask=row_ok, other=S)
    hi = tl.load(HI + offs_m, mask=row_ok, other=-1)
    j_start = tl.min(tl.where(lo <= hi, lo, S), 0)
    j_end = tl.max(tl.where(lo <= hi, hi, -1), 0) + 1
    Kb = K + b.to(tl.int64) * S * Hk * D + hk * D
    Vb = V + b.to(tl.int64) * S * Hk * Dv + hk * Dv

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dr = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    sdl = tl.zeros([BLOCK_M], tl.float32)
    sda = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_n
        kt = _load_keys(Kb, j, offs_d, S, D, Hk * D)
        vt = _load_keys(Vb, j, offs_dv, S, Dv, Hk * Dv)
        s, w, dl, da = _grad_weights(q, r, kt, vt, do, mxs, iom, cm, gbar, beta, lo, hi, j, scale, PREC_QK, EMU)
        dq += _dot(dl, kt, PREC, EMU)
        dr += _dot(da, kt, PREC, EMU)
        m += _dot(s, kt, PREC, EMU)
        sdl += tl.sum(dl, 1)
        sda += tl.sum(da, 1)
    # sum_j dl_j = sum_j da_j = 0 exactly, but gbar and beta come from the forward's sums, so the
    # computed ones are rounding noise; times keys with a large common offset that noise would
    # dominate dq and dr.  Centre the keys on their weighted mean m (exact in exact arithmetic).
    dq -= sdl[:, None] * m
    dr -= sda[:, None] * m
    dm = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], _cast(dq * scale, DQ.dtype.element_ty, EMU), mask=dm)
    tl.store(DR + row[:, None] * D + offs_d[None, :], _cast(dr, DR.dtype.element_ty, EMU), mask=dm)


@triton.jit
def parallax_bwd_key_kernel(
    Q, R, K, V, LO, HI, QLO, QHI, STAT, DO, GB,  # inputs
    DK, DV,  # outputs
    T, S, H, Hk, D, Dv, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr, PREC_QK: tl.constexpr, EMU: tl.constexpr,
):
    """dk_j = sum_i (scale dl_ij q_i + da_ij r_i), dv_j = sum_i w_ij do_i for BLOCK_N keys of one
    (batch, key head), over the query heads of its group and the rows that see these keys."""
    pid_n, pid_bh = _program_ids(S, BLOCK_N)
    b = pid_bh // Hk
    hk = pid_bh % Hk
    G = H // Hk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < S
    Kb = K + b.to(tl.int64) * S * Hk * D + hk * D
    Vb = V + b.to(tl.int64) * S * Hk * Dv + hk * Dv
    kt = _load_keys(Kb, offs_n, offs_d, S, D, Hk * D)
    vt = _load_keys(Vb, offs_n, offs_dv, S, Dv, Hk * Dv)
    qlo = tl.load(QLO + offs_n, mask=col_ok, other=T)
    qhi = tl.load(QHI + offs_n, mask=col_ok, other=-1)
    i_start = tl.min(tl.where(qlo <= qhi, qlo, T), 0)
    i_end = tl.max(tl.where(qlo <= qhi, qhi, -1), 0) + 1

    dkq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dkr = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g_idx in range(0, G):
        h = hk * G + g_idx
        for i0 in range(i_start, i_end, BLOCK_M):
            rows = i0 + offs_m
            row_ok = rows < T
            row = (b.to(tl.int64) * T + rows) * H + h
            q = _load_rows(Q, row, offs_d, D, row_ok)
            r = _load_rows(R, row, offs_d, D, row_ok)
            do = _load_rows(DO, row, offs_dv, Dv, row_ok)
            mxs = tl.load(STAT + 3 * row, mask=row_ok, other=0.0)
            iom = tl.load(STAT + 3 * row + 1, mask=row_ok, other=0.0)
            cm = tl.load(STAT + 3 * row + 2, mask=row_ok, other=0.0)
            gbar = tl.load(GB + 2 * row, mask=row_ok, other=0.0)
            beta = tl.load(GB + 2 * row + 1, mask=row_ok, other=0.0)
            lo = tl.load(LO + rows, mask=row_ok, other=S)
            hi = tl.load(HI + rows, mask=row_ok, other=-1)
            s, w, dl, da = _grad_weights(q, r, kt, vt, do, mxs, iom, cm, gbar, beta, lo, hi, offs_n, scale,
                                         PREC_QK, EMU)
            dkq += _dot(tl.trans(dl), q, PREC, EMU)
            dkr += _dot(tl.trans(da), r, PREC, EMU)
            dv += _dot(tl.trans(w), do, PREC, EMU)
    kcol = (b.to(tl.int64) * S + offs_n) * Hk + hk
    tl.store(DK + kcol[:, None] * D + offs_d[None, :], _cast(dkq * scale + dkr, DK.dtype.element_ty, EMU),
             mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV + kcol[:, None] * Dv + offs_dv[None, :], _cast(dv, DV.dtype.element_ty, EMU),
             mask=col_ok[:, None] & (offs_dv[None, :] < Dv))


# ------------------------------------------------------------------------------------------ launcher
#: tiles ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` per kernel by input kind (``fp32``: exact fp32 dots;
#: ``half``: bf16 / fp16 inputs, TF32 / TF32x3 dots), padded head dim (the wider of D, Dv) and arch (90:
#: sm_90; 80: sm_80 and any arch below 90).  Chosen with ``benchmarks/compile_check.py --sweep`` (least
#: spilling among the tiles that fit the arch's shared memory out of ptxas's low-register spill mode; the
#: generated table is in docs/triton.md); never timed on a GPU.
TILES = {
    ("fp32", 16): {90: dict(fwd=(32, 32, 4, 1), bwd_q=(32, 32, 4, 1), bwd_k=(64, 32, 8, 1))},
    ("fp32", 32): {90: dict(fwd=(32, 32, 4, 1), bwd_q=(32, 32, 4, 1), bwd_k=(64, 32, 8, 1))},
    ("fp32", 64): {90: dict(fwd=(32, 32, 4, 1), bwd_q=(32, 32, 4, 1), bwd_k=(64, 32, 8, 1))},
    # D = 128, sm_90: 16x32 at 8 warps spills nothing (87 / 226 / 251 registers); 32x32 at 4 warps spilled
    # 2,512 / 3,264 / 1,948 B per thread, at 8 warps 732 / 872 / 820 B
    ("fp32", 128): {90: dict(fwd=(16, 32, 8, 1), bwd_q=(16, 32, 8, 1), bwd_k=(16, 32, 8, 1))},
    ("fp32", 256): {90: dict(fwd=(16, 32, 8, 1), bwd_q=(16, 32, 8, 1), bwd_k=(16, 32, 8, 1))},
    ("half", 16): {90: dict(fwd=(64, 32, 8, 1), bwd_q=(32, 32, 4, 1), bwd_k=(32, 32, 4, 1))},
    ("half", 32): {90: dict(fwd=(64, 32, 8, 1), bwd_q=(32, 32, 4, 1), bwd_k=(32, 32, 4, 1))},
    ("half", 64): {90: dict(fwd=(64, 32, 8, 1), bwd_q=(32, 32, 4, 1), bwd_k=(32, 32, 4, 1))},
    # bwd_q at 8 warps: 40 B of spill stores per thread on sm_90 (bf16) against 1,100 B at 4
    ("half", 128): {90: dict(fwd=(32, 32, 4, 1), bwd_q=(32, 32, 8, 1), bwd_k=(32, 32, 4, 1))},
    ("half", 256): {90: dict(fwd=(16, 32, 8, 1), bwd_q=(16, 32, 8, 1), bwd_k=(16, 32, 8, 1))},
}
#: (input kind, padded head dim, arch) the kernels cannot run at: handed to the PyTorch backend with a
#: one-time warning saying why
UNSUPPORTED: dict = {}
_WARNED: set = set()


def _kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def triton_unsupported(D: int, Dv: int, dtype: torch.dtype, arch: int):
    """Why the kernels cannot run head dims ``D``/``Dv`` and ``dtype`` on compute capability ``arch``
    (``None`` when they can; ``UNSUPPORTED``, from the compile check)."""
    widest = max(16, triton.next_power_of_2(max(D, Dv)))
    return UNSUPPORTED.get((_kind(dtype), widest, 90 if arch >= 90 else 80))


def block_config(D: int, Dv: int, dtype: torch.dtype, arch: int = 90) -> dict:
    """Tile sizes ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` per kernel (``TILES``, for compute
    capability ``arch``), padded head dims and dot precision.

    float32 inputs use exact fp32 dots (``ieee``).  Half inputs (tiles cast to float32) use
    ``PREC_QK = "tf32"`` for the dots of raw inputs (exact in TF32) and, per kernel, ``PREC[which]``
    from ``_HALF_PREC`` for the others; float32 accumulation everywhere.  Under the interpreter the
    tiles are 16..32, different per kernel, so that CI sees tiles that do not line up.
    """
    bd = max(16, triton.next_power_of_2(D))
    bdv = max(16, triton.next_power_of_2(Dv))
    widest = max(bd, bdv)
    if interpreting():
        fwd, bwd_q, bwd_k = (32, 16, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1)
    else:
        per_arch = TILES[(_kind(dtype), widest)]
        t = per_arch.get(90 if arch >= 90 else 80, per_arch[90])
        fwd, bwd_q, bwd_k = t["fwd"], t["bwd_q"], t["bwd_k"]
    if dtype == torch.float32:
        prec, prec_qk = dict(fwd="ieee", bwd_q="ieee", bwd_k="ieee"), "ieee"
    else:
        prec, prec_qk = dict(_HALF_PREC[dtype]), "tf32"
    return dict(BLOCK_D=bd, BLOCK_DV=bdv, PREC=prec, PREC_QK=prec_qk, fwd=fwd, bwd_q=bwd_q, bwd_k=bwd_k)


#: per kernel, the precision of the dots with a float32 intermediate operand for half inputs
#: (measured under the interpreter's TF32 emulation, table in docs/parallax.md): fp16 results
#: resolve TF32's rounding of the weights (plain TF32 raised their error 1.2-1.5x), bf16 results do
#: not, except dq, dr, whose key-centring cancels (plain TF32 in ``bwd_q``: 4.5x at ``r.k ~ 9000``)
_HALF_PREC = {
    torch.float16: dict(fwd="tf32x3", bwd_q="tf32x3", bwd_k="tf32x3"),
    torch.bfloat16: dict(fwd="tf32", bwd_q="tf32x3", bwd_k="tf32"),
}


def _launch_args(bc: dict, which: str) -> dict:
    bm, bn, warps, stages = bc[which]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bc["BLOCK_D"], BLOCK_DV=bc["BLOCK_DV"], PREC=bc["PREC"][which],
                PREC_QK=bc["PREC_QK"], EMU=emulation_mode(), num_warps=warps, num_stages=stages)


def _forward(q, r, k, v, ranges, scale):
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bc = block_config(D, Dv, q.dtype, device_arch(q.device))
    lo, hi, _, _ = ranges
    dev = q.device
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=dev)
    stat = torch.empty(B, T, H, 3, dtype=torch.float32, device=dev)
    ev = torch.empty(B, T, H, Dv, dtype=torch.float32, device=dev)
    cv = torch.empty_like(ev)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    grid = launch_grid(triton.cdiv(T, bc["fwd"][0]), B * H)
    parallax_fwd_kernel[grid](q, r, k, v, lo, hi, o, stat, ev, cv, lse, T, S, H, Hk, D, Dv, scale,
                              **_launch_args(bc, "fwd"))
    return o, lse, stat, ev, cv


def _backward(do, q, r, k, v, stat, ev, cv, ranges, scale):
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bc = block_config(D, Dv, q.dtype, device_arch(q.device))
    lo, hi, qlo, qhi = ranges
    do = do.contiguous()
    do32 = do.float()
    gb = torch.stack([(do32 * ev).sum(-1), (do32 * cv).sum(-1)], dim=-1).contiguous()  # (gbar, beta) [B, T, H, 2]
    dq, dr = torch.empty_like(q), torch.empty_like(r)
    parallax_bwd_query_kernel[launch_grid(triton.cdiv(T, bc["bwd_q"][0]), B * H)](
        q, r, k, v, lo, hi, stat, do, gb, dq, dr, T, S, H, Hk, D, Dv, scale, **_launch_args(bc, "bwd_q"))
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    parallax_bwd_key_kernel[launch_grid(triton.cdiv(S, bc["bwd_k"][1]), B * Hk)](
        q, r, k, v, lo, hi, qlo, qhi, stat, do, gb, dk, dv, T, S, H, Hk, D, Dv, scale, **_launch_args(bc, "bwd_k"))
    return dq, dr, dk, dv


class ParallaxTritonFunction(torch.autograd.Function):
    """``(q, r, k, v, ranges, scale) -> (o, lse)``; saves the inputs and the row statistics."""

    @staticmethod
    def forward(ctx, q, r, k, v, ranges, scale):
        o, lse, stat, ev, cv = _forward(q, r, k, v, ranges, scale)
        ctx.save_for_backward(q, r, k, v, stat, ev, cv, *ranges)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, r, k, v, stat, ev, cv, *ranges = ctx.saved_tensors
        dq, dr, dk, dv = _backward(do, q, r, k, v, stat, ev, cv, ranges, ctx.scale)
        return dq, dr, dk, dv, None, None


def _use_torch(q, k, v) -> bool:
    if q.dtype == torch.float64:
        return True
    if q.shape[3] > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM or q.shape[1] == 0 or k.shape[1] == 0:
        return True
    return not bool(torch.isfinite(k).all() & torch.isfinite(v).all())


def parallax_triton(q, r, k, v, varlen: Varlen | None, config: ParallaxConfig) -> tuple[torch.Tensor, BackendResult]:
    """Triton backend entry, the contract of ``torch_backend.parallax_torch``: ``(o [B, T, H, Dv],
    BackendResult(lse))``; the module docstring lists the cases handed to the PyTorch backend."""
    use_torch = _use_torch(q, k, v)
    if not use_torch and not interpreting():
        arch = device_arch(q.device)
        why = triton_unsupported(q.shape[3], v.shape[3], q.dtype, arch)
        if why:
            msg = (f"parallax_attention: the Triton kernels cannot run D={q.shape[3]}, Dv={v.shape[3]}, {q.dtype} "
                   f"on sm_{arch} ({why}); using the PyTorch backend")
            if msg not in _WARNED:
                _WARNED.add(msg)
                import warnings

                warnings.warn(msg, RuntimeWarning, stacklevel=3)
            use_torch = True
    if use_torch:
        from .torch_backend import parallax_torch

        return parallax_torch(q, r, k, v, varlen, config)
    T, S = q.shape[1], k.shape[1]
    ranges = row_ranges(T, S, tuple(config.window), varlen, q.device)
    o, lse = ParallaxTritonFunction.apply(q.contiguous(), r.contiguous(), k.contiguous(), v.contiguous(), ranges,
                                          float(config.scale))
    return o, BackendResult(lse=lse if config.need_lse else None)
