"""Baselines (softmax, sliding window, linear, mesa, gated DeltaNet) against naive versions of
themselves, and the mixer registry (shapes, causality, gradients, bad input)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lla
from lla import baselines as bl
from lla.experiments.mixers import MIXERS, build_mixer

from conftest import make_qkv, rel_err


@pytest.mark.parametrize("T,H,Hk", [(1, 2, 2), (37, 4, 2), (64, 2, 1)])
def test_softmax_matches_naive(T, H, Hk):
    q, k, v = make_qkv(B=2, T=T, H=H, Hk=Hk, D=8, Dv=5)
    assert rel_err(bl.softmax_attention(q, k, v), bl.softmax_attention_naive(q, k, v)) < 1e-12
    assert rel_err(bl.softmax_attention(q, k, v, causal=False), bl.softmax_attention_naive(q, k, v, causal=False)) < 1e-12


def test_softmax_bottom_right_alignment_and_empty_rows():
    q, k, v = make_qkv(B=1, T=6, H=2, D=4, S=4)  # T > S: the first two queries see no key
    o = bl.softmax_attention(q, k, v)
    assert torch.all(o[:, :2] == 0)
    assert rel_err(o, bl.softmax_attention_naive(q, k, v)) < 1e-12


@pytest.mark.parametrize("window", [1, 3, 16, 100])
def test_sliding_window_matches_naive(window):
    q, k, v = make_qkv(B=2, T=29, H=4, Hk=2, D=8)
    ref = bl.sliding_window_attention_naive(q, k, v, window=window)
    assert rel_err(bl.sliding_window_attention(q, k, v, window=window), ref) < 1e-12
    assert rel_err(bl.softmax_attention_naive(q, k, v, window=window), ref) < 1e-12
    if window == 1:  # only the own position: the output is v
        assert rel_err(ref, bl._common.expand_kv(v, 4)) < 1e-12


@pytest.mark.parametrize("feature_map", sorted(bl.FEATURE_MAPS))
@pytest.mark.parametrize("T,chunk", [(1, 4), (37, 8), (64, 64), (50, 7)])
def test_linear_chunkwise_matches_naive(feature_map, T, chunk):
    q, k, v = make_qkv(B=2, T=T, H=4, Hk=2, D=8, Dv=6)
    norm = feature_map != "identity"
    fast = bl.linear_attention(q, k, v, feature_map=feature_map, normalize=norm, chunk_size=chunk)
    assert rel_err(fast, bl.linear_attention_naive(q, k, v, feature_map=feature_map, normalize=norm)) < 1e-11


def test_linear_normalised_is_a_weighted_mean():
    """With a positive feature map and normalisation, constant values come back unchanged."""
    q, k, _ = make_qkv(B=1, T=20, H=2, D=4)
    v = torch.full((1, 20, 2, 3), 2.5, dtype=torch.float64)
    assert rel_err(bl.linear_attention(q, k, v, chunk_size=6, eps=0.0), v) < 1e-12


@pytest.mark.parametrize("T,chunk,ridge", [(1, 4, 1.0), (37, 8, 0.3), (40, 64, 2.0)])
def test_mesa_matches_naive(T, chunk, ridge):
    q, k, v = make_qkv(B=2, T=T, H=4, Hk=2, D=6, Dv=3)
    assert rel_err(bl.mesa_attention(q, k, v, ridge=ridge, chunk_size=chunk), bl.mesa_attention_naive(q, k, v, ridge=ridge)) < 1e-11


def test_mesa_recovers_a_linear_map():
    """Noise-free y = A x: after D pairs with a tiny ridge the fit is exact."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 30, 1, 5, generator=g, dtype=torch.float64)
    A = torch.randn(3, 5, generator=g, dtype=torch.float64)
    y = x @ A.T
    o = bl.mesa_attention(x, x, y, ridge=1e-9)
    assert rel_err(o[:, 10:], y[:, 10:]) < 1e-6


def test_mesa_per_position_ridge_and_grad():
    q, k, v = make_qkv(B=1, T=6, H=1, D=2, requires_grad=True)
    lam = torch.rand(1, 6, 1, dtype=torch.float64) + 0.5
    lam.requires_grad_(True)
    assert rel_err(bl.mesa_attention(q, k, v, ridge=lam, chunk_size=4), bl.mesa_attention_naive(q, k, v, ridge=lam)) < 1e-11
    assert torch.autograd.gradcheck(lambda q, lam: bl.mesa_attention(q, k, v, ridge=lam, chunk_size=4), (q, lam))


def test_gated_delta_matches_naive():
    q, k, v = make_qkv(B=2, T=17, H=4, Hk=2, D=6, Dv=5)
    k = F.normalize(k, dim=-1)
    g = torch.Generator().manual_seed(3)
    alpha = torch.rand(2, 17, 4, generator=g, dtype=torch.float64)
    beta = torch.rand(2, 17, 4, generator=g, dtype=torch.float64)
    assert rel_err(bl.gated_delta_attention(q, k, v, alpha, beta), bl.gated_delta_attention_naive(q, k, v, alpha, beta)) < 1e-12


def test_delta_rule_stores_and_retrieves_orthonormal_keys():
    """alpha = beta = 1 with orthonormal keys: querying key j returns v_j exactly."""
    D = 6
    k = torch.eye(D, dtype=torch.float64)[None, :, None]  # [1, 6, 1, 6]
    v = torch.randn(1, D, 1, 3, dtype=torch.float64)
    ones = torch.ones(1, D, 1, dtype=torch.float64)
    o = bl.gated_delta_attention(k[:, -1:].expand(1, D, 1, D), k, v, ones, ones)
    assert rel_err(o[:, -1], v[:, -1]) < 1e-12


@pytest.mark.parametrize(
    "fn",
    [bl.softmax_attention, bl.linear_attention, bl.mesa_attention, lambda q, k, v: bl.sliding_window_attention(q, k, v, window=2)],
)
def test_bad_input(fn):
    q, k, v = make_qkv(B=1, T=4, H=2, D=4)
    with pytest.raises(TypeError, match="q"):
        fn(q.numpy(), k, v)
    with pytest.raises(ValueError, match="k"):
        fn(q, k[0], v)
    with pytest.raises(ValueError, match="heads"):
        fn(make_qkv(B=1, T=4, H=3, D=4)[0], k, v)


def test_bad_options():
    q, k, v = make_qkv(B=1, T=4, H=2, D=4)
    with pytest.raises(ValueError, match="window"):
        bl.sliding_window_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="feature_map"):
        bl.linear_attention(q, k, v, feature_map="cosh")
    with pytest.raises(ValueError, match="ridge"):
        bl.mesa_attention(q, k, v, ridge=-1.0)
    with pytest.raises(ValueError, match="S == T"):
        bl.linear_attention(q, k[:, :3], v[:, :3])


# ---- mixers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixer_shape_causality_and_grad(name):
    torch.manual_seed(0)
    kw = {"window": 3} if name == "sliding_window" else {}
    mixer = build_mixer(name, d_model=16, num_heads=2, **kw)
    x = torch.randn(2, 10, 16)
    y = mixer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    x2 = x.clone()
    x2[:, 6:] += torch.randn(2, 4, 16)  # change the future
    y2 = mixer(x2)
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-5), "output at t must not depend on inputs after t"
    assert not torch.allclose(y[:, 6:], y2[:, 6:])
    y.square().mean().backward()
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_lla_mixer_is_the_public_op_with_a_learnable_ridge():
    torch.manual_seed(0)
    m = build_mixer("lla", 16, 2, ridge_init=0.7)
    assert torch.allclose(m.ridge, torch.tensor([0.7, 0.7]), atol=1e-6)
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    m = m.double()
    q, k, v = m.qkv_proj(x).view(1, 7, 3, 2, 8).unbind(2)
    ref = lla.local_linear_attention_ref(q, k, v, ridge=m.ridge.detach())
    assert rel_err(m(x), m.o_proj(ref.reshape(1, 7, 16))) < 1e-9
    m(x).sum().backward()
    assert m.raw_ridge.grad is not None and m.raw_ridge.grad.abs().sum() > 0


def test_build_mixer_bad_input():
    with pytest.raises(ValueError, match="mixer"):
        build_mixer("nope", 16, 2)
    with pytest.raises(ValueError, match="num_heads"):
        build_mixer("softmax", 10, 3)
