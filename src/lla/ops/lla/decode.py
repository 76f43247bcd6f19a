"""KV-cache decoding and chunked prefill for LLA, mirroring flash-attn's ``flash_attn_with_kvcache``.

LLA has no fixed-size recurrent state (``Sigma_i`` depends on the query), so, like softmax
attention, it keeps every key and value and each new query does a pass over the cache.

* Chunks (``T_new > 1``, prefill on top of a cache) go through the public op, one sequence at a time
  (or one group of equal lengths), with the bottom-right causal alignment that makes chunked prefill
  equal to the full forward.
* A single new token (``T_new == 1``, decoding) uses a direct solve: one ``D x D`` matrix per query
  head, accumulated from the cache in key chunks (so extra memory is ``O(S)`` per head for the
  weights plus a bounded chunk), then one Cholesky solve.  The per-token work is three
  ``O(S * D)`` passes (logits, weighted mean, output) and one ``O(S * D^2)`` GEMM (the moment).
  Conjugate gradient would cost ``O(S * D)`` per iteration, with ``~D`` iterations at small ridges;
  measured on CPU the direct step is several times faster (see ``docs/inference.md``).

Per query row, with softmax weights ``s_j`` over the cache entries it sees (every statistic is
the row's own: entries it does not see never enter its arithmetic):

    m = sum_j s_j k_j,   A = sum_j s_j (k_j - m)(k_j - m)^T + lam I,   x = A^{-1} (m - q)
    o = sum_j s_j (1 - (k_j - m) . x) v_j

The single-token path reports like the op: the solve's true relative residual and the rounding
amplification go through ``lla.ops.diagnostics`` (``check_solve`` / ``check_conditioning``).
"""

from __future__ import annotations

import math

import torch

from .api import LLAAux, _check_tensor as _check, _check_window, _normalise_ridge, local_linear_attention
from ..diagnostics import check_conditioning, check_solve, default_tol

__all__ = ["local_linear_attention_with_kvcache"]

_OP = "local_linear_attention_with_kvcache"

#: Keys per chunk of the single-token passes (bounds the temporaries to ``chunk * H * D`` elements).
DECODE_CHUNK = 1024


def _decode_one(q, k_cache, v_cache, lens, lam, scale, left, chunk):
    """Single-query LLA by direct solve, with what it needs to report.

    q [B, 1, H, D], k_cache [B, S_max, Hk, D], v_cache [B, S_max, Hk, Dv], lens [B] int64, lam
    [B, 1, H].  The row of sequence ``b`` sees cache entries ``first[b] <= j < lens[b]``, with
    ``first[b] = max(lens[b] - 1 - left, 0)`` (``left < 0``: 0).  Returns ``o [B, 1, H, Dv]`` in
    q's dtype, ``lse [B, 1, H]`` float32 (``-inf`` for a row that sees nothing) and ``stats [2]``
    (compute dtype) = (worst true relative residual ``||A x - (m - q)|| / ||m - q||`` of the solve,
    worst amplification as in ``LLAAux``).
    """
    B, _, H, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    Q = q.to(cdt).reshape(B, Hk, G, D)  # query head h = hk * G + g
    L = lam.to(cdt).reshape(B, Hk, G)
    first = (lens - 1 - left).clamp_min(0) if left >= 0 else torch.zeros_like(lens)
    # one host read: the span of entries any row sees, and whether some row sees less of it
    S0, S1, first_max, lens_min = (
        torch.stack([first.min(), lens.max(), first.max(), lens.min()]).tolist() if B else (0, 0, 0, 0)
    )
    if S1 == 0:
        lse = torch.full((B, 1, H), float("-inf"), dtype=torch.float32, device=q.device)
        return q.new_zeros(B, 1, H, Dv), lse, Q.new_zeros(2)
    n = S1 - S0
    j = torch.arange(S0, S1, device=q.device)[None, :]
    visible = (j >= first[:, None]) & (j < lens[:, None])  # [B, n]
    partial = first_max > S0 or lens_min < S1
    has_key = (lens > 0)[:, None, None, None]  # a sequence with an empty cache outputs zeros
    bounds = [(j0, min(S1, j0 + chunk)) for j0 in range(S0, S1, chunk)]
    loaded = {}

    def kv(j0, j1):
        """Key and value chunk ``[B, Hk, c, D]``, ``[B, Hk, c, Dv]`` (strided views of the caches
        when no conversion or masking is needed).  Entries a row does not see may hold anything
        (an uninitialised cache, another row's keys): they are zeroed so that 0 * nan cannot leak."""
        if (j0, j1) in loaded:
            return loaded[(j0, j1)]
        K = k_cache[:, j0:j1].to(cdt).permute(0, 2, 1, 3)
        V = v_cache[:, j0:j1].to(cdt).permute(0, 2, 1, 3)
        if partial:
            hide = ~visible[:, None, j0 - S0 : j1 - S0, None]
            K, V = K.masked_fill(hide, 0.0), V.masked_fill(hide, 0.0)
        if len(bounds) == 1:  # one chunk: load it once for all passes
            loaded[(j0, j1)] = (K, V)
        return K, V

    # pass 1: logits of every visible entry -> softmax weights s [B, Hk, G, n]
    logits = torch.empty(B, Hk, G, n, dtype=cdt, device=q.device)
    for j0, j1 in bounds:
        logits[..., j0 - S0 : j1 - S0] = Q @ kv(j0, j1)[0].transpose(-1, -2)
    logits.mul_(scale)
    if partial:
        logits.masked_fill_(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hk, G]; -inf for a row that sees nothing
    logits.masked_fill_(~has_key, 0.0)
    s = torch.softmax(logits, dim=-1)  # [B, Hk, G, n]
    del logits
    # pass 2: weighted key mean m [B, Hk, G, D]
    m = Q.new_zeros(B, Hk, G, D)
    for j0, j1 in bounds:
        m += s[..., j0 - S0 : j1 - S0] @ kv(j0, j1)[0]
    # pass 3: the moment centred on the row's own mean, A [B, Hk, G, D, D], one GEMM per chunk.
    # m is only known to eps * |m|, which matters when the ridge is tiny next to |m|^2 (one
    # dominant key, huge keys): the weighted mean dm of y_j = k_j - m (~ the rounding of m) is
    # accumulated too and taken out exactly: sum_j s_j (y_j - dm)(y_j - dm)^T = sum_j s_j y_j y_j^T - dm dm^T
    A = Q.new_zeros(B, Hk, G, D, D)
    dm = Q.new_zeros(B, Hk, G, D)
    for j0, j1 in bounds:
        y = kv(j0, j1)[0].unsqueeze(2) - m.unsqueeze(-2)  # [B, Hk, G, c, D]   y_j = k_j - m
        sy = y * s[..., j0 - S0 : j1 - S0, None]
        A += sy.transpose(-1, -2) @ y
        dm += sy.sum(-2)
    A -= dm.unsqueeze(-1) * dm.unsqueeze(-2)
    spread = A.diagonal(dim1=-2, dim2=-1).sum(-1)  # sum_j s_j |k_j - m|^2
    A.diagonal(dim1=-2, dim2=-1).add_(L[..., None])
    mu = (m - Q) + dm  # [B, Hk, G, D]
    x = _solve_spd(A, mu)
    # the solve's true relative residual, per row (against A as formed, before any shift)
    r = (A @ x.unsqueeze(-1)).squeeze(-1) - mu
    mu_norm = torch.linalg.vector_norm(mu, dim=-1)
    r_norm = torch.linalg.vector_norm(r, dim=-1)
    residual = torch.where(mu_norm > 0, r_norm / mu_norm.clamp_min(torch.finfo(cdt).tiny), r_norm)
    # pass 4: output  o = sum_j s_j (1 - (k_j - m) . x) v_j, with k_j - m formed before the dot
    # product (k_j . x - m . x cancels catastrophically when |x| is large: huge keys, small ridge)
    o = Q.new_zeros(B, Hk, G, Dv)
    weight_l1 = Q.new_zeros(B, Hk, G)  # sum_j s_j |(k_j - m) . x|
    dmx = (dm * x).sum(-1, keepdim=True)
    for j0, j1 in bounds:
        K, V = kv(j0, j1)
        y = K.unsqueeze(2) - m.unsqueeze(-2)  # [B, Hk, G, c, D]
        syx = ((y @ x.unsqueeze(-1)).squeeze(-1) - dmx) * s[..., j0 - S0 : j1 - S0]  # [B, Hk, G, c]
        weight_l1 += syx.abs().sum(-1)
        o += (s[..., j0 - S0 : j1 - S0] - syx) @ V
    o = o.masked_fill(~has_key, 0.0)
    amplification = weight_l1 + spread / L
    live = has_key[..., 0].expand(B, Hk, G)
    stats = torch.stack([
        torch.where(live, residual, 0.0).amax(), torch.where(live, amplification, 0.0).amax()
    ])
    return o.reshape(B, 1, H, Dv).to(q.dtype), lse.reshape(B, 1, H).float(), stats


def _solve_spd(A, b):
    """``A^{-1} b`` by Cholesky for a batch of symmetric positive definite ``A [..., D, D]``.

    ``A`` here is a weighted key covariance plus the ridge, formed by a GEMM; when the ridge is
    below the rounding of that GEMM (about ``eps * trace(A)``) a row may not factor.  Such rows
    get a diagonal shift, ``eps * trace(A)`` times 1, 10, 100, ... until they do: a slightly larger
    ridge, whose effect the caller's true residual (measured against the unshifted ``A``) reports.
    """
    chol, info = torch.linalg.cholesky_ex(A)
    failed = info != 0
    if bool(failed.any()):
        shift = torch.finfo(A.dtype).eps * A.diagonal(dim1=-2, dim2=-1).sum(-1) * failed
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        for _ in range(8):
            chol, info = torch.linalg.cholesky_ex(A + shift[..., None, None] * eye)
            if not bool((info != 0).any()):
                break
            shift = shift * 10.0
    return torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)


def check_cache_seqlens(cache_seqlens, B: int, t_add: int, S_max: int, device) -> torch.Tensor:
    """``cache_seqlens`` (an int, or an int32/int64 tensor ``[B]``) -> int64 ``[B]`` on ``device``, each
    in ``[0, S_max - t_add]`` (``t_add`` new entries are about to be written).  Shared by the decode ops."""
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int64, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cache_seqlens must be an int32/int64 tensor [B] (or an int)")
    if cache_seqlens.dim() != 1 or cache_seqlens.numel() != B:
        raise ValueError(f"cache_seqlens must have shape [B] = [{B}], got {tuple(cache_seqlens.shape)}")
    seqlens = cache_seqlens.to(device=device, dtype=torch.int64)
    if B and (int(seqlens.min()) < 0 or int(seqlens.max()) + t_add > S_max):
        raise ValueError(
            f"cache_seqlens must lie in [0, S_max - T_new] = [0, {S_max - t_add}], got {seqlens.tolist()}"
        )
    return seqlens


def append_to_cache(k_cache, v_cache, k, v, seqlens) -> None:
    """Write ``k, v [B, T_new, Hk, *]`` in place at rows ``seqlens[b] + t`` of each sequence (detached)."""
    B, T = k.shape[:2]
    rows = seqlens[:, None] + torch.arange(T, device=seqlens.device)[None, :]  # [B, T]
    bidx = torch.arange(B, device=seqlens.device)[:, None].expand(B, T)
    with torch.no_grad():
        k_cache[bidx, rows] = k.detach().to(k_cache.dtype)
        v_cache[bidx, rows] = v.detach().to(v_cache.dtype)


def local_linear_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens,
    ridge=1.0,
    scale: float | None = None,
    solver: str = "auto",
    max_iters: int | None = None,
    tol: float | None = None,
    backend: str = "auto",
    window_size: tuple[int, int] = (-1, -1),
    return_aux: bool = False,
):
    """LLA against a KV cache, with the new keys/values appended in place (flash-attn semantics).

    Args:
        q: ``[B, T_new, H, D]`` new queries (``T_new == 1`` for a decoding step).
        k_cache: ``[B, S_max, Hk, D]`` key cache; ``H % Hk == 0`` (grouped-query).
        v_cache: ``[B, S_max, Hk, Dv]`` value cache.
        k, v: ``[B, T_new, Hk, D]`` / ``[B, T_new, Hk, Dv]`` new keys and values, or both None.  When
            given they are written **in place** into the caches at rows
            ``cache_seqlens[b] ... cache_seqlens[b] + T_new - 1`` of each sequence ``b``.
        cache_seqlens: int tensor ``[B]`` (or an int): entries already in each sequence's cache; may
            differ across the batch.  Not advanced here: the caller adds ``T_new`` afterwards, as
            with flash-attn.
        ridge: float or tensor broadcastable to ``[B, T_new, H]``, > 0.
        scale: logit scale, default ``1 / sqrt(D)``.
        solver: ``"auto"`` (direct ``D x D`` solve for one new token, the public op's rule for
            chunks), ``"direct"``, or ``"cg"`` (always through the public op).
        max_iters, backend: passed to the public op for chunks / ``solver="cg"``.
        tol: the public op's CG tolerance; for the direct single-token solve, the true relative
            residual above which (times ``RESIDUAL_FACTOR``) it warns.  Default per dtype
            (``lla.ops.diagnostics.default_tol``).
        window_size: ``(left, right)``, flash-attn semantics (``right`` is moot: causal): new query
            ``t`` of sequence ``b`` also only sees entries ``j >= L_b - T_new + t - left``; ``-1``
            unbounded.  The single-token path then reads only the last ``left + 1`` entries.
        return_aux: also return an ``lla.LLAAux``.

    Sequence ``b`` sees its first ``L_b = cache_seqlens[b] + T_new`` cache entries (``T_new`` only
    counted when ``k`` is given); its queries attend causally, bottom-right aligned: new query ``t``
    sees entries ``j <= L_b - T_new + t``.  Entries a query does not see (past ``L_b``, before its
    window, another sequence's) never enter its arithmetic.

    Diagnostics are the op's: a solve whose true relative residual misses ``RESIDUAL_FACTOR * tol``,
    or a system too ill-conditioned for the dtype, warns (``LLAConvergenceWarning``, named
    ``local_linear_attention_with_kvcache`` for the single-token path).

    Returns:
        ``o [B, T_new, H, Dv]`` in q's dtype, or ``(o, LLAAux)`` with ``return_aux=True`` (single
        token: ``iters = 0``, ``solver = "direct"``, ``residual`` / ``amplification`` the worst over
        rows; chunks: the worst over the public op's calls).  A sequence that sees no entry outputs
        zeros (``lse = -inf``).
    """
    _check("q", q, 4)
    _check("k_cache", k_cache, 4)
    _check("v_cache", v_cache, 4)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or both None)")
    B, T, H, D = q.shape
    Bc, S_max, Hk, Dk = k_cache.shape
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if Bc != B or v_cache.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k_cache {Bc}, v_cache {v_cache.shape[0]}")
    if v_cache.shape[1] != S_max or v_cache.shape[2] != Hk:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree in [B, S_max, Hk]")
    if Dk != D:
        raise ValueError(f"q and k_cache must have the same head dim D, got {D} and {Dk}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the key/value heads ({Hk})")
    Dv = v_cache.shape[3]
    if k is not None:
        _check("k", k, 4)
        _check("v", v, 4)
        if tuple(k.shape) != (B, T, Hk, D):
            raise ValueError(f"k must have shape [B, T_new, Hk, D] = {[B, T, Hk, D]}, got {tuple(k.shape)}")
        if tuple(v.shape) != (B, T, Hk, Dv):
            raise ValueError(f"v must have shape [B, T_new, Hk, Dv] = {[B, T, Hk, Dv]}, got {tuple(v.shape)}")
    t_add = T if k is not None else 0
    seqlens = check_cache_seqlens(cache_seqlens, B, t_add, S_max, q.device)
    left = _check_window(window_size, True)[0]
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    if not isinstance(return_aux, bool):
        raise TypeError(f"return_aux must be a bool, got {type(return_aux).__name__}")
    if solver not in ("auto", "direct", "cg"):
        raise ValueError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")
    if scale is None:
        scale = D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if isinstance(ridge, torch.Tensor):
        ridge = ridge.to(q.device)  # the cache op accepts a ridge on another device
    lam = _normalise_ridge(ridge, B, T, H, q)

    if k is not None:
        append_to_cache(k_cache, v_cache, k, v, seqlens)
    lens = seqlens + t_add  # [B] visible entries

    if T == 1 and solver in ("auto", "direct"):
        o, lse, stats = _decode_one(q, k_cache, v_cache, lens, lam, float(scale), left, DECODE_CHUNK)
        residual, amplification = (float("nan"), float("nan"))
        if not torch.compiler.is_compiling():
            residual, amplification = stats.tolist()
            if tol is None:
                tol = default_tol(q.dtype)
            lam_min = float(lam.detach().min()) if lam.numel() else float("nan")
            check_solve(stage="forward", solver="direct", residual=residual, tol=float(tol), lam_min=lam_min, op=_OP)
            check_conditioning(amplification, q.dtype, op=_OP)
        if return_aux:
            return o, LLAAux(iters=0, residual=residual, lse=lse, solver="direct", amplification=amplification)
        return o

    # chunks: the public op per group of sequences with equal length (bottom-right causal)
    out = q.new_zeros(B, T, H, Dv)
    lse = torch.full((B, T, H), float("-inf"), dtype=torch.float32, device=q.device)
    auxes = []
    lens_list = lens.tolist()
    for n in sorted(set(lens_list)):
        idx = [b for b, x in enumerate(lens_list) if x == n]
        if n == 0:
            continue
        # the whole batch: views of the caches; a subset: gathered copies of its first n entries
        sel = slice(None) if len(idx) == B else torch.tensor(idx, device=q.device)
        o, aux = local_linear_attention(
            q[sel],
            k_cache[sel, :n],
            v_cache[sel, :n],
            ridge=lam[sel],
            scale=float(scale),
            causal=True,
            window_size=(left, -1),
            solver=solver,
            max_iters=max_iters,
            tol=tol,
            backend=backend,
            return_aux=True,
        )
        out[sel] = o
        lse[sel] = aux.lse
        auxes.append(aux)
    if not return_aux:
        return out
    if not auxes:
        return out, LLAAux(iters=0, residual=0.0, lse=lse, solver=solver, amplification=0.0)
    return out, LLAAux(
        iters=max(a.iters for a in auxes),
        residual=max(a.residual for a in auxes),
        lse=lse,
        solver="/".join(sorted({a.solver for a in auxes})),
        amplification=max(a.amplification for a in auxes),
    )
