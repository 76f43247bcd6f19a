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

Per query row, with softmax weights ``s_j`` over its visible cache entries (as in
``torch_backend/function.py``):

    m = sum_j s_j k_j,   A = sum_j s_j (k_j - m)(k_j - m)^T + lam I,   x = A^{-1} (m - q)
    o = sum_j s_j (1 - (k_j - m) . x) v_j
"""

from __future__ import annotations

import math

import torch

from .api import _check_tensor as _check, _normalise_ridge, local_linear_attention

__all__ = ["local_linear_attention_with_kvcache"]

#: Keys per chunk of the single-token passes (bounds the temporaries to ``chunk * H * D`` elements).
DECODE_CHUNK = 1024


def _decode_one(q, k_cache, v_cache, lens, lam, scale, chunk):
    """Single-query LLA by direct solve.

    q [B, 1, H, D], k_cache [B, S_max, Hk, D], v_cache [B, S_max, Hk, Dv], lens [B] int64 (visible
    entries per sequence), lam [B, 1, H].  Returns o [B, 1, H, Dv] in q's dtype.
    """
    B, _, H, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = int(lens.max()) if B else 0
    Q = q.to(cdt).reshape(B, Hk, G, D)  # query head h = hk * G + g
    L = lam.to(cdt).reshape(B, Hk, G)
    if S == 0:
        return q.new_zeros(B, 1, H, Dv)

    visible = torch.arange(S, device=q.device)[None, :] < lens[:, None]  # [B, S]
    ragged_from = int(lens.min())  # keys at or past this index are invisible to some sequence
    has_key = (lens > 0)[:, None, None, None]  # a sequence with an empty cache outputs zeros
    bounds = [(j0, min(S, j0 + chunk)) for j0 in range(0, S, chunk)]
    loaded = {}

    def kv(j0, j1):
        """Key and value chunk ``[B, Hk, c, D]``, ``[B, Hk, c, Dv]`` (strided views of the caches
        when no conversion or masking is needed).  Entries past a sequence's length may hold
        anything (an uninitialised cache): they are zeroed so that 0 * nan cannot leak."""
        if (j0, j1) in loaded:
            return loaded[(j0, j1)]
        K = k_cache[:, j0:j1].to(cdt).permute(0, 2, 1, 3)
        V = v_cache[:, j0:j1].to(cdt).permute(0, 2, 1, 3)
        if j1 > ragged_from:
            hide = ~visible[:, None, j0:j1, None]
            K, V = K.masked_fill(hide, 0.0), V.masked_fill(hide, 0.0)
        if len(bounds) == 1:  # one chunk: load it once for all passes
            loaded[(j0, j1)] = (K, V)
        return K, V

    # pass 1: logits of every visible entry -> softmax weights s [B, Hk, G, S]
    logits = torch.empty(B, Hk, G, S, dtype=cdt, device=q.device)
    for j0, j1 in bounds:
        logits[..., j0:j1] = Q @ kv(j0, j1)[0].transpose(-1, -2)
    logits.mul_(scale)
    if ragged_from < S:
        logits.masked_fill_(~visible[:, None, None, :], float("-inf"))
    if not bool(has_key.all()):
        logits.masked_fill_(~has_key, 0.0)
    s = torch.softmax(logits, dim=-1)  # [B, Hk, G, S]
    del logits
    # pass 2: weighted key mean m [B, Hk, G, D]
    m = Q.new_zeros(B, Hk, G, D)
    for j0, j1 in bounds:
        m += s[..., j0:j1] @ kv(j0, j1)[0]
    # pass 3: centred weighted covariance A [B, Hk, G, D, D], one GEMM per chunk
    A = Q.new_zeros(B, Hk, G, D, D)
    for j0, j1 in bounds:
        y = kv(j0, j1)[0].unsqueeze(2) - m.unsqueeze(-2)  # [B, Hk, G, c, D]   y_j = k_j - m
        A += (y * s[..., j0:j1, None]).transpose(-1, -2) @ y
    A.diagonal(dim1=-2, dim2=-1).add_(L[..., None])
    mu = m - Q  # [B, Hk, G, D]
    chol, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):  # a numerically singular system in this dtype: redo it in float64
        x = torch.linalg.solve(A.double(), mu.double().unsqueeze(-1)).squeeze(-1).to(cdt)
    else:
        x = torch.cholesky_solve(mu.unsqueeze(-1), chol).squeeze(-1)  # [B, Hk, G, D]
    # pass 4: output  o = sum_j s_j (1 - (k_j - m) . x) v_j
    mx = (m * x).sum(-1, keepdim=True)  # [B, Hk, G, 1]
    o = Q.new_zeros(B, Hk, G, Dv)
    for j0, j1 in bounds:
        K, V = kv(j0, j1)
        yx = x @ K.transpose(-1, -2) - mx  # [B, Hk, G, c]
        o += (s[..., j0:j1] * (1.0 - yx)) @ V
    o = o.masked_fill(~has_key, 0.0)
    return o.reshape(B, 1, H, Dv).to(q.dtype)


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
        max_iters, tol, backend: passed to the public op for chunks / ``solver="cg"``.

    Sequence ``b`` sees its first ``L_b = cache_seqlens[b] + T_new`` cache entries (``T_new`` only
    counted when ``k`` is given); its queries attend causally, bottom-right aligned: new query ``t``
    sees entries ``j <= L_b - T_new + t``.

    Returns:
        ``o [B, T_new, H, Dv]`` in q's dtype.  A sequence that sees no entry outputs zeros.
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
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int64, device=q.device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cache_seqlens must be an int32/int64 tensor [B] (or an int)")
    if cache_seqlens.dim() != 1 or cache_seqlens.numel() != B:
        raise ValueError(f"cache_seqlens must have shape [B] = [{B}], got {tuple(cache_seqlens.shape)}")
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int64)
    t_add = T if k is not None else 0
    if B and (int(seqlens.min()) < 0 or int(seqlens.max()) + t_add > S_max):
        raise ValueError(
            f"cache_seqlens must lie in [0, S_max - T_new] = [0, {S_max - t_add}], got {seqlens.tolist()}"
        )
    if solver not in ("auto", "direct", "cg"):
        raise ValueError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")
    if scale is None:
        scale = D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if isinstance(ridge, torch.Tensor):
        ridge = ridge.to(q.device)  # the cache op accepts a ridge on another device
    lam = _normalise_ridge(ridge, B, T, H, q)

    if k is not None:  # append in place: row seqlens[b] + t of sequence b
        rows = seqlens[:, None] + torch.arange(T, device=q.device)[None, :]  # [B, T]
        bidx = torch.arange(B, device=q.device)[:, None].expand(B, T)
        with torch.no_grad():
            k_cache[bidx, rows] = k.detach().to(k_cache.dtype)
            v_cache[bidx, rows] = v.detach().to(v_cache.dtype)
    lens = seqlens + t_add  # [B] visible entries

    if T == 1 and solver in ("auto", "direct"):
        return _decode_one(q, k_cache, v_cache, lens, lam, float(scale), DECODE_CHUNK)

    # chunks: the public op per group of sequences with equal length (bottom-right causal)
    out = q.new_zeros(B, T, H, Dv)
    lens_list = lens.tolist()
    for n in sorted(set(lens_list)):
        idx = [b for b, x in enumerate(lens_list) if x == n]
        if n == 0:
            continue
        # the whole batch: views of the caches; a subset: gathered copies of its first n entries
        sel = slice(None) if len(idx) == B else torch.tensor(idx, device=q.device)
        o = local_linear_attention(
            q[sel],
            k_cache[sel, :n],
            v_cache[sel, :n],
            ridge=lam[sel],
            scale=float(scale),
            causal=True,
            solver=solver,
            max_iters=max_iters,
            tol=tol,
            backend=backend,
        )
        out[sel] = o
    return out
