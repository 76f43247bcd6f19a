"""The core op (PyTorch backend) against the float64 reference: forward, gradients, limits, varlen."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import make_qkv, rel_err

import lla
from lla.ops.lla.reference import local_linear_attention_ref, softmax_attention_ref

SOLVERS = ["cg", "direct"]


def _lla(q, k, v, **kw):
    kw.setdefault("backend", "torch")
    return lla.local_linear_attention(q, k, v, **kw)


# ---------------------------------------------------------------- forward vs reference
SHAPES = [
    # B, T, S, H, Hk, D, Dv
    (2, 1, 1, 2, 2, 16, 16),
    (1, 63, 63, 4, 2, 16, 16),
    (1, 100, 100, 2, 1, 48, 48),
    (1, 63, 63, 2, 2, 80, 80),
    (2, 100, 37, 4, 1, 16, 24),  # S < T
    (1, 37, 100, 2, 2, 48, 8),  # S > T (cached prefix / cross)
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}S{}H{}Hk{}D{}Dv{}".format(*s))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("solver", SOLVERS)
def test_forward_matches_reference(shape, causal, solver):
    B, T, S, H, Hk, D, Dv = shape
    q, k, v = make_qkv(B, T, H, D, S=S, Hk=Hk, Dv=Dv, seed=T + D)
    ref = local_linear_attention_ref(q, k, v, ridge=1.0, causal=causal)
    o64 = _lla(q, k, v, ridge=1.0, causal=causal, solver=solver)
    assert o64.dtype == torch.float64 and o64.shape == (B, T, H, Dv)
    assert rel_err(o64, ref) < 1e-9
    o32 = _lla(q.float(), k.float(), v.float(), ridge=1.0, causal=causal, solver=solver)
    assert o32.dtype == torch.float32
    assert rel_err(o32, ref) < 1e-4


@pytest.mark.parametrize("window", [(8, -1), (5, 7), (0, 0), (20, 3)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("solver", SOLVERS)
def test_sliding_window_matches_reference(window, causal, solver):
    q, k, v = make_qkv(1, 63, 2, 16, S=70, Hk=1, seed=3)
    ref = local_linear_attention_ref(q, k, v, ridge=2.0, causal=causal, window_size=window)
    assert rel_err(_lla(q, k, v, ridge=2.0, causal=causal, window_size=window, solver=solver), ref) < 1e-9


@pytest.mark.parametrize("solver", SOLVERS)
def test_small_ridge_matches_reference(solver):
    """At ridge 0.1 the reference's own ``delta = 1 - mu.rho`` loses ~8 digits to cancellation, so we
    also compare with the centred closed form (same math, well conditioned) at 1e-9."""
    q, k, v = make_qkv(1, 63, 2, 16, seed=5)
    lam = 0.1
    o = _lla(q, k, v, ridge=lam, solver=solver, max_iters=200)
    assert rel_err(o, local_linear_attention_ref(q, k, v, ridge=lam)) < 1e-7
    # centred closed form, computed densely here
    s = torch.softmax((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / 4.0 + torch.full((63, 63), float("-inf")).triu(1), -1)
    K = k.transpose(1, 2)[:, :, None]  # [B, H, 1, S, D]
    m = (s[..., None] * K).sum(-2)
    Y = K - m[..., None, :]
    A = torch.einsum("bhts,bhtsd,bhtse->bhtde", s, Y, Y) + lam * torch.eye(16, dtype=q.dtype)
    x = torch.linalg.solve(A, (m - q.transpose(1, 2))[..., None])[..., 0]
    w = s * (1 - torch.einsum("bhtsd,bhtd->bhts", Y, x))
    assert rel_err(o, (w @ v.transpose(1, 2)).transpose(1, 2)) < 1e-9


# ---------------------------------------------------------------- limits
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("causal", [True, False])
def test_huge_ridge_is_softmax_attention(solver, causal):
    q, k, v = make_qkv(2, 50, 4, 16, Hk=2, seed=7)
    o = _lla(q, k, v, ridge=1e9, causal=causal, solver=solver)
    sdpa = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1), is_causal=causal
    ).transpose(1, 2)
    assert rel_err(o, sdpa) < 1e-7
    # and LLA differs from softmax at a moderate ridge: the test above can fail
    assert rel_err(_lla(q, k, v, ridge=0.5, causal=causal, solver=solver), sdpa) > 1e-2


def test_flat_weights_tiny_ridge_is_least_squares():
    """scale = 0, ridge -> 0: ordinary least squares with intercept over the visible pairs, at q_i."""
    B, T, H, D = 1, 40, 2, 4
    q, k, v = make_qkv(B, T, H, D, seed=11)
    o = _lla(q, k, v, ridge=1e-10, scale=0.0, causal=True, solver="direct")
    for i in range(D + 2, T):  # enough points for a unique fit
        for h in range(H):
            X = torch.cat([torch.ones(i + 1, 1, dtype=q.dtype), k[0, : i + 1, h]], 1)
            beta = torch.linalg.lstsq(X, v[0, : i + 1, h]).solution
            pred = torch.cat([torch.ones(1, dtype=q.dtype), q[0, i, h]]) @ beta
            assert rel_err(o[0, i, h], pred) < 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_first_causal_position_returns_v0(solver):
    q, k, v = make_qkv(2, 9, 2, 16, seed=2)
    assert torch.allclose(_lla(q, k, v, ridge=0.3, solver=solver)[:, 0], v[:, 0], atol=1e-13, rtol=1e-12)
    o = _lla(q.float(), k.float(), v.float(), ridge=0.3, solver=solver)
    assert rel_err(o[:, 0], v[:, 0]) < 1e-5


def test_rows_without_visible_keys_output_zero():
    q, k, v = make_qkv(1, 10, 2, 16, S=4, seed=1)  # bottom-right: the first 6 rows see nothing
    o = _lla(q, k, v, ridge=1.0)
    assert torch.count_nonzero(o[:, :6]) == 0
    assert rel_err(o, local_linear_attention_ref(q, k, v, ridge=1.0)) < 1e-9


# ---------------------------------------------------------------- gradients
def _gradcheck(q, k, v, ridge, **kw):
    f = lambda q, k, v, lam: _lla(q, k, v, ridge=lam, **kw)  # noqa: E731
    return torch.autograd.gradcheck(f, (q, k, v, ridge), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "case",
    ["causal-gqa-perhead", "cross-noncausal-perpos", "causal-S<T-scalar", "window"],
)
def test_gradcheck(solver, case):
    if case == "causal-gqa-perhead":
        q, k, v = make_qkv(1, 6, 4, 3, Hk=2, Dv=2, seed=1, requires_grad=True)
        lam = torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=torch.float64, requires_grad=True)
        kw = dict(causal=True)
    elif case == "cross-noncausal-perpos":
        q, k, v = make_qkv(2, 4, 2, 3, S=7, Dv=4, seed=2, requires_grad=True)
        lam = (torch.rand(2, 4, 2, dtype=torch.float64) + 0.2).requires_grad_()
        kw = dict(causal=False)
    elif case == "causal-S<T-scalar":
        q, k, v = make_qkv(1, 7, 2, 2, S=4, seed=3, requires_grad=True)
        lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        kw = dict(causal=True)
    else:
        q, k, v = make_qkv(1, 8, 2, 3, seed=4, requires_grad=True)
        lam = torch.tensor([0.4, 1.5], dtype=torch.float64, requires_grad=True)
        kw = dict(causal=False, window_size=(2, 1))
    assert _gradcheck(q, k, v, lam, solver=solver, **kw)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("T,D", [(1, 16), (63, 48), (100, 80)])
def test_gradients_match_reference_awkward_shapes(solver, T, D):
    q, k, v = make_qkv(1, T, 2, D, Hk=1, Dv=D // 2, seed=T, requires_grad=True)
    lam = torch.tensor([0.8, 2.0], dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, T, 2, D // 2, dtype=torch.float64)
    grads = []
    for fn in (lambda *a, **kw: _lla(*a, solver=solver, **kw), local_linear_attention_ref):
        out = fn(q, k, v, ridge=lam, causal=True)
        grads.append(torch.autograd.grad((out * g).sum(), (q, k, v, lam)))
    for name, a, b in zip("q k v ridge".split(), *grads):
        assert rel_err(a, b, atol=1e-6) < 1e-8, name  # at T = 1 dq is exactly 0
    # fp32 gradients
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    lam32 = lam.detach().float().requires_grad_()
    out = _lla(q32, k32, v32, ridge=lam32, solver=solver)
    g32 = torch.autograd.grad((out * g.float()).sum(), (q32, k32, v32, lam32))
    for name, a, b in zip("q k v ridge".split(), g32, grads[1]):
        assert rel_err(a, b, atol=1e-2) < 1e-4, name


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "case,T,window,causal,D",
    [("partial", 20, (-1, -1), True, 16), ("partial", 20, (-1, -1), False, 16), ("tiles", 64, (3, 0), False, 4),
     ("all", 33, (-1, -1), True, 16), ("steps", 64, (-1, -1), True, 8)],
)
def test_batched_pairs_match_reference(monkeypatch, solver, case, T, window, causal, D):
    """(batch, key head) pairs are folded and processed ``nb`` at a time: a last, partial chunk
    (8 pairs in chunks of 3), several row tiles per chunk, one chunk holding everything, and (CG) long
    sequences where one pair fills a tile and each tile takes as many pairs as ``STEP_ELEMS`` allows
    (more for the short causal tiles than for the long ones) all give the reference's output and
    gradients."""
    from lla.ops.lla.torch_backend import function as tb

    B, H, Hk = 4, 4, 2
    G, direct = H // Hk, solver == "direct"
    if case == "partial":  # one row tile; room for exactly 3 pairs per step
        elems = 3 * max(G * T * T, G * T * D * D if direct else D * D)
    else:
        elems = {"tiles": 2000, "all": 1 << 20, "steps": G * 16 * T}[case]
    monkeypatch.setattr(tb, "HEAD_TILE_ELEMS", elems)
    monkeypatch.setattr(tb, "STEP_ELEMS", 3 * G * 16 * T if case == "steps" else elems)
    win = (window[0], 0 if causal else window[1])
    tiles, nb = tb._tile_plan(T, T, win, G, elems, "cpu", B * Hk, D, direct)
    assert {"partial": nb == 3 and len(tiles) == 1, "tiles": nb == 3 and len(tiles) > 1, "all": nb == B * Hk,
            "steps": nb == 1 and len(tiles) == 4}[case]
    steps = [(c.stop - c.start, G * (i1 - i0) * (j1 - j0)) for c, i0, i1, j0, j1, *_ in tb._blocks(T, T, win, G, B * Hk, "cpu", D, solver)]
    assert sum(p for p, _ in steps) == B * Hk * len(tiles)  # every pair of every tile, once
    if case == "partial":
        assert [p for p, _ in steps] == [3, 3, 2]
    if case == "steps":
        assert all(p * size <= tb.STEP_ELEMS for p, size in steps)
        counts = {p for p, _ in steps}
        assert (counts == {1}) if direct else (len(counts) > 1 and max(counts) > 1)
    q, k, v = make_qkv(B, T, H, D, Hk=Hk, seed=T + D, requires_grad=True)
    lam = (0.5 + torch.rand(B, T, H, dtype=torch.float64)).requires_grad_()
    g = torch.randn(B, T, H, D, dtype=torch.float64)
    outs, grads = [], []
    for fn in (lambda *a, **kw: _lla(*a, solver=solver, **kw), local_linear_attention_ref):
        out = fn(q, k, v, ridge=lam, causal=causal, window_size=window)
        outs.append(out)
        grads.append(torch.autograd.grad((out * g).sum(), (q, k, v, lam)))
    assert rel_err(outs[0], outs[1]) < 1e-9
    for name, a, b in zip("q k v ridge".split(), *grads):
        assert rel_err(a, b) < 1e-8, name


def test_batched_steps_bound_the_solver_memory():
    """Folding (batch, key head) pairs must not blow up the per-row D x D systems of the direct
    solve or the per-pair preconditioner: a step stays within HEAD_TILE_ELEMS of each."""
    from lla.ops.lla.torch_backend import function as tb

    E = tb.HEAD_TILE_ELEMS
    for T, G, D, direct in [(16, 1, 128, True), (16, 1, 128, False), (4, 2, 64, True), (64, 4, 16, True), (8, 1, 256, False)]:
        tiles, nb = tb._tile_plan(T, T, (-1, 0), G, E, "cpu", 4096, D, direct)
        rows = G * max(i1 - i0 for i0, i1, *_ in tiles)
        assert nb * rows * T <= E and (nb * rows * D * D <= E if direct else nb * D * D <= E)
        assert nb >= 1


def test_backward_saves_only_row_sized_tensors():
    q, k, v = make_qkv(1, 64, 2, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lla.local_linear_attention(q, k, v, ridge=1.0, backend="torch")
    # inputs + x, m, lse: nothing of size T * S
    assert saved and all(torch.Size(s).numel() <= 64 * 2 * 16 for s in saved), saved


# ---------------------------------------------------------------- varlen
@pytest.mark.parametrize("solver", SOLVERS)
def test_varlen_equals_separate_sequences(solver):
    lens = [5, 1, 17, 9]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)))
    q, k, v = make_qkv(1, sum(lens), 4, 16, Hk=2, seed=9, requires_grad=True)
    lam = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    o = _lla(q, k, v, ridge=lam, cu_seqlens=cu, solver=solver)
    parts = [
        local_linear_attention_ref(q[:, a:b], k[:, a:b], v[:, a:b], ridge=lam) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
    ]
    ref = torch.cat(parts, 1)
    assert rel_err(o, ref) < 1e-9
    g = torch.randn_like(o)
    ga = torch.autograd.grad((o * g).sum(), (q, k, v, lam))
    gb = torch.autograd.grad((ref * g).sum(), (q, k, v, lam))
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-8
    # the reference's packed mask agrees too
    assert rel_err(local_linear_attention_ref(q, k, v, ridge=lam, cu_seqlens=cu), ref) < 1e-9


# ---------------------------------------------------------------- low precision
def _naive_same_dtype(q, k, v, ridge):
    """The textbook implementation in the input dtype (the 2x baseline): weights, centred keys and
    moments in the dtype; only the D x D solve in float32 (PyTorch has no bf16/fp16 solver)."""
    B, T, H, D = q.shape
    Q, K, V = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    logits = (Q @ K.transpose(-1, -2)) * D**-0.5 + torch.full((T, T), float("-inf"), dtype=q.dtype).triu(1)
    s = torch.softmax(logits, -1)
    z = K[:, :, None] - Q[:, :, :, None]  # [B, H, T, S, D]
    mu = (s[..., None] * z).sum(-2)
    sigma = (s[..., None, None] * z[..., :, None] * z[..., None, :]).sum(-3) + ridge * torch.eye(D, dtype=q.dtype)
    rho = torch.linalg.solve(sigma.float(), mu.float()[..., None])[..., 0].to(q.dtype)
    delta = 1 - (mu * rho).sum(-1)
    w = s * (1 - (z * rho[..., None, :]).sum(-1)) / delta[..., None]
    return (w @ V).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", SOLVERS)
def test_low_precision_no_worse_than_naive(dtype, solver):
    q, k, v = make_qkv(1, 64, 2, 16, seed=21)
    ref = local_linear_attention_ref(q, k, v, ridge=1.0)
    lo = [t.to(dtype) for t in (q, k, v)]
    o = _lla(*lo, ridge=1.0, solver=solver)
    assert o.dtype == dtype
    err, naive = rel_err(o, ref), rel_err(_naive_same_dtype(*lo, 1.0), ref)
    assert torch.isfinite(o).all()
    assert err <= 2 * naive, (err, naive)


# ---------------------------------------------------------------- aux and solver control
def test_aux_structure():
    q, k, v = make_qkv(2, 20, 4, 16, Hk=2, dtype=torch.float32)
    o, aux = _lla(q, k, v, ridge=1.0, solver="cg", return_aux=True)
    assert isinstance(aux, lla.LLAAux) and aux.solver == "cg"
    assert 0 < aux.iters <= 32 and aux.residual < 1e-4
    ref_lse = torch.logsumexp(
        (q.transpose(1, 2) @ k.transpose(1, 2).repeat_interleave(2, 1).transpose(-1, -2)) / 4.0
        + torch.full((20, 20), float("-inf")).triu(1),
        -1,
    ).transpose(1, 2)
    assert aux.lse.shape == (2, 20, 4) and torch.allclose(aux.lse, ref_lse, atol=1e-4)
    _, aux_d = _lla(q, k, v, ridge=1.0, solver="direct", return_aux=True)
    assert aux_d.iters == 0 and aux_d.solver == "direct" and aux_d.residual < 1e-5


def test_auto_solver_choice_reaches_the_op():
    q, k, v = make_qkv(1, 8, 2, 64, dtype=torch.float32)
    assert _lla(q, k, v, ridge=1e-4, return_aux=True)[1].solver == "direct"
    assert _lla(q, k, v, ridge=0.01, return_aux=True)[1].solver == "cg"
    assert _lla(q.double(), k.double(), v.double(), ridge=10.0, return_aux=True)[1].solver == "direct"


def test_unconverged_cg_warns():
    q, k, v = make_qkv(1, 64, 2, 32, dtype=torch.float32, seed=4)
    with pytest.warns(lla.LLAConvergenceWarning, match="forward cg solve missed its tolerance"):
        _, aux = _lla(q, k, v, ridge=0.01, solver="cg", max_iters=2, return_aux=True)
    assert aux.iters == 2 and aux.residual > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _lla(q, k, v, ridge=0.01, solver="direct")


def test_ridge_shapes_broadcast():
    q, k, v = make_qkv(2, 12, 3, 16)
    per_head = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    o = _lla(q, k, v, ridge=per_head)
    assert rel_err(o, local_linear_attention_ref(q, k, v, ridge=per_head)) < 1e-9
    per_pos = torch.rand(2, 12, 3, dtype=torch.float64) + 0.1
    assert rel_err(_lla(q, k, v, ridge=per_pos), local_linear_attention_ref(q, k, v, ridge=per_pos)) < 1e-9
    per_batch = torch.tensor([0.5, 3.0], dtype=torch.float64).view(2, 1, 1)
    assert rel_err(_lla(q, k, v, ridge=per_batch), local_linear_attention_ref(q, k, v, ridge=per_batch)) < 1e-9


# ---------------------------------------------------------------- bad input
def _bad(**over):
    q, k, v = make_qkv(1, 8, 4, 16, Hk=2, dtype=torch.float32)
    args = dict(q=q, k=k, v=v)
    kw = {}
    for key, val in over.items():
        (args if key in args else kw)[key] = val
    return lambda: lla.local_linear_attention(args["q"], args["k"], args["v"], **kw)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(q=torch.randn(8, 4, 16)), ValueError, "q must have rank 4"),
        (dict(k=torch.randn(1, 8, 2)), ValueError, "k must have rank 4"),
        (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
        (dict(k=torch.randn(2, 8, 2, 16)), ValueError, "batch sizes differ"),
        (dict(v=torch.randn(1, 9, 2, 16)), ValueError, "same length S"),
        (dict(k=torch.randn(1, 8, 2, 8)), ValueError, "same head dim D"),
        (dict(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), ValueError, "multiple of the key/value heads"),
        (dict(v=torch.randn(1, 8, 3, 16)), ValueError, "same number of heads"),
        (dict(k=torch.randn(1, 8, 2, 16, dtype=torch.float64)), TypeError, "share a dtype"),
        (dict(q=torch.zeros(1, 8, 4, 16, dtype=torch.int64)), TypeError, "q must be float64"),
        (dict(q=torch.randn(1, 8, 4, 16, device="meta")), ValueError, "one device"),
        (dict(ridge=0.0), ValueError, "ridge must be a finite number > 0"),
        (dict(ridge=-1.0), ValueError, "ridge must be a finite number > 0"),
        (dict(ridge=float("nan")), ValueError, "ridge must be a finite number > 0"),
        (dict(ridge="1"), TypeError, "ridge must be a float or a tensor"),
        (dict(ridge=torch.ones(3)), ValueError, "ridge must be broadcastable"),
        (dict(ridge=torch.ones(1, 1, 1, 1)), ValueError, "ridge must be broadcastable"),
        (dict(ridge=torch.tensor([1.0, 0.0, 1.0, 1.0])), ValueError, "ridge must be finite and > 0"),
        (dict(ridge=torch.ones(4, dtype=torch.int64)), TypeError, "ridge must be a floating-point tensor"),
        (dict(scale=float("inf")), ValueError, "scale must be a finite number"),
        (dict(window_size=(3,)), ValueError, "window_size"),
        (dict(window_size=(-2, 0)), ValueError, "window_size"),
        (dict(solver="lu"), ValueError, "solver must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(max_iters=0), ValueError, "max_iters"),
        (dict(tol=-1.0), ValueError, "tol"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(cu_seqlens=[0, 8]), TypeError, "cu_seqlens must be an int32/int64 tensor"),
        (dict(cu_seqlens=torch.tensor([0.0, 8.0])), ValueError, "cu_seqlens must be a 1-D int32/int64"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 8])), ValueError, "cu_seqlens must be non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 5, 7])), ValueError, "end at T = 8"),
        (dict(cu_seqlens=torch.tensor([1, 5, 8])), ValueError, "start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 8]), cu_seqlens_q=torch.tensor([0, 8])), ValueError, "not both"),
        (dict(cu_seqlens_q=torch.tensor([0, 8])), ValueError, "given together"),
        (dict(max_seqlen_q=8), ValueError, "max_seqlen_q / max_seqlen_k need"),
        (dict(cu_seqlens_q=torch.tensor([0, 8]), cu_seqlens_k=torch.tensor([0, 2, 8])), ValueError,
         "same number of sequences"),
        (dict(cu_seqlens_q=torch.tensor([0, 8]), cu_seqlens_k=torch.tensor([0, 7])), ValueError, "cu_seqlens_k must .* end at S = 8"),
        (dict(cu_seqlens_q=torch.tensor([0, 9, 8]), cu_seqlens_k=torch.tensor([0, 4, 8])), ValueError,
         "cu_seqlens_q must be non-decreasing"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 8], dtype=torch.int16), cu_seqlens_k=torch.tensor([0, 4, 8])),
         ValueError, "cu_seqlens_q must be a 1-D int32/int64"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 8]), cu_seqlens_k=torch.tensor([0, 4, 8]), max_seqlen_q=4),
         ValueError, "max_seqlen_q = 4 is smaller than the longest sequence in cu_seqlens_q \\(5\\)"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 8]), cu_seqlens_k=torch.tensor([0, 4, 8]), max_seqlen_k=3),
         ValueError, "max_seqlen_k = 3"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 8]), cu_seqlens_k=torch.tensor([0, 4, 8]), max_seqlen_k=-1),
         ValueError, "max_seqlen_k must be an int >= 0"),
    ],
)
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**over)()


def test_bad_input_varlen_batch_and_cross():
    q, k, v = make_qkv(2, 8, 2, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch size 1"):
        lla.local_linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 8]))
    q, k, v = make_qkv(1, 8, 2, 16, S=10, dtype=torch.float32)
    with pytest.raises(ValueError, match="S == T"):
        lla.local_linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 8]))


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(1, 8, 2, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend='triton' needs"):
        lla.local_linear_attention(q, k, v, backend="triton")


# ---------------------------------------------------------------- robustness
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "case",
    ["logits-in-thousands", "keys-norm-1e3", "ridge-1e-4", "offset-keys", "duplicate-keys"],
)
def test_finite_inputs_give_finite_outputs_and_gradients(solver, case):
    q, k, v = make_qkv(1, 48, 2, 16, seed=31)
    ridge, scale = 1.0, None
    if case == "logits-in-thousands":
        q, k = q * 30, k * 30  # logits ~ 900 * N(0, 4)
    elif case == "keys-norm-1e3":
        k = k * 250.0  # norm ~ 1e3
    elif case == "ridge-1e-4":
        ridge = 1e-4
    elif case == "offset-keys":
        k = k + 1e3  # huge common offset: cancellation in uncentred moments
        q = q + 1e3
    else:
        k = k[:, :1].expand_as(k).clone()  # every key identical: zero covariance
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    # the reference on the very same (fp32-rounded) inputs: at logits ~1e3 rounding the inputs
    # alone moves the answer by ~1e-3
    ref = local_linear_attention_ref(q32.double(), k32.double(), v32.double(), ridge=ridge, scale=scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o = lla.local_linear_attention(q32, k32, v32, ridge=ridge, scale=scale, solver=solver, backend="torch")
        o.sum().backward()
    assert torch.isfinite(o).all()
    for t in (q32, k32, v32):
        assert torch.isfinite(t.grad).all()
    warned = any(issubclass(w.category, lla.LLAConvergenceWarning) for w in caught)
    assert warned or rel_err(o, ref) < 1e-3, rel_err(o, ref)


def test_nan_in_one_packed_sequence_stays_there():
    lens = [16, 16, 16]
    cu = torch.tensor([0, 16, 32, 48])
    q, k, v = make_qkv(1, 48, 2, 16, dtype=torch.float32, seed=8)
    k[0, 20, 0, 3] = float("nan")  # second sequence, position 4
    v[0, 36, 1, 0] = float("inf")  # third sequence, position 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = lla.local_linear_attention(q, k, v, ridge=1.0, cu_seqlens=cu)
    clean = make_qkv(1, 48, 2, 16, dtype=torch.float32, seed=8)
    o_clean = lla.local_linear_attention(*clean, ridge=1.0, cu_seqlens=cu)
    assert torch.equal(o[:, :16], o_clean[:, :16])  # another sequence: untouched
    # rows before the NaN: finite and unchanged (to rounding: the zeroed key moves the key mean)
    assert rel_err(o[:, 16:20], o_clean[:, 16:20]) < 1e-5
    assert rel_err(o[:, 32:36], o_clean[:, 32:36]) < 1e-5
    assert torch.isnan(o[:, 20:32, 0]).all()  # rows that see it: NaN, not silent garbage
    assert rel_err(o[:, 16:32, 1], o_clean[:, 16:32, 1]) < 1e-5  # the other head
    assert not torch.isfinite(o[:, 36:48, 1]).any()


def test_nan_key_does_not_reach_earlier_rows_unpacked():
    q, k, v = make_qkv(1, 40, 2, 16, dtype=torch.float32, seed=6)
    k2 = k.clone()
    k2[0, 25, 1, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = lla.local_linear_attention(q, k2, v, ridge=1.0)
    o_clean = lla.local_linear_attention(q, k, v, ridge=1.0)
    assert rel_err(o[:, :25], o_clean[:, :25]) < 1e-5  # rows before the NaN key
    assert rel_err(o[:, 25:, 0], o_clean[:, 25:, 0]) < 1e-5  # a head reading another key head
    assert torch.isnan(o[:, 25:, 1]).all()


def test_softmax_reference_matches_sdpa():
    q, k, v = make_qkv(2, 30, 2, 16)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    assert rel_err(softmax_attention_ref(q, k, v), sdpa.transpose(1, 2)) < 1e-12


def test_auto_solver_rule():
    from lla.ops.common.policy import resolve_solver

    f32 = torch.float32
    assert resolve_solver("cg", 1e-4, 64, torch.float64) == "cg"  # an explicit choice is kept
    assert resolve_solver("auto", 1.0, 64, torch.float64, S=4096) == "direct"
    assert resolve_solver("auto", 1.0, 16, f32, S=4096) == "direct"
    assert resolve_solver("auto", 1.0, 16, f32, S=512) == "direct"
    assert resolve_solver("auto", 1.0, 16, f32, S=64) == "cg"  # training shapes: batched CG wins
    assert resolve_solver("auto", 0.05, 32, f32, S=1024) == "direct"
    assert resolve_solver("auto", 1.0, 32, f32, S=1024) == "cg"
    assert resolve_solver("auto", 0.05, 32, f32, S=256) == "cg"
    assert resolve_solver("auto", 0.01, 64, f32, S=256) == "cg"
    assert resolve_solver("auto", 0.01, 64, f32, S=4096) == "cg"
    assert resolve_solver("auto", 1.0, 16, f32) == "cg"  # S unknown counts as short
    assert resolve_solver("auto", 1e-4, 64, f32, S=4096) == "direct"


def test_auto_solver_is_cg_on_the_triton_backend(monkeypatch):
    import lla.ops.lla.api as api

    seen = {}

    def fake_backend(q, k, v, ridge, varlen, config):  # the backend contract: (o, BackendResult)
        from lla.ops.common.result import BackendResult

        seen["solver"] = config.solver
        o = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
        return o, BackendResult(lse=torch.zeros(q.shape[:3]), iters=0, residual=0.0)

    monkeypatch.setattr(api, "pick_backend", lambda backend, q: "triton")
    monkeypatch.setattr(api, "_backend_fn", lambda name: fake_backend)
    q, k, v = make_qkv(1, 8, 2, 16, dtype=torch.float32)
    lla.local_linear_attention(q, k, v)
    assert seen["solver"] == "cg"  # auto would pick direct for D = 16 on the torch backend
    lla.local_linear_attention(q, k, v, solver="direct")
    assert seen["solver"] == "direct"
    lla.local_linear_attention(q.double(), k.double(), v.double())
    assert seen["solver"] == "direct"


# --------------------------------------------------------- tuned backend paths, many small tiles
@pytest.mark.parametrize("ridge", [0.05, 2.0])
@pytest.mark.parametrize("window", [(-1, -1), (7, -1)])
def test_backend_multi_tile_compaction(monkeypatch, ridge, window):
    import lla.ops.lla.torch_backend.function as fn
    import lla.ops.lla.torch_backend.solvers as sv

    monkeypatch.setattr(fn, "HEAD_TILE_ELEMS", 1 << 10)  # 16-row tiles: many tiles, partial masks
    monkeypatch.setattr(sv, "COMPACT_FRACTION", 0.95)  # compact as soon as any row converges
    q, k, v = make_qkv(2, 90, 4, 12, Hk=2, seed=3, requires_grad=True)
    ref = local_linear_attention_ref(q, k, v, ridge=ridge, window_size=window)
    do = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (q, k, v), do)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        o = lla.local_linear_attention(qq, kk, vv, ridge=ridge, window_size=window, solver="cg", backend="torch")
        assert rel_err(o, ref) < tol
        for a, b in zip(torch.autograd.grad(o, (qq, kk, vv), do.to(dtype)), g_ref):
            assert rel_err(a, b) < 10 * tol
