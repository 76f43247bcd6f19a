"""Property-based tests: random shapes, ridges, scales and masks against the float64 reference."""

from __future__ import annotations

import warnings

import torch
from conftest import make_qkv, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import lla
from lla.ops.lla.reference import local_linear_attention_ref


@st.composite
def problems(draw):
    Hk = draw(st.integers(1, 2))
    G = draw(st.integers(1, 2))
    T = draw(st.integers(1, 40))
    S = draw(st.one_of(st.just(T), st.integers(1, 40)))
    D = draw(st.sampled_from([1, 2, 5, 16]))
    Dv = draw(st.sampled_from([1, 3, 16]))
    causal = draw(st.booleans())
    left = draw(st.integers(-1, 12))
    right = draw(st.integers(-1, 12))
    ridge = draw(st.floats(0.05, 50.0))
    per_head = draw(st.booleans())
    scale = draw(st.one_of(st.none(), st.floats(0.0, 2.0)))
    solver = draw(st.sampled_from(["cg", "direct", "auto"]))
    seed = draw(st.integers(0, 2**16))
    return dict(B=draw(st.integers(1, 2)), T=T, S=S, H=Hk * G, Hk=Hk, D=D, Dv=Dv, causal=causal,
                window=(left, right), ridge=ridge, per_head=per_head, scale=scale, solver=solver, seed=seed)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_random_problems_match_reference(p):
    q, k, v = make_qkv(p["B"], p["T"], p["H"], p["D"], S=p["S"], Hk=p["Hk"], Dv=p["Dv"], seed=p["seed"])
    ridge = p["ridge"]
    if p["per_head"]:
        ridge = ridge * (1 + torch.arange(p["H"], dtype=torch.float64))
    kw = dict(ridge=ridge, scale=p["scale"], causal=p["causal"], window_size=p["window"])
    ref = local_linear_attention_ref(q, k, v, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # well-posed problems: no convergence warning either
        o = lla.local_linear_attention(q, k, v, solver=p["solver"], backend="torch", **kw)
    assert o.shape == ref.shape
    assert rel_err(o, ref, atol=1e-12) < 1e-8
    o32 = lla.local_linear_attention(q.float(), k.float(), v.float(), solver=p["solver"], backend="torch", **kw)
    assert rel_err(o32, ref, atol=1e-6) < 2e-4
