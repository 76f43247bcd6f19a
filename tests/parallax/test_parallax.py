"""Parallax: the PyTorch backend, decoding, the layer, the mixer and torch.compile against the float64
reference (``lla.parallax_attention_ref``); the identity with LLA."""

from __future__ import annotations

import pytest
import torch

import lla
from lla import parallax_attention, parallax_attention_ref, parallax_attention_with_kvcache
from lla.experiments.mixers import build_mixer
from lla.nn import KVCache, ParallaxAttention
from conftest import rel_err


def make_qrkv(B=1, T=16, H=2, D=16, S=None, Hk=None, Dv=None, dtype=torch.float64, seed=0, r_scale=0.5):
    """Random ``q, r [B, T, H, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` (float64 draw, then cast)."""
    S = T if S is None else S
    Hk = H if Hk is None else Hk
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    r = r_scale * torch.randn(B, T, H, D, generator=g, dtype=torch.float64) / D**0.5
    k = torch.randn(B, S, Hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, Hk, Dv, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, r, k, v))


def out_and_grads(fn, inputs, do, dtype, **kw):
    """``o`` and the gradients of ``sum(o * do)`` w.r.t. ``q, r, k, v`` (inputs cast to ``dtype``)."""
    xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
    o = fn(*xs, **kw)
    (o.double() * do).sum().backward()
    return [o] + [x.grad for x in xs]


def ref(*xs, **kw):
    return parallax_attention_ref(*xs, **kw)


def op(*xs, **kw):
    return parallax_attention(*xs, backend="torch", **kw)


NAMES = ("o", "dq", "dr", "dk", "dv")
# (B, T, S, H, Hk, D, Dv, causal, window)
SHAPES = [
    (1, 1, 1, 2, 2, 16, 16, True, (-1, -1)),
    (2, 63, 63, 4, 2, 16, 8, True, (-1, -1)),
    (1, 100, 100, 2, 1, 48, 48, True, (-1, -1)),
    (1, 63, 40, 2, 2, 80, 16, True, (-1, -1)),  # S < T: the first rows see no key
    (1, 40, 100, 4, 1, 16, 48, False, (-1, -1)),
    (1, 100, 100, 2, 2, 16, 16, True, (7, -1)),
    (1, 63, 63, 2, 1, 48, 16, False, (5, 9)),
    (1, 1, 63, 2, 2, 80, 80, True, (10, -1)),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}S{}H{}Hk{}D{}Dv{}{}w{}_{}".format(*s[:7], "c" if s[7] else "n", *s[8]))
def test_forward_and_gradients_match_reference(shape):
    B, T, S, H, Hk, D, Dv, causal, window = shape
    x = make_qrkv(B=B, T=T, S=S, H=H, Hk=Hk, D=D, Dv=Dv)
    do = torch.randn(B, T, H, Dv, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(causal=causal, window_size=window)
    want = out_and_grads(ref, x, do, torch.float64, **kw)
    got64 = out_and_grads(op, x, do, torch.float64, **kw)
    got32 = out_and_grads(op, x, do, torch.float32, **kw)
    for name, a, b, c in zip(NAMES, got64, got32, want):
        assert a.dtype == torch.float64 and b.dtype == torch.float32
        assert rel_err(a, c) <= 1e-12, (name, rel_err(a, c))
        assert rel_err(b, c) <= 1e-5, (name, rel_err(b, c))


def test_gradcheck_float64():
    x = [t.requires_grad_() for t in make_qrkv(B=1, T=6, S=7, H=2, Hk=1, D=4, Dv=3, r_scale=2.0)]
    assert torch.autograd.gradcheck(lambda *a: op(*a, causal=True, window_size=(3, -1)), x)
    assert torch.autograd.gradcheck(lambda *a: op(*a, causal=False), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_twice_naive(dtype):
    x = make_qrkv(B=2, T=63, S=63, H=4, Hk=2, D=48, Dv=16, r_scale=2.0)
    do = torch.randn(2, 63, 4, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = out_and_grads(ref, x, do, torch.float64)
    naive = out_and_grads(ref, x, do, dtype)
    got = out_and_grads(op, x, do, dtype)
    assert got[0].dtype == dtype
    for name, g, n, w in zip(NAMES, got, naive, want):
        assert rel_err(g, w) <= 2 * rel_err(n, w), (name, rel_err(g, w), rel_err(n, w))


def test_varlen_matches_per_sequence_reference():
    x = make_qrkv(B=1, T=40, H=2, Hk=1, D=16, Dv=8, seed=3)
    cu = torch.tensor([0, 1, 17, 40], dtype=torch.int32)
    do = torch.randn(1, 40, 2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for kw in (dict(causal=True), dict(causal=False, window_size=(3, 2))):
        want = out_and_grads(ref, x, do, torch.float64, cu_seqlens=cu, **kw)
        got = out_and_grads(op, x, do, torch.float32, cu_seqlens=cu, **kw)
        for name, g, w in zip(NAMES, got, want):
            assert rel_err(g, w) <= 1e-5, (name, rel_err(g, w))
    # the reference's varlen mask is the per-sequence computation
    q, r, k, v = x
    per_seq = torch.cat([ref(q[:, a:b], r[:, a:b], k[:, a:b], v[:, a:b]) for a, b in ((0, 1), (1, 17), (17, 40))], 1)
    assert rel_err(ref(*x, cu_seqlens=cu), per_seq) <= 1e-15


def test_huge_invisible_key_leaves_rows_unchanged():
    q, r, k, v = make_qrkv(B=1, T=50, H=2, D=16, dtype=torch.float32, seed=4)
    base = op(q, r, k, v)
    for big in (1e4, 1e30):
        k2 = k.clone()
        k2[:, -1] = big  # only the last row sees it; its r . k overflows float32 at 1e30
        out = op(q, r, k2, v)
        assert torch.equal(out[:, :-1], base[:, :-1])
        xs = [t.clone().requires_grad_() for t in (q, r, k2, v)]
        o = op(*xs)
        o[:, :-1].sum().backward()
        assert all(bool(torch.isfinite(t.grad).all()) for t in xs)
    # windowed: keys outside the window (before it) are invisible too
    k3 = k.clone()
    k3[:, 0] = 1e4
    w = op(q, r, k3, v, window_size=(4, -1))
    assert torch.equal(w[:, 5:], op(q, r, k, v, window_size=(4, -1))[:, 5:])


@pytest.mark.parametrize("stress", ["logits_1e4", "rk_large", "rk_offset"])
def test_stress_finite_and_no_worse_than_twice_naive_fp32(stress):
    q, r, k, v = make_qrkv(B=1, T=63, H=2, D=16, seed=5)
    if stress == "logits_1e4":
        q = q * (1e4 / (q.norm(dim=-1, keepdim=True) * k.norm(dim=-1).max() / 4))  # logits up to ~1e4
    elif stress == "rk_large":
        r = r * 1e4  # r . k spread ~ 1e3
    else:  # r . k ~ 9000 + O(1): the uncentred flash form (d2 / d1, O2 / d1) loses every digit here
        u = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(6), dtype=torch.float64), dim=0)
        k, r = k + 300 * u, r + 30 * u
    x = (q, r, k, v)
    do = torch.randn(1, 63, 2, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = out_and_grads(ref, x, do, torch.float64)
    naive = out_and_grads(ref, x, do, torch.float32)
    got = out_and_grads(op, x, do, torch.float32)
    for name, g, n, w in zip(NAMES, got, naive, want):
        assert bool(torch.isfinite(g).all()), name
        assert rel_err(g, w) <= 2 * max(rel_err(n, w), 1e-7), (name, rel_err(g, w), rel_err(n, w))


def test_rows_that_see_no_key_output_zero_and_lse():
    x = make_qrkv(B=1, T=10, S=4, H=2, D=8)
    o, lse = parallax_attention(*x, return_lse=True)
    assert torch.equal(o[:, :6], torch.zeros_like(o[:, :6]))
    assert bool(torch.isinf(lse[:, :6]).all()) and bool(torch.isfinite(lse[:, 6:]).all())
    q, r, k, v = x
    logits = torch.einsum("bthd,bshd->bhts", q, k) * 8**-0.5
    mask = lla.ops.common.masks.visible_mask(10, 4)
    want = logits.masked_fill(~mask, float("-inf")).logsumexp(-1).transpose(1, 2)
    assert rel_err(lse[:, 6:], want[:, 6:]) <= 1e-6


def test_non_finite_key_poisons_only_rows_that_see_it():
    q, r, k, v = make_qrkv(B=1, T=12, H=2, D=8, dtype=torch.float32)
    k = k.clone()
    k[0, 7, 0, 3] = float("inf")
    o = op(q, r, k, v)
    assert bool(torch.isnan(o[0, 7:, 0]).all())
    ok = op(q, r, k.nan_to_num(posinf=0.0), v)
    assert torch.equal(o[0, :7], ok[0, :7]) and torch.equal(o[0, :, 1], ok[0, :, 1])


def test_identity_with_lla():
    """LLA is Parallax with ``r_i = A_i^{-1} (m_i - q_i)``, ``m_i = E_s[k]``, ``A_i = Cov_s(k) + lam I``."""
    B, T, H, D, lam = 1, 30, 2, 8, 0.3
    q, _, k, v = make_qrkv(B=B, T=T, H=H, D=D, Dv=5, seed=7)
    for kw in (dict(causal=True), dict(causal=False, window_size=(4, 6))):
        mask = lla.ops.common.masks.visible_mask(T, T, **kw)
        logits = torch.einsum("bthd,bshd->bhts", q, k) * D**-0.5
        s = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)  # [B, H, T, S]
        K = k.transpose(1, 2)  # [B, H, S, D]
        m = s @ K  # [B, H, T, D]
        y = K[:, :, None] - m[:, :, :, None]  # [B, H, T, S, D]
        A = torch.einsum("bhts,bhtsd,bhtse->bhtde", s, y, y) + lam * torch.eye(D, dtype=torch.float64)
        r = torch.linalg.solve(A, (m - q.transpose(1, 2)).unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # [B, T, H, D]
        want = lla.local_linear_attention_ref(q, k, v, ridge=lam, **kw)
        assert rel_err(parallax_attention_ref(q, r, k, v, **kw), want) <= 1e-10
        assert rel_err(op(q, r, k, v, **kw), want) <= 1e-10


def test_zero_r_is_softmax_attention():
    q, r, k, v = make_qrkv(B=1, T=20, H=4, Hk=2, D=8)
    want = lla.ops.lla.reference.softmax_attention_ref(q, k, v)
    assert rel_err(op(q, torch.zeros_like(r), k, v), want) <= 1e-14


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_prefill_then_decode_equals_full_forward(dtype, tol):
    B, T, H, Hk, D, Dv = 3, 24, 4, 2, 16, 8
    q, r, k, v = make_qrkv(B=B, T=T, H=H, Hk=Hk, D=D, Dv=Dv, dtype=dtype, seed=8)
    for window in ((-1, -1), (5, -1)):
        full = parallax_attention(q, r, k, v, window_size=window)
        kc = torch.full((B, 32, Hk, D), float("nan"), dtype=dtype)  # uninitialised entries must not leak
        vc = torch.full((B, 32, Hk, Dv), float("nan"), dtype=dtype)
        outs = [parallax_attention_with_kvcache(q[:, :7], r[:, :7], kc, vc, k[:, :7], v[:, :7], cache_seqlens=0,
                                                window_size=window)]
        outs.append(parallax_attention_with_kvcache(q[:, 7:12], r[:, 7:12], kc, vc, k[:, 7:12], v[:, 7:12],
                                                    cache_seqlens=7, window_size=window))  # chunked prefill
        for t in range(12, T):
            outs.append(parallax_attention_with_kvcache(q[:, t : t + 1], r[:, t : t + 1], kc, vc, k[:, t : t + 1],
                                                        v[:, t : t + 1], cache_seqlens=torch.full((B,), t), window_size=window))
        assert rel_err(torch.cat(outs, 1), full) <= tol
        assert torch.equal(kc[:, :T], k) and torch.equal(vc[:, :T], v)  # written in place
        assert bool(torch.isnan(kc[:, T:]).all())


def test_decode_ragged_lengths():
    B, H, D = 3, 2, 8
    q, r, k, v = make_qrkv(B=B, T=1, S=20, H=H, D=D, seed=9)
    lens = torch.tensor([0, 5, 19])
    kc, vc = torch.randn(B, 24, H, D, dtype=torch.float64), torch.randn(B, 24, H, D, dtype=torch.float64)
    o = parallax_attention_with_kvcache(q, r, kc, vc, k[:, :1], v[:, :1], cache_seqlens=lens)
    for b in range(B):
        n = int(lens[b]) + 1
        want = parallax_attention_ref(q[b : b + 1], r[b : b + 1], kc[b : b + 1, :n], vc[b : b + 1, :n])
        assert rel_err(o[b : b + 1], want) <= 1e-13
    # without new keys: sequence 0 sees nothing and outputs zeros; chunks of ragged lengths
    o = parallax_attention_with_kvcache(q, r, kc, vc, cache_seqlens=torch.tensor([0, 3, 7]))
    assert torch.equal(o[0], torch.zeros_like(o[0]))
    q4, r4 = (torch.randn(B, 4, H, D, dtype=torch.float64) for _ in range(2))
    o = parallax_attention_with_kvcache(q4, r4, kc, vc, cache_seqlens=torch.tensor([4, 9, 9]))
    want = parallax_attention_ref(q4[1:], r4[1:], kc[1:, :9], vc[1:, :9])
    assert rel_err(o[1:], want) <= 1e-13


def test_errors():
    q, r, k, v = make_qrkv(B=1, T=4, H=2, D=8)
    with pytest.raises(ValueError, match="r must have the shape"):
        parallax_attention(q, r[:, :3], k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        parallax_attention(q, r.float(), k, v)
    with pytest.raises(ValueError, match="multiple"):
        parallax_attention(q, r, torch.zeros(1, 4, 3, 8, dtype=q.dtype), torch.zeros(1, 4, 3, 8, dtype=q.dtype))
    with pytest.raises(ValueError, match="window_size"):
        parallax_attention(q, r, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="backend"):
        parallax_attention(q, r, k, v, backend="cuda")
    with pytest.raises(TypeError, match="r must be a torch.Tensor"):
        parallax_attention(q, None, k, v)
    with pytest.raises(ValueError, match="cache_seqlens"):
        parallax_attention_with_kvcache(q[:, :1], r[:, :1], k, v, k[:, :1], v[:, :1], cache_seqlens=4)


# ---------------------------------------------------------------------------------------- layer, mixer
def test_layer_cache_padding_and_zero_init():
    torch.manual_seed(0)
    for kw in (dict(), dict(qk_norm=True, rope=True, window=5)):
        layer = ParallaxAttention(32, 4, num_kv_heads=2, zero_init_r=False, **kw).double()
        x = torch.randn(2, 12, 32, dtype=torch.float64)
        full = layer(x)
        cache = KVCache(4)  # grows while decoding
        outs = [layer(x[:, :7], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(7, 12)]
        assert rel_err(torch.cat(outs, 1), full) <= 1e-12
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[1, :3] = False  # left padding
        out = layer(x, attention_mask=mask)
        assert rel_err(out[1, 3:], layer(x[1:, 3:])[0]) <= 1e-12 and rel_err(out[0], full[0]) <= 1e-15
    layer = ParallaxAttention(16, 2)  # zero-initialised r: softmax attention at start
    x = torch.randn(1, 6, 16)
    q = layer.q_proj(x).view(1, 6, 2, 8)
    k, v = layer.k_proj(x).view(1, 6, 2, 8), layer.v_proj(x).view(1, 6, 2, 8)
    want = layer.o_proj(lla.ops.lla.reference.softmax_attention_ref(q, k, v).reshape(1, 6, 16))
    assert rel_err(layer(x), want) <= 1e-6


def test_mixer_registered_and_learns_r():
    from lla.experiments.mixers import MIXERS

    assert "parallax" in MIXERS
    torch.manual_seed(0)
    mixer = build_mixer("parallax", 32, 4)
    out = mixer(torch.randn(2, 9, 32))
    out.square().sum().backward()
    assert out.shape == (2, 9, 32) and float(mixer.r_proj.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------- torch.compile
def test_custom_op_opcheck():
    from lla.ops.parallax import custom_op  # noqa: F401

    x = [t.requires_grad_() for t in make_qrkv(B=1, T=6, H=2, Hk=1, D=4)]
    torch.library.opcheck(torch.ops.lla.parallax_fwd.default, (*x, None, 0.5, -1, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compile_fullgraph_matches_eager():
    def fn(q, r, k, v, cu):
        return parallax_attention(q, r, k, v, window_size=(5, -1)) * 2.0 + parallax_attention(q, r, k, v, cu_seqlens=cu)

    x = [t.requires_grad_() for t in make_qrkv(B=1, T=12, H=4, Hk=2, D=8, dtype=torch.float32, seed=2)]
    cu = torch.tensor([0, 5, 12])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c = compiled(*x, cu)
    grads_c = torch.autograd.grad(out_c.square().sum(), x)
    out_e = fn(*x, cu)
    grads_e = torch.autograd.grad(out_e.square().sum(), x)
    assert rel_err(out_c, out_e) <= 1e-6
    for gc, ge in zip(grads_c, grads_e):
        assert rel_err(gc, ge) <= 1e-6


def test_experiments_accept_the_parallax_mixer():
    from lla.experiments.model import CausalModel, ModelConfig
    from lla.experiments.runner import _check_mixers

    assert _check_mixers("mqar", ["parallax", "lla"]) == ["parallax", "lla"]
    torch.manual_seed(0)
    model = CausalModel(ModelConfig(mixer="parallax", d_model=16, num_heads=2, vocab_size=7, output_dim=7, max_len=9))
    out = model(torch.randint(7, (2, 9)))
    out.sum().backward()
    assert out.shape == (2, 9, 7) and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("elems", [512, 40000])
def test_many_small_tiles_match_reference(monkeypatch, elems):
    """Tiles of 16 query rows (``elems=512``) or some of the (batch, key head) pairs per step (40000):
    partly visible column bands, rows that see nothing inside a tile, windows on both sides."""
    from lla.ops.parallax import torch_backend

    monkeypatch.setattr(torch_backend, "TILE_ELEMS", elems)
    cases = [
        dict(T=100, S=100, causal=True, window_size=(-1, -1)),
        dict(T=70, S=40, causal=True, window_size=(-1, -1)),
        dict(T=63, S=100, causal=False, window_size=(9, 20)),
        dict(T=100, S=100, causal=True, window_size=(17, -1)),
        dict(T=50, S=63, causal=False, window_size=(-1, 3)),
    ]
    for i, c in enumerate(cases):
        T, S = c.pop("T"), c.pop("S")
        x = make_qrkv(B=2, T=T, S=S, H=4, Hk=2, D=16, Dv=8, seed=10 + i)
        do = torch.randn(2, T, 4, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        want = out_and_grads(ref, x, do, torch.float64, **c)
        got = out_and_grads(op, x, do, torch.float64, **c)
        for name, g, w in zip(NAMES, got, want):
            assert rel_err(g, w) <= 1e-12, (i, name, rel_err(g, w))


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (7, 30)), (True, (12, -1))])
def test_one_tile_plan_reads_keys_in_place(monkeypatch, causal, window):
    """A chunk of queries on a long cache (``S >= 4 T``) with up to twice the tile budget of rows makes one
    tile (no second pass over nearly the same keys), and a plan of one tile reads the keys and values in
    place (views, B = 1) instead of copying them head-major; outputs and gradients equal the reference.
    Square shapes keep the budget, and several tiles still copy."""
    from lla.ops.parallax import torch_backend

    monkeypatch.setattr(torch_backend, "TILE_ELEMS", 512)  # a 16-row budget here (G = 2, S >= 16)
    win = (window[0], 0) if causal else window
    plan, _ = torch_backend._cached_plan(30, 130, win, 2, 2, "cpu")
    assert len(plan) == 1 and plan[0][1] - plan[0][0] == 30
    assert len(torch_backend._cached_plan(30, 100, win, 2, 2, "cpu")[0]) == 2  # S < 4 T: the budget holds
    x = make_qrkv(B=1, T=30, S=130, H=4, Hk=2, D=16, Dv=8, seed=77)
    q, r, k, v = x
    _X, K, V, _bad = torch_backend._prepare(q, r, k, v, 0.25, win)
    assert K.data_ptr() == k.data_ptr() and V.data_ptr() == v.data_ptr()  # views of the inputs
    x40 = make_qrkv(B=1, T=40, S=130, H=4, Hk=2, D=16, Dv=8, seed=78)  # 40 > 2 x 16 rows: three tiles, copies
    _X, K40, _V, _bad = torch_backend._prepare(*x40, 0.25, win)
    assert K40.is_contiguous() and K40.data_ptr() != x40[2].data_ptr()
    do = torch.randn(1, 30, 4, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = out_and_grads(ref, x, do, torch.float64, causal=causal, window_size=window)
    got = out_and_grads(op, x, do, torch.float64, causal=causal, window_size=window)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) <= 1e-12, (name, rel_err(g, w))


def test_bench_provider_in_process():
    import warnings

    from lla import bench

    threads = torch.get_num_threads()
    with warnings.catch_warnings():  # run_point silences warnings and sets the thread count
        rec = bench.run_point("parallax", "fwdbwd", 24, 8, 1.0, repeats=1, threads=1)
    torch.set_num_threads(threads)
    assert rec["ms"] > 0 and rec["rel_err"] <= 1e-5 and rec["flops"] == 22 * 8 * 24 * 25 / 2 * 8
    assert "parallax" in bench.PROVIDERS and "parallax" in bench.FLOP_FORMULAS
