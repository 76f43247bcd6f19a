"""FlashLLA-style Triton kernels: forward (moments, in-kernel CG, output) and backward (adjoint).

The math is the PyTorch backend's (``lla.ops.lla.torch_backend.function``), in its notation.  Per query
row ``i`` with softmax weights ``s_j`` over its visible keys:

    m     = sum_j s_j k_j                                   (D)
    mu    = m - q                                           (D)
    A p   = sum_j s_j ((k_j - m) . p) (k_j - m) + lam p    matrix-free, streamed over key tiles
    x     = A^{-1} mu                                       Jacobi-preconditioned CG, per-row exit
    o     = sum_j s_j (1 - (k_j - m) . x) v_j

Locality: nothing a row computes involves a key it cannot see.  The logits use the RAW keys (the
softmax needs no shift, and bf16/fp16 keys stay exact in TF32 dots only unshifted).  The moments and
the matvec use keys shifted by ``c``, one vector per (batch, key head, forward query tile) computed
by the launcher from keys that EVERY row of that tile sees (``C [B, Hk, n_tiles, D]``, zero when
they share none); ``A``, ``mu`` and ``o`` do not depend on ``c`` in exact arithmetic, it only
removes a common offset before the cancelling products ``(k_j - c).p - (m - c).p``.  The saved
``M`` is ``m - c`` of the row's forward tile; the backward kernels' query tiles are never larger
than the forward's and are aligned to them, so every tile they touch has one shift.

Layouts (all contiguous): ``q [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` in the input
dtype (tiles are cast to float32 on load), per-row float32 state ``[B, T, H, D]`` / ``[B, T, H]`` /
``[B, T, H, 2]``.  Visibility (causal, window, packed sequences) arrives as per-row key ranges
``lo[T], hi[T]`` (query row ``i`` sees keys ``lo_i <= j <= hi_i``) and, for the key-tile kernel,
per-key query ranges ``qlo[S], qhi[S]``; tiles outside the ranges are never visited.  Grids are 1-D
(tiles x batch x heads folded into axis 0, which CUDA allows up to 2^31 - 1).

Dots: ``PREC_QK`` for the dots whose operands are exact in it (q.k logits and do.v: input-dtype
values, exact in TF32 or as native bf16/fp16 products for bf16/fp16), ``PREC`` for the rest (moments,
true-residual matvecs, output, gradients) and, when ``MIXED``, ``PREC_CG`` / ``PREC_CGQ`` for the CG
iterations' matvecs and their logits (bf16/fp16 tensor-core products inside reliable updates, see
``_solve``); ``function.block_config`` picks them from the op's ``precision``.
Every dot goes through ``_dot`` (``lla.ops.common.triton_utils``, shared with the Parallax kernels), which
under the interpreter (``EMU`` > 0) rounds the operands as the GPU would (the interpreter's
``tl.dot`` is a plain float32 product whatever the precision asked).

Head dims are padded to powers of two (``BLOCK_D``, ``BLOCK_DV``) with masked loads: padded
coordinates hold zeros, the ridge keeps their diagonal positive, and the right-hand sides are zero
there, so the solves never move them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...common.triton_utils import _cast, _dot, _program_ids, _round_tf32  # noqa: F401  (shared with the Parallax kernels)

__all__ = ["lla_fwd_kernel", "lla_bwd_query_kernel", "lla_bwd_key_kernel", "round_tf32_kernel"]

_BIG = tl.constexpr(1.0e30)  # finite stand-in for -inf as the initial running maximum
#: MIXED solves measure the true residual at least every this many low-precision iterations
UPDATE_EVERY = tl.constexpr(16)
#: per-row statistics the forward writes for the conditioning estimate (``AMP [B, T, H, NAMP]``)
NAMP = tl.constexpr(9)


@triton.jit
def round_tf32_kernel(X, Y, N, EMU: tl.constexpr, BLOCK: tl.constexpr):
    """``Y = round_tf32(X)`` elementwise (tests check the rounding helper against torch)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N, other=0.0)
    tl.store(Y + offs, _round_tf32(x, EMU), mask=offs < N)


@triton.jit
def _weights(q, kt, mxs, iom, lo, hi, j, scale, PREC_QK: tl.constexpr, EMU: tl.constexpr,
             CLAMP: tl.constexpr = False):
    """Normalised softmax weights of a (rows x key tile) block from RAW keys ``kt``: s [BM, BN]
    (0 where not visible).

    ``exp(logit - max) / omega`` from the row max and mass kept apart: folding them into one lse
    would round it to ulp(max), which at logits ~1e4 moves every weight by ~1e-3."""
    logits = _dot(q, tl.trans(kt), PREC_QK, EMU) * scale
    vis = (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])
    expo = logits - mxs[:, None]
    if CLAMP:  # logits recomputed at a lower precision (a MIXED solve's) may pass the row max: at logits
        # ~1e3 their exp would overflow
        expo = tl.minimum(expo, 0.0)
    return tl.where(vis, tl.exp(expo) * iom[:, None], 0.0)


@triton.jit
def _weights_pivot(q, kt, mxs, iom, lo, hi, j, piv, scale, PREC_QK: tl.constexpr, EMU: tl.constexpr):
    """``_weights`` with the row's pivot key (``piv [BM]``, its largest weight) given exponent 0
    exactly, as in the forward's running maximum: recomputed logits (other tile shapes, other
    rounding) cannot move the weight of a saturated row's only key by ulp(logit)."""
    logits = _dot(q, tl.trans(kt), PREC_QK, EMU) * scale
    vis = (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])
    expo = tl.where(j[None, :] == piv[:, None], 0.0, logits - mxs[:, None])
    return tl.where(vis, tl.exp(expo) * iom[:, None], 0.0)


@triton.jit
def _load_keys(Kb, j, offs_d, S, D, kstride):
    """A raw key tile [BN, BLOCK_D] in float32; zero in padded head dims and rows past the sequence."""
    ptrs = Kb + j[:, None].to(tl.int64) * kstride + offs_d[None, :]
    inside = (j[:, None] < S) & (offs_d[None, :] < D)
    return tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _load_shift(C, b, hk, Hk, n_tiles, tile, offs_d, D):
    """The key shift ``c [BLOCK_D]`` of forward query tile ``tile`` (zero in padded head dims)."""
    base = ((b.to(tl.int64) * Hk + hk) * n_tiles + tile) * D
    return tl.load(C + base + offs_d, mask=offs_d < D, other=0.0)


@triton.jit
def _cov_matvec(p, q, m, lam, mxs, iom, lo, hi, j_start, j_end, Kb, c, kstride, S, D, scale,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, PREC_QK: tl.constexpr,
                EMU: tl.constexpr, CLAMP: tl.constexpr = False):
    """``A p = sum_j s_j (y_j . p) y_j + lam p`` (``y_j = k_j - m``) for a tile of rows, streaming key
    tiles and recomputing the weights: [BM, BLOCK_D].  ``m`` is relative to the shift ``c`` (as the
    keys are here).  The centred form keeps ``A`` positive definite in floating point even when the
    keys are large (the uncentred ``sum_j s_j (k_j . p) k_j - (m . p) m`` cancels catastrophically).
    Also returns ``sum_j s_j (k_j - c) . p`` [BM] of the products as computed here: a later pass of
    the same kernel (same tiles, same rounding) centres its ``(k_j - c) . p`` with it, which is exact
    for a row whose weight sits on one key (``m . p`` is not, and ``|p| |k - c|`` may be huge)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros_like(p)
    wsum = tl.sum(tl.zeros_like(p), 1)
    sa = tl.sum(tl.zeros_like(p), 1)
    mp = tl.sum(m * p, 1)
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_n
        kt = _load_keys(Kb, j, offs_d, S, D, kstride)
        s = _weights(q, kt, mxs, iom, lo, hi, j, scale, PREC_QK, EMU, CLAMP)
        kc = kt - c[None, :]
        a = _dot(p, tl.trans(kc), PREC, EMU)  # [BM, BN]  (k_j - c) . p
        w = s * (a - mp[:, None])  # s_j y_j . p
        acc += _dot(w, kc, PREC, EMU)
        wsum += tl.sum(w, 1)
        sa += tl.sum(s * a, 1)
    return acc - wsum[:, None] * m + lam[:, None] * p, sa


@triton.jit
def _solve(b, inv_diag, q, m, lam, mxs, iom, lo, hi, j_start, j_end, Kb, c, kstride, S, D, scale, tol, max_iters,
           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, PREC_QK: tl.constexpr,
           EMU: tl.constexpr, MIXED: tl.constexpr, PREC_CG: tl.constexpr, PREC_CGQ: tl.constexpr,
           REFINE: tl.constexpr, INNER: tl.constexpr):
    """Jacobi-preconditioned CG on ``A x = b``, one system per row, then its TRUE residual.

    A row stops once its recurrence residual ``||r|| <= tol ||b||``; when every row has (or after
    ``max_iters`` iterations) the loop applies ``A`` to ``x`` once and measures ``b - A x``.  If a row
    misses ``tol`` there and iterations are left, CG restarts from that true residual (iterative
    refinement, once) and the true residual is measured again.

    ``MIXED``: the CG iterations' matvecs (and the logits of their weights) run at the low precisions
    ``PREC_CG`` / ``PREC_CGQ`` (bf16 / fp16 tensor-core dots, float32 accumulators; the direction is
    scaled to max-norm 1 first, so that fp16 neither overflows nor underflows), with reliable updates:
    once every active row's recurrence residual has dropped by ``INNER`` since the last update, the
    TRUE residual ``b - A x`` is measured at ``PREC`` and replaces the recurrence's (the search
    directions are kept, so CG does not restart), at most ``REFINE`` times.  The answer therefore has
    ``PREC``'s accuracy.  When an update finds that a missing row's true residual did not at least
    halve since the previous one (the problem is too ill-conditioned for the low precision), the
    remaining iterations run at ``PREC``: never a worse answer than the plain solve, only a slower one.

    Returns (x, true relative residual per row [BM], iterations, ``sum_j s_j (k_j - c) . x`` [BM]
    from the last (true-residual) matvec, see ``_cov_matvec``).

    Each row's right-hand side is scaled by a power of two to ``max |b| ~ 1`` first (and ``x`` back at
    the end): CG's dot products square magnitudes, and an adjoint right-hand side near float32's
    underflow (~1e-20, through nearly one-hot weights) would never move (the PyTorch path's
    ``solvers._unit_rhs``)."""
    bmax = tl.max(tl.abs(b), 1)
    sc = tl.where(bmax > 0, tl.exp2(tl.floor(tl.log2(tl.where(bmax > 0, bmax, 1.0)))), 1.0)
    b = b / sc[:, None]
    bb = tl.sum(b * b, 1)
    thresh = tol * tol * bb
    x = tl.zeros_like(b)
    r = b
    z = r * inv_diag
    p = z
    rz = tl.sum(r * z, 1)
    rr_true = bb  # MIXED: the squared true residual at the last update (x = 0: r = b exactly)
    active = tl.sum(r * r, 1) > thresh
    it = 0
    restarts = 0
    lowp = 1  # MIXED: the CG iterations still use the low precision
    since = 0  # MIXED: iterations since the last reliable update
    rr_rec = bb  # MIXED: the recurrence's squared residual at the last iteration
    cap = max_iters  # iterations allowed (MIXED: max_iters more after leaving the low precision)
    check = (tl.sum(active.to(tl.int32), 0) == 0).to(tl.int32)  # 1: the next matvec measures b - A x
    done = 0
    sx = tl.sum(tl.zeros_like(b), 1)
    while done == 0:
        if MIXED:
            if (check > 0) | (lowp == 0):
                av, sa = _cov_matvec(tl.where(check > 0, x, p), q, m, lam, mxs, iom, lo, hi, j_start, j_end, Kb, c,
                                     kstride, S, D, scale, BLOCK_N, BLOCK_D, PREC, PREC_QK, EMU)
            else:
                pn = tl.max(tl.abs(p), 1)
                av, sa = _cov_matvec(p * tl.where(pn > 0, 1.0 / tl.where(pn > 0, pn, 1.0), 0.0)[:, None], q, m, lam,
                                     mxs, iom, lo, hi,
                                     j_start, j_end, Kb, c, kstride, S, D, scale, BLOCK_N, BLOCK_D, PREC_CG, PREC_CGQ,
                                     EMU, True)
                av = av * pn[:, None]
        else:
            av, sa = _cov_matvec(tl.where(check > 0, x, p), q, m, lam, mxs, iom, lo, hi, j_start, j_end, Kb, c,
                                 kstride, S, D, scale, BLOCK_N, BLOCK_D, PREC, PREC_QK, EMU)
        if check > 0:
            r = b - av  # the true residual
            sx = sa
            rr = tl.sum(r * r, 1)
            missed = rr > thresh
            if MIXED:
                # the low precision stalls when a missing row's true residual is far above what its recurrence
                # says (the low-precision operator's error dominates) and did not halve since the last update:
                # leave it, with a fresh budget of max_iters plain iterations from here
                # (or when the low-precision iterations used up max_iters with rows still missing)
                if lowp > 0:
                    stalled = missed & (((rr > 16.0 * rr_rec) & (rr > 0.25 * rr_true)) | (it >= cap))
                    if tl.sum(stalled.to(tl.int32), 0) > 0:
                        lowp = 0
                        cap = it + max_iters
                        restarts = REFINE - 2  # from here on the plain solve (this restart, then one refinement)
                        worse = rr > bb  # rows the low precision left further off than x = 0: start over
                        x = tl.where(worse[:, None], 0.0, x)
                        r = tl.where(worse[:, None], b, r)
                        rr = tl.where(worse, bb, rr)
                rr_true = rr
                since = 0
            if (tl.sum(missed.to(tl.int32), 0) > 0) & (it < cap) & (restarts < REFINE):
                z = r * inv_diag
                if MIXED & (lowp > 0):  # reliable update: keep the directions of the rows that were iterating
                    p = tl.where(active[:, None], p, z)
                else:
                    p = z
                rz = tl.sum(r * z, 1)
                active = missed
                restarts += 1
                check = 0
            else:
                done = 1
        else:
            if MIXED:  # a row whose low-precision matvec overflowed (fp16) takes no step
                finite = tl.min((tl.abs(av) < float("inf")).to(tl.int32), 1) > 0
                av = tl.where(finite[:, None], av, 0.0)
            pap = tl.sum(p * av, 1)
            ok = active & (pap > 0)
            if MIXED:  # exact line search along p (the kept directions are not r-orthogonal after an update)
                ok = ok & finite
                alpha = tl.where(ok, tl.sum(r * p, 1) / tl.where(pap > 0, pap, 1.0), 0.0)
            else:
                alpha = tl.where(ok, rz / tl.where(pap > 0, pap, 1.0), 0.0)
            x += alpha[:, None] * p
            r_old = r
            r -= alpha[:, None] * av
            z = r * inv_diag
            rz_new = tl.sum(r * z, 1)
            if MIXED:  # flexible (Polak-Ribiere) beta: robust to the low-precision operator's inexactness
                beta = tl.where(ok & (rz > 0), tl.maximum(rz_new - tl.sum(r_old * z, 1), 0.0) / tl.where(rz > 0, rz, 1.0),
                                0.0)
            else:
                beta = tl.where(ok & (rz > 0), rz_new / tl.where(rz > 0, rz, 1.0), 0.0)
            p = z + beta[:, None] * p
            rz = rz_new
            rr = tl.sum(r * r, 1)
            active = active & (rr > thresh)
            it += 1
            if (tl.sum(active.to(tl.int32), 0) == 0) | (it >= cap):
                check = 1
            if MIXED:  # every iterating row gained INNER since the last update, or UPDATE_EVERY iterations
                # passed: measure the true residual (the stall test needs these)
                rr_rec = rr
                since += 1
                if tl.sum((active & ~finite).to(tl.int32), 0) > 0:  # overflow: leave the low precision
                    lowp = 0
                    cap = it + max_iters
                    restarts = REFINE - 2
                    check = 1
                if lowp > 0:
                    if (tl.sum((active & (rr > INNER * INNER * rr_true)).to(tl.int32), 0) == 0) | (since >= UPDATE_EVERY):
                        check = 1
    bnorm = tl.sqrt(bb)
    res = tl.sqrt(tl.sum(r * r, 1)) / tl.where(bnorm > 0, bnorm, 1.0)
    return x * sc[:, None], res, it, sx * sc


@triton.jit
def lla_fwd_kernel(
    Q, K, V, C, LAM, LO, HI,  # inputs
    O, X, M, STAT, LSE, RES, AMP, ITERS,  # outputs (AMP: [B, T, H, NAMP] per-row statistics)
    T, S, H, Hk, D, Dv, scale, tol, max_iters, n_tiles,
    PRECOND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr, PREC_QK: tl.constexpr,
    EMU: tl.constexpr, MIXED: tl.constexpr = False, PREC_CG: tl.constexpr = "ieee", PREC_CGQ: tl.constexpr = "ieee",
    REFINE: tl.constexpr = 1, INNER: tl.constexpr = 0.0,
):
    """One program = BLOCK_M query rows of one (batch, head); its tile is shift tile ``pid_m``.

    Pass 1 streams key tiles with an online max: omega (the mass), m (weighted key sum) and the
    weighted squared keys (Jacobi diagonal).  Then CG for x, then the output pass.  Writes o, x,
    ``m - c``, the row max and inverse mass of the logits (``STAT [B, T, H, 2]``; 0 and 0 for rows
    that see no key), the lse, the true relative residual, the iterations per program and, per row,
    what the conditioning estimate needs (``AMP [B, T, H, NAMP]``: ``|w|_1`` of the output weights
    ``w_j = s_j (1 - y_j . x)``, ``E_s|k - c|``, ``E_s|k|``, ``E_s|k - c|^2``, ``|m - c|``, ``|x|``,
    ``|q - c|``, ``E_s|v|``, ``|o|``; see ``function.amplification``).  Outputs are stored through
    ``_cast`` (bf16 rounded to nearest even under the interpreter too).
    """
    pid_m, pid_bh = _program_ids(T, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // Hk)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < T
    dmask = offs_d < D

    row = (b.to(tl.int64) * T + offs_m) * H + h  # [BM] index into [B, T, H]
    q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    lam = tl.load(LAM + row, mask=row_ok, other=1.0)
    c = _load_shift(C, b, hk, Hk, n_tiles, pid_m, offs_d, D)
    lo = tl.load(LO + offs_m, mask=row_ok, other=S)
    hi = tl.load(HI + offs_m, mask=row_ok, other=-1)
    nonempty = lo <= hi
    j_start = tl.min(tl.where(nonempty, lo, S), 0)
    j_end = tl.max(tl.where(nonempty, hi, -1), 0) + 1
    kstride = Hk * D
    Kb = K + b.to(tl.int64) * S * kstride + hk * D
    vstride = Hk * Dv
    Vb = V + b.to(tl.int64) * S * vstride + hk * Dv

    # pass 1: online softmax statistics (raw logits) and weighted moments of the shifted keys
    mx = tl.full([BLOCK_M], -_BIG, tl.float32)
    omega = tl.zeros([BLOCK_M], tl.float32)
    msum = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dsum = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_n
        kt = _load_keys(Kb, j, offs_d, S, D, kstride)
        logits = _dot(q, tl.trans(kt), PREC_QK, EMU) * scale
        vis = (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])
        logits = tl.where(vis, logits, -float("inf"))
        mx_new = tl.maximum(mx, tl.max(logits, 1))
        alpha = tl.exp(mx - mx_new)
        p = tl.exp(logits - mx_new[:, None])
        kc = kt - c[None, :]
        omega = omega * alpha + tl.sum(p, 1)
        msum = msum * alpha[:, None] + _dot(p, kc, PREC, EMU)
        dsum = dsum * alpha[:, None] + _dot(p, kc * kc, PREC, EMU)
        mx = mx_new
    seen = omega > 0
    inv_om = tl.where(seen, 1.0 / tl.where(seen, omega, 1.0), 0.0)
    m = msum * inv_om[:, None]  # [BM, BD]  weighted key mean, minus c
    ksq = dsum * inv_om[:, None]  # [BM, BD]  sum_j s_j (k_j - c)^2
    mxs = tl.where(seen, mx, 0.0)
    iom = inv_om
    mu = tl.where(seen[:, None], m - (q - c[None, :]), 0.0)  # [BM, BD]  m - q
    if PRECOND:
        diag = tl.maximum(ksq - m * m, 0.0) + lam[:, None]  # diag(A) >= lam in exact arithmetic
        inv_diag = tl.where(dmask[None, :], 1.0 / diag, 0.0)
    else:
        inv_diag = tl.where(dmask[None, :], 1.0, 0.0) + tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    x, res, it, sx = _solve(mu, inv_diag, q, m, lam, mxs, iom, lo, hi, j_start, j_end, Kb, c, kstride, S, D, scale,
                        tol, max_iters, BLOCK_N, BLOCK_D, PREC, PREC_QK, EMU, MIXED, PREC_CG, PREC_CGQ, REFINE,
                        INNER)

    # output pass: o = sum_j s_j (1 - (k_j - m) . x) v_j, with y_j . x centred by the weighted mean
    # of the products as computed (the solve's last matvec, same tiles): exactly 0 for a row whose
    # weight sits on one key, however large |x| |k - c| (m . x would leave their rounding)
    mx_dot = sx
    o = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    aw = tl.zeros([BLOCK_M], tl.float32)  # |w|_1, w_j = s_j (1 - y_j . x): the output weights
    ekc = tl.zeros([BLOCK_M], tl.float32)  # E_s |k - c|
    ek = tl.zeros([BLOCK_M], tl.float32)  # E_s |k|
    ev = tl.zeros([BLOCK_M], tl.float32)  # E_s |v|
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_n
        kt = _load_keys(Kb, j, offs_d, S, D, kstride)
        vt = tl.load(Vb + j[:, None].to(tl.int64) * vstride + offs_dv[None, :],
                     mask=(j[:, None] < S) & (offs_dv[None, :] < Dv), other=0.0).to(tl.float32)
        s = _weights(q, kt, mxs, iom, lo, hi, j, scale, PREC_QK, EMU)
        kc = kt - c[None, :]
        yx = _dot(x, tl.trans(kc), PREC, EMU) - mx_dot[:, None]  # [BM, BN]  y_j . x
        w = s * (1.0 - yx)
        o += _dot(w, vt, PREC, EMU)
        aw += tl.sum(tl.abs(w), 1)
        ekc += tl.sum(s * tl.sqrt(tl.sum(kc * kc, 1))[None, :], 1)
        ek += tl.sum(s * tl.sqrt(tl.sum(kt * kt, 1))[None, :], 1)
        ev += tl.sum(s * tl.sqrt(tl.sum(vt * vt, 1))[None, :], 1)

    rmask = row_ok[:, None] & dmask[None, :]
    tl.store(O + row[:, None] * Dv + offs_dv[None, :], _cast(o, O.dtype.element_ty, EMU),
             mask=row_ok[:, None] & (offs_dv[None, :] < Dv))
    tl.store(X + row[:, None] * D + offs_d[None, :], x, mask=rmask)
    tl.store(M + row[:, None] * D + offs_d[None, :], m, mask=rmask)
    tl.store(STAT + 2 * row, mxs, mask=row_ok)
    tl.store(STAT + 2 * row + 1, iom, mask=row_ok)
    lse = tl.where(seen, mx + tl.log(tl.where(seen, omega, 1.0)), -float("inf"))
    tl.store(LSE + row, lse, mask=row_ok)
    tl.store(RES + row, res, mask=row_ok)
    # per-row statistics of the conditioning estimate (``function.amplification``)
    qc = tl.where(dmask[None, :], q - c[None, :], 0.0)
    tl.store(AMP + NAMP * row, aw, mask=row_ok)
    tl.store(AMP + NAMP * row + 1, ekc, mask=row_ok)
    tl.store(AMP + NAMP * row + 2, ek, mask=row_ok)
    tl.store(AMP + NAMP * row + 3, tl.sum(ksq, 1), mask=row_ok)  # E_s |k - c|^2
    tl.store(AMP + NAMP * row + 4, tl.sqrt(tl.sum(m * m, 1)), mask=row_ok)  # |m - c|
    tl.store(AMP + NAMP * row + 5, tl.sqrt(tl.sum(x * x, 1)), mask=row_ok)
    tl.store(AMP + NAMP * row + 6, tl.sqrt(tl.sum(qc * qc, 1)), mask=row_ok)
    tl.store(AMP + NAMP * row + 7, ev, mask=row_ok)
    tl.store(AMP + NAMP * row + 8, tl.sqrt(tl.sum(o * o, 1)), mask=row_ok)
    tl.store(ITERS + tl.program_id(0), it)


@triton.jit
def lla_bwd_query_kernel(
    Q, K, V, C, LAM, LO, HI, X, M, STAT, DO,  # inputs
    DQ, U, GBAR, PIV, PIVS, DLAM, RES, LOGIT, ITERS,  # outputs
    T, S, H, Hk, D, Dv, scale, tol, max_iters, n_tiles,
    PRECOND: tl.constexpr, SHIFT_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr, PREC_QK: tl.constexpr,
    EMU: tl.constexpr, MIXED: tl.constexpr = False, PREC_CG: tl.constexpr = "ieee", PREC_CGQ: tl.constexpr = "ieee",
    REFINE: tl.constexpr = 1, INNER: tl.constexpr = 0.0,
):
    """Query side of the backward, per BLOCK_M rows of one (batch, head) (inside one forward tile
    of ``SHIFT_M`` rows, whose shift ``c`` it uses).

    With ``g_j = do . v_j``, ``gbar = sum_j s_j g_j``, ``y_j = k_j - m``:
    pass A: gbar and ``gx = -sum_j s_j g_j y_j`` (and the Jacobi diagonal); adjoint CG ``A u = gx``
    (true residual per row written to ``RES``);
    pass B: ``P_j = (1 - y_j.x) g_j - (y_j.u)(y_j.x) + y_j.gm`` with ``gm = gbar x + u`` (so
    ``y_j.gm = gbar y_j.x + y_j.u``), giving
    ``Ps = sum_j s_j P_j`` and ``dq = scale sum_j s_j P_j y_j - u``; ``dlam = -u . x``.
    Writes dq, dlam, the adjoint's true residual, per row the logits' scale ``|scale| |q| E_s|k|``
    when its weight is on more than one key (else 0; ``LOGIT [B, T, H]``, for the backward's
    logit-rounding check) and, for the key-tile kernel, u, gbar, the row's pivot key ``piv`` (its
    largest weight, ``PIV [B, T, H]``, -1 when it sees none) and ``PIVS [B, T, H, 8]``:
    ``gbar - g_piv = sum_{j != piv} s_j (g_j - g_piv)``, ``g_piv``, ``P_piv``,
    ``Ps - P_piv = sum_{j != piv} s_j (P_j - P_piv)``, and for ``p = x, u``: ``a_piv = (k_piv - c) . p``
    and ``(m - k_piv) . p = sum_{j != piv} s_j (a_j - a_piv)``, each formed from this kernel's products
    with the pivot's own term left out, so that they are exactly 0 for a row whose weight sits
    on one key; the key kernel takes its ``g_j - g_piv``, ``P_j - P_piv``, ``a_j - a_piv`` as exactly
    0 at the pivot, so ``gbar - g_j``, ``y_j . x``, ``y_j . u`` and ``dl_j = s_j (P_j - Ps)`` cancel
    there whatever the rounding of the recomputed products (they are multiplied by ``|x|``,
    ``|u|``, ``|do|`` and ``scale |q|``).
    """
    pid_m, pid_bh = _program_ids(T, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // Hk)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < T
    dmask = offs_d < D
    rmask = row_ok[:, None] & dmask[None, :]

    row = (b.to(tl.int64) * T + offs_m) * H + h
    q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=rmask, other=0.0).to(tl.float32)
    x = tl.load(X + row[:, None] * D + offs_d[None, :], mask=rmask, other=0.0)
    m = tl.load(M + row[:, None] * D + offs_d[None, :], mask=rmask, other=0.0)
    do = tl.load(DO + row[:, None] * Dv + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv[None, :] < Dv),
                 other=0.0).to(tl.float32)
    lam = tl.load(LAM + row, mask=row_ok, other=1.0)
    mxs = tl.load(STAT + 2 * row, mask=row_ok, other=0.0)
    iom = tl.load(STAT + 2 * row + 1, mask=row_ok, other=0.0)
    c = _load_shift(C, b, hk, Hk, n_tiles, (pid_m * BLOCK_M) // SHIFT_M, offs_d, D)
    lo = tl.load(LO + offs_m, mask=row_ok, other=S)
    hi = tl.load(HI + offs_m, mask=row_ok, other=-1)
    nonempty = lo <= hi
    j_start = tl.min(tl.where(nonempty, lo, S), 0)
    j_end = tl.max(tl.where(nonempty, hi, -1), 0) + 1
    kstride = Hk * D
    Kb = K + b.to(tl.int64) * S * kstride + hk * D
    vstride = Hk * Dv
    Vb = V + b.to(tl.int64) * S * vstride + hk * Dv

    # pass A
    gbar = tl.zeros([BLOCK_M], tl.float32)
    sgk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ksq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    best = tl.full([BLOCK_M], -1.0, tl.float32)
    piv = tl.full([BLOCK_M], -1, tl.int32)
    ek = tl.zeros([BLOCK_M], tl.float32)  # E_s |k| (raw keys)
    nz = tl.zeros([BLOCK_M], tl.int32)  # keys with a nonzero weight
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_n
        kt = _load_keys(Kb, j, offs_d, S, D, kstride)
        vt = tl.load(Vb + j[:, None].to(tl.int64) * vstride + offs_dv[None, :],
                     mask=(j[:, None] < S) & (offs_dv[None, :] < Dv), other=0.0).to(tl.float32)
        s = _weights(q, kt, mxs, iom, lo, hi, j, scale, PREC_QK, EMU)
        ek += tl.sum(s * tl.sqrt(tl.sum(kt * kt, 1))[None, :], 1)
        nz += tl.sum((s > 0).to(tl.int32), 1)
        s_top = tl.max(s, 1)
        better = s_top > tl.where(best > 0.0, best, 0.0)  # first tile holding the largest weight
        piv = tl.where(better, (j0 + tl.argmax(s, 1)).to(tl.int32), piv)
        best = tl.where(better, s_top, best)
        kc = kt - c[None, :]
        g = _dot(do, tl.trans(vt), PREC_QK, EMU)  # [BM, BN]
        sg = s * g
        gbar += tl.sum(sg, 1)
        sgk += _dot(sg, kc, PREC, EMU)
        if PRECOND:
            ksq += _dot(s, kc * kc, PREC, EMU)
    gx = gbar[:, None] * m - sgk  # -sum_j s_j g_j y_j
    if PRECOND:
        diag = tl.maximum(ksq - m * m, 0.0) + lam[:, None]  # diag(A) >= lam in exact arithmetic
        inv_diag = tl.where(dmask[None, :], 1.0 / diag, 0.0)
    else:
        inv_diag = tl.where(dmask[None, :], 1.0, 0.0) + tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    u, res, it, _su = _solve(gx, inv_diag, q, m, lam, mxs, iom, lo, hi, j_start, j_end, Kb, c, kstride, S, D, scale,
                        tol, max_iters, BLOCK_N, BLOCK_D, PREC, PREC_QK, EMU, MIXED, PREC_CG, PREC_CGQ, REFINE,
                        INNER)
    mx_dot = tl.sum(m * x, 1)
    mu_dot = tl.sum(m * u, 1)

    # pass B
    ps = tl.zeros([BLOCK_M], tl.float32)
    spk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    w_off = tl.zeros([BLOCK_M], tl.float32)  # sum_{j != piv} s_j
    sg_off = tl.zeros([BLOCK_M], tl.float32)  # sum_{j != piv} s_j g_j
    sp_off = tl.zeros([BLOCK_M], tl.float32)  # sum_{j != piv} s_j P_j
    g_piv = tl.zeros([BLOCK_M], tl.float32)
    p_piv = tl.zeros([BLOCK_M], tl.float32)
    ax_piv = tl.zeros([BLOCK_M], tl.float32)  # (k_piv - c) . x
    au_piv = tl.zeros([BLOCK_M], tl.float32)
    sax_off = tl.zeros([BLOCK_M], tl.float32)  # sum_{j != piv} s_j (k_j - c) . x
    sau_off = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_n
        kt = _load_keys(Kb, j, offs_d, S, D, kstride)
        vt = tl.load(Vb + j[:, None].to(tl.int64) * vstride + offs_dv[None, :],
                     mask=(j[:, None] < S) & (offs_dv[None, :] < Dv), other=0.0).to(tl.float32)
        s = _weights(q, kt, mxs, iom, lo, hi, j, scale, PREC_QK, EMU)
        kc = kt - c[None, :]
        g = _dot(do, tl.trans(vt), PREC_QK, EMU)
        ax = _dot(x, tl.trans(kc), PREC, EMU)
        au = _dot(u, tl.trans(kc), PREC, EMU)
        yx = ax - mx_dot[:, None]
        yu = au - mu_dot[:, None]
        # y.gm = gbar (y.x) + y.u  with gm = gbar x + u
        pj = (1.0 - yx) * g - yu * yx + gbar[:, None] * yx + yu
        sp = s * pj
        ps += tl.sum(sp, 1)
        spk += _dot(sp, kc, PREC, EMU)
        is_piv = j[None, :] == piv[:, None]
        s_off = tl.where(is_piv, 0.0, s)
        w_off += tl.sum(s_off, 1)
        sg_off += tl.sum(s_off * g, 1)
        sp_off += tl.sum(s_off * pj, 1)
        g_piv += tl.sum(tl.where(is_piv, g, 0.0), 1)
        p_piv += tl.sum(tl.where(is_piv, pj, 0.0), 1)
        ax_piv += tl.sum(tl.where(is_piv, ax, 0.0), 1)
        au_piv += tl.sum(tl.where(is_piv, au, 0.0), 1)
        sax_off += tl.sum(s_off * ax, 1)
        sau_off += tl.sum(s_off * au, 1)
    dq = scale * (spk - ps[:, None] * m) - u

    tl.store(DQ + row[:, None] * D + offs_d[None, :], _cast(dq, DQ.dtype.element_ty, EMU), mask=rmask)
    # the logits' scale |scale| |q| E_s|k| of rows whose weight is on more than one key: their rounding
    # reaches the gradients through nearly one-hot weights (a row exactly on one key is exact)
    qn = tl.sqrt(tl.sum(q * q, 1))
    tl.store(LOGIT + row, tl.where(nz > 1, tl.abs(scale) * qn * ek, 0.0), mask=row_ok)
    tl.store(U + row[:, None] * D + offs_d[None, :], u, mask=rmask)
    tl.store(GBAR + row, gbar, mask=row_ok)
    tl.store(PIV + row, piv, mask=row_ok)
    tl.store(PIVS + 8 * row, sg_off - g_piv * w_off, mask=row_ok)  # gbar - g_piv
    tl.store(PIVS + 8 * row + 1, g_piv, mask=row_ok)
    tl.store(PIVS + 8 * row + 2, p_piv, mask=row_ok)
    tl.store(PIVS + 8 * row + 3, sp_off - p_piv * w_off, mask=row_ok)  # Ps - P_piv
    tl.store(PIVS + 8 * row + 4, ax_piv, mask=row_ok)
    tl.store(PIVS + 8 * row + 5, sax_off - ax_piv * w_off, mask=row_ok)  # (m - k_piv) . x
    tl.store(PIVS + 8 * row + 6, au_piv, mask=row_ok)
    tl.store(PIVS + 8 * row + 7, sau_off - au_piv * w_off, mask=row_ok)  # (m - k_piv) . u
    tl.store(DLAM + row, -tl.sum(u * x, 1), mask=row_ok)
    tl.store(RES + row, res, mask=row_ok)
    tl.store(ITERS + tl.program_id(0), it)


@triton.jit
def lla_bwd_key_kernel(
    Q, K, V, C, LO, HI, QLO, QHI, X, M, STAT, DO, U, GBAR, PIV, PIVS,  # inputs
    DK, DV,  # outputs
    T, S, H, Hk, D, Dv, scale, n_tiles,
    SHIFT_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr, PREC_QK: tl.constexpr,
    EMU: tl.constexpr, MIXED: tl.constexpr = False, PREC_CG: tl.constexpr = "ieee", PREC_CGQ: tl.constexpr = "ieee",
    REFINE: tl.constexpr = 1, INNER: tl.constexpr = 0.0,
):
    """Key side of the backward, per BLOCK_N keys of one (batch, key head), over the query heads
    of its group and the query rows that see these keys (no atomics), in query tiles aligned to
    ``BLOCK_M`` (each inside one forward tile, whose shift ``c`` it applies to this key tile):

        dk_j = sum_i s_ij [(gbar_i - g_ij - y_ij.u_i) x_i + (1 - y_ij.x_i) u_i] + scale dl_ij q_i
        dv_j = sum_i s_ij (1 - y_ij.x_i) do_i,     dl_ij = s_ij (P_ij - Ps_i)

    taken relative to each row's pivot key (see ``lla_bwd_query_kernel``): ``gbar - g_j =
    (gbar - g_piv) - (g_j - g_piv)``, ``P_j - Ps = (P_j - P_piv) - (Ps - P_piv)`` and
    ``y_j . p = (k_j - k_piv) . p - (m - k_piv) . p`` (``p = x, u``) with the
    differences to the pivot exactly 0 at the pivot, and the pivot's weight from exponent 0 (as
    in the forward), so a saturated row contributes exactly what it should, not the rounding
    difference of products recomputed here times ``scale |q|``.
    """
    pid_n, pid_bh = _program_ids(S, BLOCK_N)
    b = pid_bh // Hk
    hk = pid_bh % Hk
    G = H // Hk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < S
    dmask = offs_d < D
    dvmask = offs_dv < Dv

    kstride = Hk * D
    Kb = K + b.to(tl.int64) * S * kstride + hk * D
    vstride = Hk * Dv
    Vb = V + b.to(tl.int64) * S * vstride + hk * Dv
    kt = _load_keys(Kb, offs_n, offs_d, S, D, kstride)  # [BN, BD] raw
    vt = tl.load(Vb + offs_n[:, None].to(tl.int64) * vstride + offs_dv[None, :],
                 mask=col_ok[:, None] & dvmask[None, :], other=0.0).to(tl.float32)
    qlo = tl.load(QLO + offs_n, mask=col_ok, other=T)
    qhi = tl.load(QHI + offs_n, mask=col_ok, other=-1)
    seen = qlo <= qhi
    i_start = (tl.min(tl.where(seen, qlo, T), 0) // BLOCK_M) * BLOCK_M  # aligned: one shift per tile
    i_end = tl.max(tl.where(seen, qhi, -1), 0) + 1

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g_idx in range(0, G):
        h = hk * G + g_idx
        for i0 in range(i_start, i_end, BLOCK_M):
            rows = i0 + offs_m
            row_ok = rows < T
            rmask = row_ok[:, None] & dmask[None, :]
            row = (b.to(tl.int64) * T + rows) * H + h
            q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=rmask, other=0.0).to(tl.float32)
            x = tl.load(X + row[:, None] * D + offs_d[None, :], mask=rmask, other=0.0)
            m = tl.load(M + row[:, None] * D + offs_d[None, :], mask=rmask, other=0.0)
            u = tl.load(U + row[:, None] * D + offs_d[None, :], mask=rmask, other=0.0)
            do = tl.load(DO + row[:, None] * Dv + offs_dv[None, :], mask=row_ok[:, None] & dvmask[None, :],
                         other=0.0).to(tl.float32)
            mxs = tl.load(STAT + 2 * row, mask=row_ok, other=0.0)
            iom = tl.load(STAT + 2 * row + 1, mask=row_ok, other=0.0)
            gbar = tl.load(GBAR + row, mask=row_ok, other=0.0)
            piv = tl.load(PIV + row, mask=row_ok, other=-1)
            dg_bar = tl.load(PIVS + 8 * row, mask=row_ok, other=0.0)  # gbar - g_piv
            g_piv = tl.load(PIVS + 8 * row + 1, mask=row_ok, other=0.0)
            p_piv = tl.load(PIVS + 8 * row + 2, mask=row_ok, other=0.0)
            dp_bar = tl.load(PIVS + 8 * row + 3, mask=row_ok, other=0.0)  # Ps - P_piv
            ax_piv = tl.load(PIVS + 8 * row + 4, mask=row_ok, other=0.0)
            dax_bar = tl.load(PIVS + 8 * row + 5, mask=row_ok, other=0.0)  # (m - k_piv) . x
            au_piv = tl.load(PIVS + 8 * row + 6, mask=row_ok, other=0.0)
            dau_bar = tl.load(PIVS + 8 * row + 7, mask=row_ok, other=0.0)
            lo = tl.load(LO + rows, mask=row_ok, other=S)
            hi = tl.load(HI + rows, mask=row_ok, other=-1)
            c = _load_shift(C, b, hk, Hk, n_tiles, i0 // SHIFT_M, offs_d, D)
            kc = kt - c[None, :]
            s = _weights_pivot(q, kt, mxs, iom, lo, hi, offs_n, piv, scale, PREC_QK, EMU)  # [BM, BN]
            is_piv = offs_n[None, :] == piv[:, None]
            g = _dot(do, tl.trans(vt), PREC_QK, EMU)
            # y_j . p = ((k_j - k_piv) . p, exactly 0 at the pivot) - (m - k_piv) . p
            yx = tl.where(is_piv, 0.0, _dot(x, tl.trans(kc), PREC, EMU) - ax_piv[:, None]) - dax_bar[:, None]
            yu = tl.where(is_piv, 0.0, _dot(u, tl.trans(kc), PREC, EMU) - au_piv[:, None]) - dau_bar[:, None]
            cc = 1.0 - yx
            pj = cc * g - yu * yx + gbar[:, None] * yx + yu  # y.gm = gbar y.x + y.u
            dl = s * (tl.where(is_piv, 0.0, pj - p_piv[:, None]) - dp_bar[:, None])  # s (P_j - Ps)
            gg = dg_bar[:, None] - tl.where(is_piv, 0.0, g - g_piv[:, None])  # gbar - g_j
            sc = s * cc
            dk += _dot(tl.trans(s * (gg - yu)), x, PREC, EMU)
            dk += _dot(tl.trans(sc), u, PREC, EMU)
            dk += scale * _dot(tl.trans(dl), q, PREC, EMU)
            dv += _dot(tl.trans(sc), do, PREC, EMU)

    kcol = (b.to(tl.int64) * S + offs_n) * Hk + hk
    tl.store(DK + kcol[:, None] * D + offs_d[None, :], _cast(dk, DK.dtype.element_ty, EMU),
             mask=col_ok[:, None] & dmask[None, :])
    tl.store(DV + kcol[:, None] * Dv + offs_dv[None, :], _cast(dv, DV.dtype.element_ty, EMU),
             mask=col_ok[:, None] & dvmask[None, :])
