"""The attention layers (LocalLinearAttention, ParallaxAttention on the shared AttentionLayer base):
equal a direct op call, padding (packed varlen, one op call), cache, learnable ridge, and the
experiments' mixers are these layers."""

from __future__ import annotations

import pytest
import torch

import lla
from lla.experiments.mixers import build_mixer
from lla.nn import KVCache, LocalLinearAttention, ParallaxAttention
from lla.nn.lla import apply_rotary
from lla.nn.base import padded_attention
from conftest import rel_err


def _layer(**kw):
    torch.manual_seed(0)
    args = dict(d_model=32, num_heads=4, num_kv_heads=2, dtype=torch.float64)
    args.update(kw)
    return LocalLinearAttention(**args)


def _x(B=2, T=10, d=32, seed=1):
    return torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_layer_equals_direct_op_call():
    layer = _layer(qk_norm=True, ridge_init=0.7)
    x = _x()
    B, T, _ = x.shape
    q = layer.q_norm(layer.q_proj(x).view(B, T, 4, 8))
    k = layer.k_norm(layer.k_proj(x).view(B, T, 2, 8))
    v = layer.v_proj(x).view(B, T, 2, 8)
    pos = torch.arange(T).expand(B, T)
    q, k = apply_rotary(q, pos), apply_rotary(k, pos)
    o = lla.local_linear_attention_ref(q, k, v, ridge=torch.full((4,), 0.7, dtype=torch.float64))
    expect = layer.o_proj(o.reshape(B, T, 32))
    assert rel_err(layer(x), expect) <= 1e-9
    assert torch.allclose(layer.ridge, torch.full((4,), 0.7, dtype=torch.float64), rtol=1e-12)


def test_rotary_is_relative():
    """Rotary logits depend only on position differences."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64)
    def dot(i, j):
        return (apply_rotary(q, torch.tensor([[i]])) * apply_rotary(k, torch.tensor([[j]]))).sum().item()
    assert abs(dot(5, 2) - dot(13, 10)) < 1e-12
    assert abs(dot(5, 2) - dot(5, 3)) > 1e-6


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_unpadded_sequences(side):
    layer = _layer()
    x = _x(B=3, T=9)
    lengths = [9, 4, 6]
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, 9 - n :] = True
        else:
            mask[b, :n] = True
    out = layer(x, attention_mask=mask)
    for b in range(3):
        alone = layer(x[b : b + 1, mask[b]])
        assert rel_err(out[b, mask[b]], alone[0]) <= 1e-10
        assert torch.equal(out[b, ~mask[b]], torch.zeros_like(out[b, ~mask[b]]))  # no bias: o_proj(0) = 0


def test_cache_prefill_then_decode_equals_full():
    layer = _layer(qk_norm=True)
    x = _x(B=2, T=12)
    full = layer(x)
    cache = KVCache(max_len=4)  # forces the buffers to grow
    outs = [layer(x[:, :5], cache=cache)]
    for t in range(5, 12):
        outs.append(layer(x[:, t : t + 1], cache=cache))
    assert cache.get_seq_length() == 12
    assert rel_err(torch.cat(outs, 1), full) <= 1e-10


def test_cache_with_left_padded_prompt():
    layer = _layer()
    x = _x(B=2, T=10)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :3] = False  # sequence 1: 3 pad tokens, then 3 real prompt tokens
    cache = KVCache()
    first = layer(x[:, :6], attention_mask=mask, cache=cache)
    assert cache.seqlens().tolist() == [6, 3]
    steps = [layer(x[:, t : t + 1], cache=cache) for t in range(6, 10)]
    # sequence 1 alone: its 3 real prompt tokens then the 4 decoded ones
    alone = layer(torch.cat([x[1:2, 3:6], x[1:2, 6:10]], 1))
    got = torch.cat([first[1:2, 3:6]] + [s[1:2] for s in steps], 1)
    assert rel_err(got, alone) <= 1e-10
    assert rel_err(torch.cat([first[:1]] + [s[:1] for s in steps], 1), layer(x[:1])) <= 1e-10


def test_ridge_learnable_positive_and_gradients():
    layer = _layer(ridge_init=0.01, ridge_floor=0.005, dtype=torch.float32)
    with torch.no_grad():
        layer.raw_ridge.fill_(-50.0)
    assert bool((layer.ridge >= 0.005).all()) and bool((layer.ridge > 0).all())
    layer = _layer(dtype=torch.float32)
    x = _x().float()
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert layer.raw_ridge.grad.abs().sum() > 0
    frozen = _layer(learn_ridge=False)
    assert "raw_ridge" not in dict(frozen.named_parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        LocalLinearAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="ridge_init"):
        LocalLinearAttention(32, 4, ridge_init=0.0)
    with pytest.raises(ValueError, match="d_model"):
        LocalLinearAttention(0, 4)
    layer = _layer()
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.zeros(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(_x(), attention_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_len"):
        KVCache(max_len=0)


def test_ridge_is_in_squared_key_units():
    """Scaling q and k by c (logit scale / c^2: same weights) is the ridge divided by c^2: the ridge
    is not dimensionless.  qk_norm takes the projections' scale out, so the floor keeps its meaning."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 7, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    c, lam, scale = 10.0, 0.5, 8**-0.5
    scaled = lla.local_linear_attention_ref(c * q, c * k, v, ridge=lam, scale=scale / c**2)
    assert rel_err(scaled, lla.local_linear_attention_ref(q, k, v, ridge=lam / c**2, scale=scale)) <= 1e-12
    assert rel_err(scaled, lla.local_linear_attention_ref(q, k, v, ridge=lam, scale=scale)) > 1e-3
    x = _x(B=1, T=7)
    for qk_norm, moved in ((True, False), (False, True)):
        layer = _layer(qk_norm=qk_norm, ridge_init=0.5)
        base = layer(x)
        with torch.no_grad():
            layer.k_proj.weight.mul_(c)
            layer.q_proj.weight.div_(c)  # same logits, keys c x larger
        assert (rel_err(layer(x), base) > 1e-3) == moved


@pytest.mark.parametrize("cls", [LocalLinearAttention, ParallaxAttention])
def test_interior_padding_and_padded_chunks_against_the_cache(cls):
    """Interior padding in a prefill chunk and in a later chunk against the cache (each chunk one op
    call, pads written past the filled length): every sequence equals its real tokens run alone."""
    torch.manual_seed(0)
    layer = cls(32, 4, num_kv_heads=2, qk_norm=True, rope=True, dtype=torch.float64)
    if cls is ParallaxAttention:
        torch.nn.init.normal_(layer.r_proj.weight, std=0.1)
    x = _x(B=3, T=13)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[0, [1, 2, 8]] = False  # interior, both chunks
    mask[1, :4] = False  # left padded first chunk
    mask[2, 9:] = False  # last chunk all padding
    out_full = layer(x, attention_mask=mask)
    cache = KVCache(max_len=4)
    out = torch.cat([layer(x[:, :6], attention_mask=mask[:, :6], cache=cache),
                     layer(x[:, 6:9], attention_mask=mask[:, 6:9], cache=cache),
                     layer(x[:, 9:], attention_mask=mask[:, 9:], cache=cache)], 1)
    assert cache.seqlens().tolist() == mask.sum(1).tolist()
    for b in range(3):
        alone = layer(x[b : b + 1, mask[b]])[0]
        assert rel_err(out_full[b, mask[b]], alone) <= 1e-10
        assert rel_err(out[b, mask[b]], alone) <= 1e-10
        assert torch.equal(out[b, ~mask[b]], torch.zeros_like(out[b, ~mask[b]]))


def test_padded_attention_is_one_varlen_call():
    """A padded batch (with an all-padding sequence) is one op call on the packed real tokens, with
    ``cu_seqlens``; it equals each sequence alone."""
    calls = []

    def op(q, k, v, **kw):
        calls.append((q.shape, kw["cu_seqlens"].tolist()))
        return lla.local_linear_attention(q, k, v, **kw)

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(4, 7, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0, 1]]).bool()
    o = padded_attention(op, (q,), k, v, mask, ridge=0.5)
    assert calls == [((1, 16, 2, 8), [0, 7, 12, 16])]
    for b in (0, 1, 3):
        m = mask[b]
        alone = lla.local_linear_attention_ref(q[b : b + 1, m], k[b : b + 1, m], v[b : b + 1, m], ridge=0.5)[0]
        assert rel_err(o[b, m], alone) <= 1e-10
    assert torch.equal(o[~mask], torch.zeros_like(o[~mask]))


@pytest.mark.parametrize("name, cls", [("lla", LocalLinearAttention), ("parallax", ParallaxAttention)])
def test_experiment_mixers_are_the_layers(name, cls):
    """The registry's "lla" / "parallax" mixers are the documented layers (fused qkv, no rotary, the
    experiments' ridge floor 1e-2), with the weights the pre-layer mixers drew from a seed
    (``nn.Linear(d, 3d)``, then ``nn.Linear(d, d)``, then Parallax's zeroed ``r``) and their
    forward: ``qkv(x).view(B, T, 3, H, Dh)`` -> the op -> ``out``."""
    torch.manual_seed(3)
    mixer = build_mixer(name, 32, 2)
    assert isinstance(mixer, cls) and not mixer.rope and mixer.num_kv_heads == 2
    torch.manual_seed(3)
    qkv, out = torch.nn.Linear(32, 96, bias=False), torch.nn.Linear(32, 32, bias=False)
    assert torch.equal(mixer.qkv_proj.weight, qkv.weight) and torch.equal(mixer.o_proj.weight, out.weight)
    x = _x(B=2, T=9).float()
    q, k, v = qkv(x).view(2, 9, 3, 2, 16).unbind(2)
    if name == "lla":
        assert mixer.ridge_floor == 1e-2 and torch.allclose(mixer.ridge, torch.ones(2))
        ridge = torch.nn.functional.softplus(mixer.raw_ridge) + 1e-2
        want = lla.local_linear_attention(q, k, v, ridge=ridge)
    else:
        assert not mixer.r_proj.weight.any()
        want = lla.parallax_attention(q, mixer.r_proj(x).view(2, 9, 2, 16), k, v)
    assert torch.equal(mixer(x), out(want.reshape(2, 9, 32)))


def test_old_names_are_aliases_that_warn():
    import lla.experiments.mixers as mixers

    for old, new in (("LLACache", KVCache), ("MIXERS", mixers.MIXERS), ("build_mixer", mixers.build_mixer)):
        with pytest.warns(DeprecationWarning, match=f"lla.nn.{old} is deprecated"):
            assert getattr(lla.nn, old) is new
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lla.nn.Nope
