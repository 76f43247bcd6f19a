"""KV-cache decoding: prefill + token-by-token decode must equal the full forward."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import pytest
import torch

import lla
from conftest import ROOT, make_qkv, rel_err


def _decode_path(monkeypatch, per_sequence):
    """Route a batch's single-token steps one sequence at a time (``_decode_each``) or through the batched
    pass over the span some row sees, whatever the lengths (each mechanism's ``PER_SEQUENCE`` rule)."""
    from lla.ops.lla import decode as lla_decode
    from lla.ops.parallax import decode as parallax_decode

    rule = (0, 2.0) if per_sequence else (1 << 40, 2.0)
    monkeypatch.setattr(lla_decode, "PER_SEQUENCE", rule)
    monkeypatch.setattr(parallax_decode, "PER_SEQUENCE", rule)


PATHS = pytest.mark.parametrize("per_sequence", [False, True], ids=["batched", "per-sequence"])


def _decode_all(q, k, v, prefill, ridge, solver="auto", S_max=None, Hk=None):
    """Run prefill of ``prefill[b]`` tokens per sequence, then decode the rest one token at a time.

    Ragged: sequence ``b`` is processed at its own position; to keep the batch stepping together
    every step feeds each sequence its next token (sequences start at different offsets).
    Returns the outputs at every position, [B, T, H, Dv].
    """
    B, T, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    S_max = S_max or T + 3
    k_cache = torch.full((B, S_max, Hk, D), float("nan"), dtype=q.dtype)  # garbage beyond seqlens
    v_cache = torch.full((B, S_max, Hk, Dv), float("nan"), dtype=q.dtype)
    out = torch.zeros(B, T, H, Dv, dtype=q.dtype)
    # prefill: one chunk per sequence length (call per sequence so each writes its own length)
    seqlens = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        n = prefill[b]
        o = lla.local_linear_attention_with_kvcache(
            q[b : b + 1, :n], k_cache[b : b + 1], v_cache[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n],
            cache_seqlens=seqlens[b : b + 1], ridge=ridge, solver=solver,
        )
        out[b, :n] = o[0]
    seqlens += torch.tensor(prefill, dtype=torch.int32)
    # decode: all sequences step together; position of sequence b is seqlens[b]
    steps = T - min(prefill)
    for _ in range(steps):
        pos = seqlens.long().clamp_max(T - 1)
        live = seqlens < T
        bidx = torch.arange(B)
        o = lla.local_linear_attention_with_kvcache(
            q[bidx, pos][:, None], k_cache, v_cache, k[bidx, pos][:, None], v[bidx, pos][:, None],
            cache_seqlens=seqlens, ridge=ridge, solver=solver,
        )
        out[bidx[live], pos[live]] = o[live, 0]
        seqlens += live.int()
        # finished sequences were fed a repeat token; roll their length back
        done = ~live
        if bool(done.any()):
            seqlens[done] = T
    return out


@pytest.mark.parametrize("H,Hk,D", [(4, 2, 16), (2, 2, 40)])
def test_prefill_then_decode_matches_full_forward(H, Hk, D):
    B, T = 3, 24
    q, k, v = make_qkv(B=B, T=T, H=H, Hk=Hk, D=D, dtype=torch.float32, seed=1)
    ridge = 0.3
    full = lla.local_linear_attention(q, k, v, ridge=ridge, solver="direct")
    out = _decode_all(q, k, v, prefill=[5, 1, 17], ridge=ridge)
    assert rel_err(out, full) <= 1e-5
    ref = lla.local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=ridge)
    assert rel_err(out, ref) <= 1e-5


def test_decode_per_head_ridge_and_dv_float64():
    B, T, H, D = 2, 12, 4, 8
    q, k, v = make_qkv(B=B, T=T, H=H, Hk=1, D=D, Dv=5, dtype=torch.float64, seed=2)
    ridge = torch.tensor([0.05, 0.5, 2.0, 10.0], dtype=torch.float64)
    out = _decode_all(q, k, v, prefill=[3, 7], ridge=ridge)
    ref = lla.local_linear_attention_ref(q, k, v, ridge=ridge)
    assert rel_err(out, ref) <= 1e-10


def test_decode_cg_path_matches():
    q, k, v = make_qkv(B=2, T=10, H=2, D=8, dtype=torch.float32, seed=3)
    out = _decode_all(q, k, v, prefill=[4, 2], ridge=2.0, solver="cg")
    ref = lla.local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=2.0)
    assert rel_err(out, ref) <= 1e-5


def test_chunked_prefill_on_cache_ragged():
    """Chunks of several tokens on top of caches of different lengths (one batched call)."""
    B, T, H, D = 2, 20, 2, 16
    q, k, v = make_qkv(B=B, T=T, H=H, D=D, dtype=torch.float32, seed=4)
    k_cache = torch.zeros(B, 32, H, D)
    v_cache = torch.zeros(B, 32, H, D)
    pre = [6, 11]
    for b in range(B):
        k_cache[b, : pre[b]], v_cache[b, : pre[b]] = k[b, : pre[b]], v[b, : pre[b]]
    seqlens = torch.tensor(pre, dtype=torch.int64)
    n = 5
    bidx = torch.arange(B)[:, None]
    rows = seqlens[:, None] + torch.arange(n)
    o = lla.local_linear_attention_with_kvcache(
        q[bidx, rows], k_cache, v_cache, k[bidx, rows], v[bidx, rows], cache_seqlens=seqlens, ridge=0.5
    )
    full = lla.local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=0.5)
    assert rel_err(o, full[bidx, rows]) <= 1e-5
    # the new keys were written in place
    for b in range(B):
        assert torch.equal(k_cache[b, pre[b] : pre[b] + n], k[b, pre[b] : pre[b] + n])
        assert torch.equal(v_cache[b, pre[b] : pre[b] + n], v[b, pre[b] : pre[b] + n])


def test_decode_without_new_kv_and_empty_cache():
    q, k, v = make_qkv(B=2, T=6, H=2, D=8, dtype=torch.float64, seed=5)
    k_cache, v_cache = k.clone(), v.clone()
    seqlens = torch.tensor([6, 0])
    o = lla.local_linear_attention_with_kvcache(q[:, -1:], k_cache, v_cache, cache_seqlens=seqlens, ridge=1.0)
    ref = lla.local_linear_attention_ref(q[:1, -1:], k[:1], v[:1], ridge=1.0)
    assert rel_err(o[:1], ref) <= 1e-10
    assert torch.equal(o[1], torch.zeros_like(o[1]))


def test_decode_ragged_long_cache_matches_op_and_reference():
    """A ragged single-token step over a long cache (the moment is streamed over key chunks): each
    sequence equals the public op's last row (the same moment / solve code) and the reference."""
    q, k, v = make_qkv(B=2, T=70, H=2, D=8, dtype=torch.float64, seed=6)
    seqlens = torch.tensor([69, 20])
    kc, vc = k.clone(), v.clone()
    bidx = torch.arange(2)
    o = lla.local_linear_attention_with_kvcache(q[bidx, seqlens][:, None], kc, vc, k[bidx, seqlens][:, None],
                                                v[bidx, seqlens][:, None], cache_seqlens=seqlens, ridge=0.2)
    for b, n in enumerate((70, 21)):
        op = lla.local_linear_attention(q[b : b + 1, n - 1 : n], k[b : b + 1, :n], v[b : b + 1, :n], ridge=0.2,
                                        solver="direct", backend="torch")
        ref = lla.local_linear_attention_ref(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], ridge=0.2)[:, -1:]
        assert rel_err(o[b : b + 1], op) <= 1e-12
        assert rel_err(o[b : b + 1], ref) <= 1e-10


def test_decode_bf16_close():
    q, k, v = make_qkv(B=1, T=16, H=2, D=16, dtype=torch.bfloat16, seed=7)
    kc, vc = k.clone(), v.clone()
    o = lla.local_linear_attention_with_kvcache(q[:, -1:], kc, vc, cache_seqlens=16, ridge=1.0)
    ref = lla.local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=1.0)[:, -1:]
    assert o.dtype == torch.bfloat16
    assert rel_err(o, ref) <= 2e-2


def test_bad_arguments():
    q, k, v = make_qkv(B=2, T=4, H=2, D=8, dtype=torch.float32)
    kc, vc = torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8)
    f = lla.local_linear_attention_with_kvcache
    with pytest.raises(ValueError, match="cache_seqlens"):
        f(q, kc, vc, k, v, cache_seqlens=torch.tensor([5, 0]))
    with pytest.raises(TypeError, match="cache_seqlens"):
        f(q, kc, vc, k, v, cache_seqlens=torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="cache_seqlens"):
        f(q, kc, vc, k, v, cache_seqlens=torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="k and v"):
        f(q, kc, vc, k, None, cache_seqlens=0)
    with pytest.raises(ValueError, match="k must have shape"):
        f(q, kc, vc, k[:, :2], v[:, :2], cache_seqlens=0)
    with pytest.raises(ValueError, match="ridge"):
        f(q, kc, vc, k, v, cache_seqlens=0, ridge=-1.0)
    with pytest.raises(TypeError, match="k_cache"):
        f(q, kc.long(), vc, k, v, cache_seqlens=0)
    with pytest.raises(ValueError, match="solver"):
        f(q, kc, vc, k, v, cache_seqlens=0, solver="magic")


def test_decode_step_gradients_match_reference():
    """The single-token path is differentiable (q, the cached keys/values, the ridge)."""
    q, k, v = make_qkv(B=1, T=7, H=2, Hk=1, D=4, dtype=torch.float64, seed=8)
    ridge = torch.tensor([0.4, 1.5], dtype=torch.float64)
    q1, kc, vc, r1 = (t.clone().requires_grad_(True) for t in (q[:, -1:], k, v, ridge))
    o = lla.local_linear_attention_with_kvcache(q1, kc * 1.0, vc * 1.0, cache_seqlens=7, ridge=r1)
    grads = torch.autograd.grad(o.sin().sum(), (q1, kc, vc, r1))
    q2, k2, v2, r2 = (t.clone().requires_grad_(True) for t in (q[:, -1:], k, v, ridge))
    ref = lla.local_linear_attention_ref(q2, k2, v2, ridge=r2)
    want = torch.autograd.grad(ref.sin().sum(), (q2, k2, v2, r2))
    assert rel_err(o, ref) <= 1e-10
    for g, w in zip(grads, want):
        assert rel_err(g, w) <= 1e-9


def _one_token(q, k, v, ridge, **kw):
    """A decoding step of the last query against all of k, v, with the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lla.local_linear_attention_with_kvcache(q, k.clone(), v.clone(), cache_seqlens=k.shape[1], ridge=ridge, **kw)
    return out, [w for w in caught if issubclass(w.category, lla.LLAConvergenceWarning)]


def test_decode_return_aux_and_silent_when_accurate():
    q, k, v = make_qkv(B=2, T=20, H=4, Hk=2, D=16, dtype=torch.float32, seed=11)
    (o, aux), warned = _one_token(q[:, -1:], k, v, 0.5, return_aux=True)
    ref = lla.local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=0.5)[:, -1:]
    assert rel_err(o, ref) <= 1e-5 and not warned
    assert isinstance(aux, lla.LLAAux) and aux.solver == "direct" and aux.iters == 0
    assert 0 <= aux.residual <= 1e-5 and 0 < aux.amplification < 1e3
    logits = torch.einsum("bhd,bshd->bhs", q[:, -1].double(), k.double().repeat_interleave(2, dim=2)) * 16**-0.5
    assert aux.lse.shape == (2, 1, 4) and aux.lse.dtype == torch.float32
    assert rel_err(aux.lse[:, 0], torch.logsumexp(logits, -1)) <= 1e-6
    # chunks (prefill on a cache) report the op's aux
    kc, vc = torch.zeros(2, 24, 2, 16), torch.zeros(2, 24, 2, 16)
    o, aux = lla.local_linear_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=0, ridge=0.5, return_aux=True)
    assert aux.lse.shape == (2, 20, 4) and aux.residual <= 1e-5
    assert rel_err(o, lla.local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=0.5)) <= 1e-5


@pytest.mark.parametrize("mult", [1e3, 1e4])
def test_decode_huge_visible_key_accurate(mult):
    """A huge newest key (x1e3, x1e4) that the query sees: finite, accurate and silent (the output pass
    used to form k_j . x - m . x, which cancels catastrophically: relative errors 29 and 36 at x1e4; the
    isotropic amplification estimate then warned at seeds 1, 2, where the few-row estimate does not)."""
    for seed in range(3):
        q, k, v = make_qkv(B=1, T=32, H=2, D=16, dtype=torch.float32, seed=seed)
        k[:, -1] *= mult
        o, warned = _one_token(q[:, -1:], k, v, 1.0)
        ref = lla.local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=1.0)[:, -1:]
        assert torch.isfinite(o).all()
        assert rel_err(o, ref) <= 1e-5, seed
        assert not warned, seed


@functools.cache
def _decode_numerics():
    spec = importlib.util.spec_from_file_location("decode_numerics", os.path.join(ROOT, "benchmarks", "decode_numerics.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # (its main() runs only as a script)
    return mod


def _extreme_case(D, ridge, mult, where, seed):
    """One case of ``benchmarks/decode_numerics.py`` (its own generator): float32 q [1, 1, 1, D], k, v
    [1, 48, 1, D] (``ridge`` is the case's, used by the caller)."""
    return _decode_numerics()._case(D, mult, where, seed)


def _step_both(case, op):
    """(float32 output, its warnings, float64 output) of the decode step or the op at T = 1 (direct)."""
    q, k, v = _extreme_case(*case)
    ridge = case[1]
    if not op:
        o, warned = _one_token(q, k, v, ridge)
        return o, warned, _one_token(q.double(), k.double(), v.double(), ridge)[0]
    run = lambda *t: lla.local_linear_attention(*t, ridge=ridge, solver="direct", backend="torch")  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o = run(q, k, v)
    warned = [w for w in caught if issubclass(w.category, lla.LLAConvergenceWarning)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return o, warned, run(q.double(), k.double(), v.double())


#: Former silent misses (float32 error 4.9e-3 / 8.4e-3 / 2.0e-3 / 3.5e-3 vs float64, no warning): a row
#: whose weight sits on one key (``s_max`` near 1, not 1) had its pivot's ``eps |k - c| |x|`` rounding of
#: ``y . x`` in every weight, and its weights' sum off 1 by rounding, amplified by ``|x|``.
NEARLY_ONE_HOT = [(4, 1e-3, 10.0, "newest", 0), (4, 1e-3, 100.0, "oldest", 1), (4, 100.0, 1e3, "drift", 1),
                  (64, 1.0, 1e3, "drift", 1)]


@pytest.mark.parametrize("op", [False, True], ids=["decode", "op"])
@pytest.mark.parametrize("case", NEARLY_ONE_HOT)
def test_nearly_one_hot_row_accurate_and_silent(case, op):
    o, warned, ref = _step_both(case, op)
    assert rel_err(o, ref) <= 1e-5
    assert not warned


@pytest.mark.parametrize("op", [False, True], ids=["decode", "op"])
def test_former_silent_miss_is_recomputed_in_float64(op):
    """Drifting keys (x1e3) at ridge 1e-6, D = 16: float32 cannot form this system (the isotropic
    estimate said 3e-5 and stayed silent at 2e-2 relative error; then it warned).  Its rounding floor
    is past ``HOPELESS_RESIDUAL``, so the row is recomputed in float64 from its own keys, in the
    decode step as in the op: accurate, and silent."""
    o, warned, ref = _step_both((16, 1e-6, 1e3, "drift", 0), op)
    assert rel_err(o, ref) <= 1e-6
    assert not warned


#: Former false alarms (warned, error < 1e-4): accurate and now silent.
FORMER_FALSE_ALARMS = [(16, 1e-3, 10.0, "newest", 1), (16, 1e-6, 10.0, "newest", 1), (4, 1.0, 1e3, "drift", 0),
                       (16, 0.1, 1e3, "newest", 1)]


@pytest.mark.parametrize("op", [False, True], ids=["decode", "op"])
@pytest.mark.parametrize("case", FORMER_FALSE_ALARMS)
def test_clean_case_silent(case, op):
    o, warned, ref = _step_both(case, op)
    assert rel_err(o, ref) < 1e-4  # the grid's "no alarm needed" line
    assert not warned


@pytest.mark.parametrize("mult", [1.0, 1e3])
def test_decode_reports_what_the_op_reports(mult):
    """One decode numerics: the single-token step and the public op on the same row (PyTorch backend,
    direct solve) give the same output, lse, residual and amplification, and warn alike."""
    q, k, v = make_qkv(B=2, T=24, H=4, Hk=2, D=16, dtype=torch.float32, seed=3)
    k[:, -1] *= mult
    (o, aux), warned = _one_token(q[:, -1:], k, v, 0.7, return_aux=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o_op, aux_op = lla.local_linear_attention(q[:, -1:], k, v, ridge=0.7, solver="direct", backend="torch",
                                                  return_aux=True)
    assert rel_err(o, o_op) <= 1e-6 and rel_err(aux.lse, aux_op.lse) <= 1e-6
    # the few-row estimate includes the measured residual (rounding-level, from differently blocked GEMMs)
    assert aux.amplification == pytest.approx(aux_op.amplification, rel=0.25)
    assert aux.residual <= 10 * max(aux_op.residual, 1e-7)
    assert bool(warned) == any(issubclass(w.category, lla.LLAConvergenceWarning) for w in caught)


def test_decode_tiny_ridge_float32_is_accurate():
    """Tiny ridges in float32: the single-token solve used to stay silent (and redo a failed Cholesky
    in float64 without a word), then it warned at 1e-3 .. 1e-1 error; now the rows float32 cannot solve
    are recomputed in float64 (the op's rule, ``HOPELESS_RESIDUAL``): finite, accurate, silent."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 1, 64, generator=g, dtype=torch.float64) for n in (1, 48, 48))
    for ridge in (1e-6, 1e-8):  # 1e-8: float32 Cholesky of this system fails
        o, warned = _one_token(q.float(), k.float(), v.float(), ridge)
        ref, _ = _one_token(q, k, v, ridge)
        assert torch.isfinite(o).all()
        assert rel_err(o, ref) <= 1e-6 and not warned


@pytest.mark.parametrize("mult", [1e3, 1e4])
def test_decode_keys_a_row_cannot_see_change_nothing(mult):
    """Locality: huge keys past a sequence's length, in another sequence, in another key head, or
    before the window leave a row's output unchanged (and finite)."""
    B, S_max, H, Hk, D = 3, 24, 4, 2, 16
    q, k, v = make_qkv(B=B, T=S_max, H=H, Hk=Hk, D=D, dtype=torch.float32, seed=12)
    lens = torch.tensor([10, 20, 24])
    q1 = q[:, -1:]
    for window in ((-1, -1), (5, -1)):
        base = lla.local_linear_attention_with_kvcache(q1, k.clone(), v.clone(), cache_seqlens=lens, ridge=0.5, window_size=window)
        k2 = k.clone()
        k2[0, 10:] *= mult  # past sequence 0's length
        k2[1, :, 1] *= mult  # sequence 1, key head 1 (query heads 2, 3)
        if window[0] >= 0:
            k2[2, : 24 - 6] *= mult  # before sequence 2's window of 6 entries
        out = lla.local_linear_attention_with_kvcache(q1, k2, v.clone(), cache_seqlens=lens, ridge=0.5, window_size=window)
        assert torch.isfinite(out).all()
        assert rel_err(out[0], base[0]) <= 1e-5
        assert rel_err(out[1, :, :2], base[1, :, :2]) <= 1e-5
        if window[0] >= 0:
            assert rel_err(out[2], base[2]) <= 1e-5


def test_decode_and_chunks_with_window_match_reference():
    q, k, v = make_qkv(B=2, T=14, H=2, D=8, dtype=torch.float64, seed=13)
    ref = lla.local_linear_attention_ref(q, k, v, ridge=0.4, window_size=(3, 0))
    out = lla.local_linear_attention_with_kvcache(q[:, -1:], k.clone(), v.clone(), cache_seqlens=14, ridge=0.4, window_size=(3, -1))
    assert rel_err(out, ref[:, -1:]) <= 1e-10
    kc, vc = torch.zeros(2, 16, 2, 8, dtype=torch.float64), torch.zeros(2, 16, 2, 8, dtype=torch.float64)
    kc[:, :9], vc[:, :9] = k[:, :9], v[:, :9]
    out = lla.local_linear_attention_with_kvcache(q[:, 9:], kc, vc, k[:, 9:], v[:, 9:], cache_seqlens=9, ridge=0.4, window_size=(3, -1))
    assert rel_err(out, ref[:, 9:]) <= 1e-10
    with pytest.raises(ValueError, match="window_size"):
        lla.local_linear_attention_with_kvcache(q[:, -1:], k, v, cache_seqlens=14, window_size=(-2, 0))


# ------------------------------------------------------------------------------ cache_batch_idx
def _kv_ops(parallax):
    """(op, extra positional args for q) for LLA or Parallax's KV-cache op."""
    if parallax:
        return lambda q, *a, **kw: lla.parallax_attention_with_kvcache(q, q.flip(-1) * 0.3, *a, **kw)
    return lambda q, *a, **kw: lla.local_linear_attention_with_kvcache(q, *a, ridge=0.5, **kw)


@PATHS
@pytest.mark.parametrize("parallax", [False, True], ids=["lla", "parallax"])
@pytest.mark.parametrize("T_new, window", [(1, (-1, -1)), (1, (4, -1)), (3, (-1, -1)), (3, (2, -1))])
def test_cache_batch_idx_reads_and_writes_its_rows(monkeypatch, parallax, T_new, window, per_sequence):
    """Batch element b uses cache row cache_batch_idx[b]: the same output as caches gathered to the
    batch, new entries land in those rows only, the other rows are untouched."""
    _decode_path(monkeypatch, per_sequence)
    op = _kv_ops(parallax)
    B_cache, S_max, H, Hk, D = 4, 16, 4, 2, 8
    g = torch.Generator().manual_seed(21)
    kc = torch.randn(B_cache, S_max, Hk, D, generator=g, dtype=torch.float64)
    vc = torch.randn(B_cache, S_max, Hk, D, generator=g, dtype=torch.float64)
    q = torch.randn(2, T_new, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, T_new, Hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, T_new, Hk, D, generator=g, dtype=torch.float64)
    idx = torch.tensor([3, 1], dtype=torch.int32)
    seqlens = torch.tensor([9, 5])  # ragged: the chunk goes through the packed varlen call
    kc1, vc1 = kc.clone(), vc.clone()
    o = op(q, kc1, vc1, k, v, cache_seqlens=seqlens, cache_batch_idx=idx, window_size=window)
    kc2, vc2 = kc[idx.long()].clone(), vc[idx.long()].clone()
    want = op(q, kc2, vc2, k, v, cache_seqlens=seqlens, window_size=window)
    assert rel_err(o, want) <= 1e-13
    assert torch.equal(kc1[idx.long()], kc2) and torch.equal(vc1[idx.long()], vc2)  # written where they belong
    assert torch.equal(kc1[[0, 2]], kc[[0, 2]]) and torch.equal(vc1[[0, 2]], vc[[0, 2]])  # the rest untouched
    # and against the reference: sequence b is its row's first seqlens[b] entries plus the new ones
    for b in range(2):
        n = int(seqlens[b]) + T_new
        K, V = kc2[b : b + 1, :n], vc2[b : b + 1, :n]
        if parallax:
            ref = lla.parallax_attention_ref(q[b : b + 1], q[b : b + 1].flip(-1) * 0.3, K, V, window_size=window)
        else:
            ref = lla.local_linear_attention_ref(q[b : b + 1], K, V, ridge=0.5, window_size=window)
        assert rel_err(o[b : b + 1], ref) <= 1e-10


@pytest.mark.parametrize("parallax", [False, True], ids=["lla", "parallax"])
def test_cache_batch_idx_bad_arguments(parallax):
    op = _kv_ops(parallax)
    q = torch.randn(2, 1, 2, 8)
    k, v = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    kc, vc = torch.zeros(3, 8, 2, 8), torch.zeros(3, 8, 2, 8)
    with pytest.raises(ValueError, match="pass cache_batch_idx"):
        op(q, kc, vc, k, v, cache_seqlens=0)
    with pytest.raises(ValueError, match=r"cache_batch_idx must lie in \[0, 3\)"):
        op(q, kc, vc, k, v, cache_seqlens=0, cache_batch_idx=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="must not repeat"):
        op(q, kc, vc, k, v, cache_seqlens=0, cache_batch_idx=torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="cache_batch_idx must be an int32/int64"):
        op(q, kc, vc, k, v, cache_seqlens=0, cache_batch_idx=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"cache_batch_idx must have shape \[B\]"):
        op(q, kc, vc, k, v, cache_seqlens=0, cache_batch_idx=torch.tensor([0, 1, 2]))
    # reading the same row twice (no new entries) is fine
    o = op(q, kc, vc, cache_seqlens=0, cache_batch_idx=torch.tensor([1, 1]))
    assert torch.equal(o, torch.zeros_like(o))


@pytest.mark.parametrize("parallax", [False, True], ids=["lla", "parallax"])
def test_new_keys_are_written_detached(parallax):
    """No gradient flows through the cache: the written entries carry no graph, and the output does
    not depend on k, v through it (it does on q and on a cache that requires grad)."""
    op = _kv_ops(parallax)
    q, k, v = make_qkv(B=1, T=6, H=2, D=8, dtype=torch.float64, seed=22, requires_grad=True)
    kc = torch.zeros(1, 8, 2, 8, dtype=torch.float64)
    vc = torch.zeros(1, 8, 2, 8, dtype=torch.float64)
    o = op(q[:, :1], kc, vc, k[:, :1], v[:, :1], cache_seqlens=0)
    assert kc.grad_fn is None and not kc.requires_grad
    gq, gk, gv = torch.autograd.grad(o.sum(), (q, k, v), allow_unused=True)
    assert gk is None and gv is None and gq is not None


# ------------------------------------------------------------------------------ locality, no float64 rescue
@PATHS
@pytest.mark.parametrize("mult", [1e4, 1e6])
@pytest.mark.parametrize("window", [(-1, -1), (6, -1)])
def test_ragged_locality_without_float64_rescue(monkeypatch, mult, window, per_sequence):
    """Locality in a ragged batch with the float64 rescue switched off: a huge key just past sequence 0's
    length (in its own cache row) and at the same entry of sequence 1 (which sees it) leave sequence 0's
    output, shift and moments as they are without them, to rounding (its pivot, shift and statistics come
    only from the keys it sees), and accurate against the float64 reference on its own entries."""
    from lla.ops.lla import decode

    monkeypatch.setattr(decode, "_hopeless_rows", lambda solver, res, fl: torch.zeros_like(res, dtype=torch.bool))
    _decode_path(monkeypatch, per_sequence)
    B, S_max, H, Hk, D = 2, 40, 4, 2, 16
    q, k, v = make_qkv(B=B, T=S_max, H=H, Hk=Hk, D=D, dtype=torch.float32, seed=31)
    lens = torch.tensor([10, 40])
    q1 = q[:, -1:]
    clean = lla.local_linear_attention_with_kvcache(q1, k.clone(), v.clone(), cache_seqlens=lens, ridge=0.5,
                                                    window_size=window)
    k2 = k.clone()
    k2[0, 10] *= mult  # just past sequence 0's length
    k2[1, 10] *= mult  # sequence 1 sees it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sequence 1 may be ill-conditioned: not the point here
        out = lla.local_linear_attention_with_kvcache(q1, k2, v.clone(), cache_seqlens=lens, ridge=0.5,
                                                      window_size=window)
    assert torch.isfinite(out[0]).all()
    assert rel_err(out[0], clean[0]) <= 1e-6
    ref = lla.local_linear_attention_ref(q1[:1].double(), k[:1, :10].double(), v[:1, :10].double(), ridge=0.5,
                                         window_size=(window[0], 0) if window[0] >= 0 else (-1, -1))
    assert rel_err(out[0:1], ref) <= 1e-5


# ------------------------------------------------------------------------------ the chunked single-token steps
def _small_chunks(monkeypatch, n=8):
    """Force chunks of ``n`` keys (several chunks, partly hidden ones) in the single-token steps."""
    from lla.ops.common import kvcache
    from lla.ops.parallax import decode as parallax_decode

    monkeypatch.setattr(kvcache, "CHUNK_ELEMS", 1)
    monkeypatch.setattr(kvcache, "MIN_CHUNK", n)
    monkeypatch.setattr(parallax_decode, "VIEW_CHUNK", n)


@PATHS
@pytest.mark.parametrize("parallax", [False, True], ids=["lla", "parallax"])
@pytest.mark.parametrize("H,Hk,window", [(4, 4, (-1, -1)), (4, 2, (-1, -1)), (4, 1, (7, -1)), (2, 2, (30, -1))])
def test_chunked_step_matches_whole_span_step(monkeypatch, parallax, H, Hk, window, per_sequence):
    """The chunked, no-grad single-token step (ragged batch, cache_batch_idx, NaN garbage past the lengths,
    chunks of 8 keys, some of them partly hidden) equals the whole-span differentiable step (the numerics
    before the chunking) and the float64 reference on each sequence's own entries."""
    _small_chunks(monkeypatch)
    g = torch.Generator().manual_seed(41)
    B_cache, S_max, D = 4, 45, 16
    kc = torch.randn(B_cache, S_max, Hk, D, generator=g)
    vc = torch.randn(B_cache, S_max, Hk, D, generator=g)
    idx = torch.tensor([2, 0, 3])
    lens = torch.tensor([37, 9, 44])
    for b, n in zip(idx.tolist(), lens.tolist()):
        kc[b, n:], vc[b, n:] = float("nan"), float("nan")
    q = torch.randn(3, 1, H, D, generator=g)
    r = torch.randn(3, 1, H, D, generator=g) * 0.3
    if parallax:
        step = lambda q, kc, vc: lla.parallax_attention_with_kvcache(  # noqa: E731
            q, r, kc, vc, cache_seqlens=lens, cache_batch_idx=idx, window_size=window)
    else:
        step = lambda q, kc, vc: lla.local_linear_attention_with_kvcache(  # noqa: E731
            q, kc, vc, cache_seqlens=lens, cache_batch_idx=idx, ridge=0.3, window_size=window)
    fast = step(q, kc, vc)
    slow = step(q.clone().requires_grad_(True), kc, vc).detach()  # a gradient needed: the whole-span path
    assert torch.isfinite(fast).all()
    assert rel_err(fast, slow) <= 1e-6
    for i, (b, n) in enumerate(zip(idx.tolist(), lens.tolist())):
        K, V = kc[b : b + 1, :n].double(), vc[b : b + 1, :n].double()
        w = (window[0], 0) if window[0] >= 0 else (-1, -1)
        if parallax:
            ref = lla.parallax_attention_ref(q[i : i + 1].double(), r[i : i + 1].double(), K, V, window_size=w)
        else:
            ref = lla.local_linear_attention_ref(q[i : i + 1].double(), K, V, ridge=0.3, window_size=w)
        assert rel_err(fast[i : i + 1], ref) <= 1e-5


@PATHS
def test_chunked_step_float64_and_aux_match_whole_span(monkeypatch, per_sequence):
    """float64: the chunked step equals the whole-span step to 1e-12; with return_aux the reported lse,
    residual and amplification are the same estimates (the amplification up to the measured residual it
    includes, as in ``test_decode_reports_what_the_op_reports``)."""
    _small_chunks(monkeypatch)
    _decode_path(monkeypatch, per_sequence)
    q, k, v = make_qkv(B=2, T=40, H=4, Hk=2, D=8, dtype=torch.float64, seed=42)
    lens = torch.tensor([40, 23])
    f = lambda q: lla.local_linear_attention_with_kvcache(  # noqa: E731
        q, k.clone(), v.clone(), cache_seqlens=lens, ridge=0.2, return_aux=True)
    o, aux = f(q[:, -1:])
    o2, aux2 = f(q[:, -1:].clone().requires_grad_(True))
    assert rel_err(o, o2.detach()) <= 1e-12
    assert rel_err(aux.lse, aux2.lse) <= 1e-12
    # the few-row estimate includes the measured residual (rounding-level, from differently blocked GEMMs)
    assert aux.amplification == pytest.approx(aux2.amplification, rel=0.25)
    assert aux.residual <= 10 * max(aux2.residual, 1e-15)


@pytest.mark.parametrize("case", NEARLY_ONE_HOT + FORMER_FALSE_ALARMS + [(16, 1e-6, 1e3, "drift", 0), (64, 1e-6, 1e4, "newest", 1),
                                  (16, 1e-3, 1e4, "oldest", 0), (4, 1e-6, 1e3, "drift", 1)])
def test_warnings_same_with_and_without_aux(case):
    """Without return_aux the conditioning estimate may be replaced by a cheap upper bound when that bound
    cannot warn: the step warns exactly when it does with return_aux (the estimate itself), and the
    outputs are identical."""
    q, k, v = _extreme_case(*case)
    o1, w1 = _one_token(q, k, v, case[1])
    (o2, _aux), w2 = _one_token(q, k, v, case[1], return_aux=True)
    assert torch.equal(o1, o2)
    assert bool(w1) == bool(w2)


def _peak_extra_bytes(fn):
    """Peak growth of the C allocator's in-use bytes (glibc ``mallinfo2``: arenas + mmapped blocks) over one
    call of ``fn``, read after every aten op (``TorchDispatchMode``); None where ``mallinfo2`` is missing.
    (A temporary allocated and freed inside one aten kernel is not seen.)"""
    import ctypes

    from torch.utils._python_dispatch import TorchDispatchMode

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use():
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    class Peak(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    for f in (lambda: torch.ones(2) + 1, fn):  # the first use of a dispatch mode allocates for itself
        mode = Peak()
        with mode:
            mode.peak = base = in_use()
            f()
    return mode.peak - base


@pytest.mark.parametrize("parallax,aux", [(False, False), (False, True), (True, False)], ids=["lla", "lla-aux", "parallax"])
def test_decode_step_memory_at_32k(parallax, aux):
    """A decoding step on a 32K cache (B 1, H = Hk = 8, D 64: a 64 MiB key cache) allocates at most 1/8 of
    the key cache at its peak (no copy of the cache; chunks and O(S) weights only), with and without aux."""
    S, H, D = 32768, 8, 64
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (many small parallel ops crawl on a loaded 2-core machine; the bytes are the same)
    try:
        _check_step_memory(S, H, D, parallax, aux)
    finally:
        torch.set_num_threads(threads)


def _check_step_memory(S, H, D, parallax, aux):
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(1, S, H, D, generator=g), torch.randn(1, S, H, D, generator=g)
    q, k, v = (torch.randn(1, 1, H, D, generator=g) for _ in range(3))
    seqlens = torch.tensor([S - 1])
    if parallax:
        step = lambda: lla.parallax_attention_with_kvcache(q, q * 0.1, kc, vc, k, v, cache_seqlens=seqlens)  # noqa: E731
    else:
        step = lambda: lla.local_linear_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens,  # noqa: E731
                                                               ridge=1.0, return_aux=aux)
    step()  # one-off allocations (thread pools, LAPACK workspaces) are not the step's
    peak = _peak_extra_bytes(step)
    if peak is None:
        pytest.skip("glibc mallinfo2 not available")
    key_cache = kc.numel() * kc.element_size()
    assert peak <= key_cache / 8, f"peak extra {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("window", [(-1, -1), (5, -1)])
def test_parallax_chunked_pass_with_several_rows_matches_op_and_reference(monkeypatch, window):
    """The chunked pass with T_new = 6 rows per head (``_attend_chunked``; chunks of 8 keys, NaN garbage past
    the lengths, ragged caches) equals the public op (which prefill chunks take) and the reference."""
    from lla.ops.parallax.decode import _attend_chunked

    _small_chunks(monkeypatch)
    g = torch.Generator().manual_seed(43)
    B, S_max, H, Hk, D, T = 2, 40, 4, 2, 8, 6
    kc = torch.randn(B, S_max, Hk, D, generator=g, dtype=torch.float64)
    vc = torch.randn(B, S_max, Hk, D, generator=g, dtype=torch.float64)
    pre = torch.tensor([21, 9])
    for b, n in enumerate(pre.tolist()):
        kc[b, n:], vc[b, n:] = float("nan"), float("nan")
    q, r = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, T, Hk, D, generator=g, dtype=torch.float64) for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()
    op = lla.parallax_attention_with_kvcache(q, r, kc2, vc2, k, v, cache_seqlens=pre, window_size=window)
    fast = _attend_chunked(q, r, kc2, vc2, None, pre + T, D**-0.5, window[0])
    assert rel_err(fast, op) <= 1e-12
    for b, n in enumerate(pre.tolist()):
        K = torch.cat([kc[b : b + 1, :n], k[b : b + 1]], 1)
        V = torch.cat([vc[b : b + 1, :n], v[b : b + 1]], 1)
        ref = lla.parallax_attention_ref(q[b : b + 1], r[b : b + 1], K, V, window_size=(window[0], 0) if window[0] >= 0 else window)
        assert rel_err(fast[b : b + 1], ref) <= 1e-10


@pytest.mark.parametrize("parallax", [False, True], ids=["lla", "parallax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sequence_step_equals_batched_step(monkeypatch, parallax, dtype):
    """One sequence at a time (``_decode_each``: each row's exact span read in place, in chunks of 8 keys, a
    bf16 cache converted chunk by chunk) equals the batched pass on a ragged batch with an empty sequence,
    ``cache_batch_idx`` and NaN garbage past the lengths, with the same warnings; LLA's combined report is
    the worst over the sequences (each sequence's own call: lse, residual, amplification) and equals the
    batched one to rounding."""
    _small_chunks(monkeypatch)
    g = torch.Generator().manual_seed(44)
    B_cache, S_max, H, Hk, D = 5, 50, 4, 2, 16
    kc = torch.randn(B_cache, S_max, Hk, D, generator=g).to(dtype)
    vc = torch.randn(B_cache, S_max, Hk, D, generator=g).to(dtype)
    idx = torch.tensor([2, 0, 1, 4])
    lens = torch.tensor([13, 0, 31, 50])
    ridge = torch.tensor([0.3, 0.3, 0.3, 1e-3])[:, None, None].expand(4, 1, H)  # the last: the largest amplification
    for b, n in zip(idx.tolist(), lens.tolist()):
        kc[b, n:], vc[b, n:] = float("nan"), float("nan")
    q, r = (torch.randn(4, 1, H, D, generator=g).to(dtype) for _ in range(2))

    def step(b=slice(None)):
        if parallax:
            return lla.parallax_attention_with_kvcache(q[b], r[b], kc, vc, cache_seqlens=lens[b], cache_batch_idx=idx[b])
        return lla.local_linear_attention_with_kvcache(q[b], kc, vc, cache_seqlens=lens[b], cache_batch_idx=idx[b],
                                                      ridge=ridge[b], return_aux=True)

    outs = []
    for per_sequence in (False, True):
        _decode_path(monkeypatch, per_sequence)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = step()
        outs.append((out, sorted(str(w.message)[:60] for w in caught)))
    (batched, warned_b), (each, warned_e) = outs
    assert warned_b == warned_e
    if not parallax:
        (batched, aux_b), (each, aux_e) = batched, each
        singles = [step(slice(b, b + 1))[1] for b in range(4)]  # one sequence per call: the per-sequence step's parts
        assert torch.equal(aux_e.lse, torch.cat([a.lse for a in singles]))
        assert bool((aux_e.lse[1] == float("-inf")).all())
        assert aux_e.residual == max(a.residual for a in singles)
        assert aux_e.amplification == max(a.amplification for a in singles) == singles[3].amplification
        assert singles[3].amplification > max(a.amplification for a in singles[:3])
        live = lens > 0
        assert torch.allclose(aux_e.lse[live], aux_b.lse[live], rtol=1e-6, atol=1e-6)
        assert max(aux_e.residual, aux_b.residual) <= 1e-5  # rounding-level in both (differently blocked GEMMs)
        assert aux_e.amplification == pytest.approx(aux_b.amplification, rel=0.25)
    assert torch.isfinite(each).all() and bool((each[1] == 0).all())
    assert rel_err(each.float(), batched.float()) <= 1e-6


def test_sequence_spans_rule():
    """``sequence_spans``: each batch element's cache row and visible entries (window, ``cache_batch_idx``),
    and the rule: one sequence at a time from ``min_keys`` entries at equal lengths, sooner with padding."""
    from lla.ops.common.kvcache import sequence_spans

    rule = (512, 2.2)
    assert sequence_spans(torch.tensor([600, 600]), None, -1, rule) == [(0, 0, 600), (1, 0, 600)]
    assert sequence_spans(torch.tensor([500, 500]), None, -1, rule) is None  # equal and short: batched
    # ragged: the batched pass covers 0..568 for every row; 2.2 * 568 - 316 >= 1.2 * 512
    lens = torch.tensor([64, 568])
    assert sequence_spans(lens, torch.tensor([3, 1]), -1, rule) == [(3, 0, 64), (1, 0, 568)]
    assert sequence_spans(torch.tensor([8, 136]), None, -1, rule) is None  # ragged but short: batched
    # a window: row b sees lens[b] - 1 - left .. lens[b]; the batched span is 400..1000
    assert sequence_spans(torch.tensor([1000, 700]), None, 299, (256, 2.0)) == [(0, 700, 1000), (1, 400, 700)]
    # 100 entries each: per sequence when the windows lie apart (the batched span 600..1000 is mostly padding),
    # batched when they overlap (890..1000)
    assert sequence_spans(torch.tensor([1000, 700]), None, 99, (256, 2.0)) == [(0, 900, 1000), (1, 600, 700)]
    assert sequence_spans(torch.tensor([1000, 990]), None, 99, (256, 2.0)) is None
    assert sequence_spans(torch.zeros(0, dtype=torch.long), None, -1, rule) is None
