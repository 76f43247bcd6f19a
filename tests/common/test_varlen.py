"""flash-attn-style varlen: packed sequences with their own query and key lengths.

Every case packs sequences whose query and key counts differ (a prefill against a cached prefix,
``S_b > T_b``; more queries than keys, ``S_b < T_b``, whose first rows see nothing; an empty query
sequence; an empty key sequence) and checks the packed call against each sequence run alone,
forward and every gradient, for LLA and Parallax.  The PyTorch backend runs here; the Triton
kernels run the same checks under the interpreter in one subprocess (``python tests/common/test_varlen.py
--triton``; the interpreter must be switched on before triton is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if __name__ == "__main__":  # run as a script (the interpreter check): tests/ on the path, for conftest
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lla  # noqa: E402
from conftest import rel_err, subprocess_env  # noqa: E402


#: (queries, keys) per packed sequence
LENGTHS = [(3, 7), (0, 4), (5, 5), (6, 2), (1, 9), (2, 0)]


def _packed(lengths, H=2, Hk=1, D=16, dtype=torch.float64, seed=0, parallax=False):
    """Packed ``q [1, total_q, H, D]`` (and ``r``), ``k, v [1, total_k, Hk, D]``, a per-position ridge,
    and the int64 offsets."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(t for t, _ in lengths), sum(s for _, s in lengths)
    q = torch.randn(1, tq, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, tk, Hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, tk, Hk, D, generator=g, dtype=torch.float64)
    extra = torch.randn(1, tq, H, D, generator=g, dtype=torch.float64) * 0.3 if parallax else \
        0.2 + torch.rand(1, tq, H, generator=g, dtype=torch.float64)
    cu_q = torch.tensor([0] + [t for t, _ in lengths]).cumsum(0)
    cu_k = torch.tensor([0] + [s for _, s in lengths]).cumsum(0)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, extra)], cu_q, cu_k


def _run(parallax, q, k, v, extra, **kw):
    if parallax:
        return lla.parallax_attention(q, extra, k, v, **kw)
    return lla.local_linear_attention(q, k, v, ridge=extra, **kw)


def _out_and_grads(parallax, x, do, **kw):
    o = _run(parallax, *x, **kw)
    return [o.detach()] + [g if g is not None else torch.zeros_like(t)
                           for g, t in zip(torch.autograd.grad(o, x, do, allow_unused=True), x)]


def _alone(parallax, x, do, cu_q, cu_k, **kw):
    """Each sequence run alone (an empty query sequence skipped, an empty key sequence zeros), the
    results and gradients put back in packed order."""
    q, k, v, extra = x
    out = [torch.zeros(1, q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype)] + [torch.zeros_like(t) for t in x]
    for (a, b), (c, d) in zip(zip(cu_q.tolist(), cu_q[1:].tolist()), zip(cu_k.tolist(), cu_k[1:].tolist())):
        if b == a or d == c:
            continue
        xs = [q[:, a:b], k[:, c:d], v[:, c:d], extra[:, a:b]]
        o, gq, gk, gv, ge = _out_and_grads(parallax, xs, do[:, a:b], **kw)
        out[0][:, a:b], out[1][:, a:b], out[4][:, a:b] = o, gq, ge
        out[2][:, c:d] += gk
        out[3][:, c:d] += gv
    return out


def _reference_alone(parallax, x, do, cu_q, cu_k, causal, window_size):
    """The float64 reference, each sequence alone."""
    def ref(q, k, v, extra, **kw):
        if parallax:
            return lla.parallax_attention_ref(q, extra, k, v, **kw)
        return lla.local_linear_attention_ref(q, k, v, ridge=extra, **kw)

    x64 = [t.detach().double().requires_grad_() for t in x]
    q, k, v, extra = x64
    out = [torch.zeros(1, q.shape[1], q.shape[2], v.shape[3], dtype=torch.float64)] + [torch.zeros_like(t) for t in x64]
    for (a, b), (c, d) in zip(zip(cu_q.tolist(), cu_q[1:].tolist()), zip(cu_k.tolist(), cu_k[1:].tolist())):
        if b == a or d == c:
            continue
        xs = [q[:, a:b], k[:, c:d], v[:, c:d], extra[:, a:b]]
        o = ref(*xs, causal=causal, window_size=window_size)
        grads = torch.autograd.grad(o, xs, do[:, a:b].double())
        out[0][:, a:b], out[1][:, a:b], out[4][:, a:b] = o.detach(), grads[0], grads[3]
        out[2][:, c:d] += grads[1]
        out[3][:, c:d] += grads[2]
    return out


CASES = [(True, (-1, -1)), (True, (2, -1)), (False, (-1, -1)), (False, (2, 3))]


def check_packed_equals_alone(parallax, backend, dtype, tol_alone, tol_ref, offsets_dtype=torch.int64):
    """The whole check, for one op and backend; returns the worst errors (for the subprocess report)."""
    worst_alone = worst_ref = 0.0
    for seed, (causal, window) in enumerate(CASES):
        x, cu_q, cu_k = _packed(LENGTHS, dtype=dtype, seed=seed, parallax=parallax)
        do = torch.randn(1, x[0].shape[1], x[0].shape[2], x[2].shape[3], dtype=torch.float64,
                         generator=torch.Generator().manual_seed(100 + seed)).to(dtype)
        kw = dict(causal=causal, window_size=window, backend=backend)
        got = _out_and_grads(parallax, x, do, cu_seqlens_q=cu_q.to(offsets_dtype), cu_seqlens_k=cu_k.to(offsets_dtype),
                             max_seqlen_q=6, max_seqlen_k=9, **kw)
        alone = _alone(parallax, x, do, cu_q, cu_k, **kw)
        ref = _reference_alone(parallax, x, do, cu_q, cu_k, causal, window)
        names = ("o", "dq", "dk", "dv", "dr" if parallax else "dridge")
        for name, g, a, r in zip(names, got, alone, ref):
            e_alone, e_ref = rel_err(g, a), rel_err(g, r)
            assert e_alone <= tol_alone, (name, causal, window, e_alone)
            assert e_ref <= tol_ref, (name, causal, window, e_ref)
            worst_alone, worst_ref = max(worst_alone, e_alone), max(worst_ref, e_ref)
        # rows that see no key output zeros: an empty key sequence's, and (causal) a sequence's first
        # T_b - S_b rows
        blind = torch.cat([torch.arange(t) < (t - s if causal else t * (s == 0)) for t, s in LENGTHS])
        assert blind.any() and torch.equal(got[0][:, blind], torch.zeros_like(got[0][:, blind]))
    return worst_alone, worst_ref


@pytest.mark.parametrize("parallax", [False, True], ids=["lla", "parallax"])
@pytest.mark.parametrize("offsets_dtype", [torch.int64, torch.int32])
def test_packed_cross_attention_equals_each_sequence_alone_torch(parallax, offsets_dtype):
    check_packed_equals_alone(parallax, "torch", torch.float64, 1e-12, 1e-9, offsets_dtype)


def test_packed_cross_attention_triton_interpreter():
    """LLA and Parallax Triton kernels (interpreter, float32): packed equals each sequence alone and the
    reference, forward and every gradient."""
    pytest.importorskip("triton")
    env = subprocess_env(TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--triton"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (True, (1, -1)), (False, (-1, -1)), (False, (2, 0)),
                                            (False, (0, 3))])
def test_row_ranges_of_packed_cross_attention(causal, window):
    """The Triton kernels' per-row key ranges (and per-key query ranges) from two offset arrays equal the
    block-diagonal mask of the sequences' own bottom-right masks; the bounds never decrease."""
    pytest.importorskip("triton")
    from lla.ops.common.masks import visible_mask
    from lla.ops.common.varlen import Varlen, row_ranges

    lengths = LENGTHS + [(4, 1), (0, 0), (3, 3)]
    cu_q = torch.tensor([0] + [t for t, _ in lengths]).cumsum(0)
    cu_k = torch.tensor([0] + [s for _, s in lengths]).cumsum(0)
    T, S = int(cu_q[-1]), int(cu_k[-1])
    want = torch.zeros(T, S, dtype=torch.bool)
    for (a, b), (c, d) in zip(zip(cu_q.tolist(), cu_q[1:].tolist()), zip(cu_k.tolist(), cu_k[1:].tolist())):
        want[a:b, c:d] = visible_mask(b - a, d - c, causal=causal, window_size=window)
    win = (window[0], 0 if causal else window[1])
    lo, hi, qlo, qhi = (t.long() for t in row_ranges(T, S, win, Varlen(cu_q.int(), cu_k.int()), "cpu"))
    i, j = torch.arange(T)[:, None], torch.arange(S)[None, :]
    assert torch.equal((j >= lo[:, None]) & (j <= hi[:, None]), want)
    assert torch.equal((i >= qlo[None, :]) & (i <= qhi[None, :]), want)
    assert bool((lo.diff() >= 0).all()) and bool((hi.diff() >= 0).all())


def test_cu_seqlens_is_the_self_attention_shorthand():
    x, cu, _ = _packed([(4, 4), (7, 7), (3, 3)], seed=7)
    q, k, v, lam = x
    a = lla.local_linear_attention(q, k, v, ridge=lam, cu_seqlens=cu)
    b = lla.local_linear_attention(q, k, v, ridge=lam, cu_seqlens_q=cu, cu_seqlens_k=cu.to(torch.int32))
    assert torch.equal(a, b)


def test_compiled_varlen_cross_attention_matches_eager():
    """The custom ops take both offset arrays (aot_eager), and check their values at run time."""
    x, cu_q, cu_k = _packed(LENGTHS[:4], seed=3)
    q, k, v, lam = x

    def f(q, k, v, lam, cu_q, cu_k):
        return lla.local_linear_attention(q, k, v, ridge=lam, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, solver="direct")

    def g(q, k, v, lam, cu_q, cu_k):
        return lla.parallax_attention(q, lam.unsqueeze(-1) * q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)

    for fn in (f, g):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        out_c = compiled(q, k, v, lam, cu_q, cu_k)
        grads_c = torch.autograd.grad(out_c.sin().sum(), x)
        out_e = fn(q, k, v, lam, cu_q, cu_k)
        grads_e = torch.autograd.grad(out_e.sin().sum(), x)
        assert rel_err(out_c, out_e) <= 1e-12
        for gc, ge in zip(grads_c, grads_e):
            assert rel_err(gc, ge) <= 1e-12
        bad = cu_k.clone()
        bad[-1] += 1  # does not end at S
        with pytest.raises(ValueError, match="cu_seqlens_k must start at 0 and end at S"):
            compiled(q, k, v, lam, cu_q, bad)


def test_explicit_triton_backend_is_refused_under_compile():
    x, cu_q, cu_k = _packed([(3, 5)], seed=4)
    q, k, v, lam = (t.detach() for t in x)
    for fn in (lambda: lla.local_linear_attention(q, k, v, backend="triton"),
               lambda: lla.parallax_attention(q, q, k, v, backend="triton")):
        with pytest.raises(Exception, match="backend='triton' is not supported under torch.compile"):
            torch.compile(fn, fullgraph=True, backend="aot_eager")()


def test_varlen_bad_offsets_parallax():
    x, cu_q, cu_k = _packed([(3, 5), (2, 2)], seed=5, parallax=True)
    q, k, v, r = (t.detach() for t in x)
    f = lla.parallax_attention
    with pytest.raises(ValueError, match="same number of sequences"):
        f(q, r, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k[:2])
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        f(q, r, k, v, cu_seqlens_q=cu_q + 1, cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="S == T"):
        f(q, r, k, v, cu_seqlens=cu_q)
    with pytest.raises(ValueError, match="max_seqlen_q = 2"):
        f(q, r, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=2)


def _triton_main():
    """Run under TRITON_INTERPRET=1: small float32 cases of both kernels."""
    global LENGTHS, CASES
    LENGTHS = [(3, 7), (0, 4), (6, 2), (1, 9), (2, 0)]
    CASES = [(True, (-1, -1)), (False, (2, 3))]
    for parallax in (False, True):
        a, r = check_packed_equals_alone(parallax, "triton", torch.float32, 1e-4, 1e-4)
        print(f"{'parallax' if parallax else 'lla'} triton: worst vs alone {a:.2e}, vs reference {r:.2e}")
    print("ok")


if __name__ == "__main__":
    if "--triton" in sys.argv:
        _triton_main()
