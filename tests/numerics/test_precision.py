"""``precision=``: the mixed-precision CG of the PyTorch backend (bf16 matvecs, fp32 residual
replacement, stalled rows finished in fp32) against the float64 reference, its fallback, and the
argument's contract."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_qkv, rel_err

import lla
from lla.ops.common import policy
from lla.ops.common.varlen import Varlen
from lla.ops.lla.reference import local_linear_attention_ref
from lla.ops.lla.torch_backend import function as fn
from lla.ops.lla.torch_backend import solvers


def _op(q, k, v, **kw):
    kw.setdefault("backend", "torch")
    kw.setdefault("solver", "cg")
    return lla.local_linear_attention(q, k, v, **kw)


@pytest.fixture
def every_row_in_bf16(monkeypatch):
    """No row is routed to fp32 CG up front by the conditioning estimate: every row starts in the bf16
    loop (the stall detection and the fallback then have to do their job)."""
    monkeypatch.setattr(solvers, "MIXED_ROUTE", float("inf"))


def _stats(q, k, v, ridge, precision, **kw):
    B, T, H, _ = q.shape
    cfg = fn._Cfg(q.shape[-1] ** -0.5, (-1, 0), "cg", kw.get("max_iters", 2 * q.shape[-1]), 1e-6, True,
                  precision=precision)
    return fn.lla_forward(q, k, v, torch.full((B, T, H), float(ridge)), cfg)[2]


@pytest.mark.parametrize("T,D", [(1, 16), (63, 48), (100, 80)])
def test_mixed_forward_and_gradients_match_reference(every_row_in_bf16, T, D):
    """Output and the gradients of q, k, v and the ridge within the fp32 bound (1e-4, as
    test_core's fp32 gradients), with every row starting in bf16; the bf16 loop really ran."""
    q, k, v = make_qkv(1, T, 2, D, Hk=1, Dv=D // 2, seed=T, requires_grad=True)
    lam = torch.tensor([0.8, 2.0], dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, T, 2, D // 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = local_linear_attention_ref(q, k, v, ridge=lam)
    grads_ref = torch.autograd.grad((ref * g).sum(), (q, k, v, lam))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    lam32 = lam.detach().float().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silent: the result is accurate
        o, aux = _op(q32, k32, v32, ridge=lam32, precision="mixed", return_aux=True)
        grads = torch.autograd.grad((o * g.float()).sum(), (q32, k32, v32, lam32))
    assert aux.precision.startswith("mixed")
    assert rel_err(o, ref) < 1e-4
    for name, a, b in zip("q k v ridge".split(), grads, grads_ref):
        assert rel_err(a, b, atol=1e-2) < 1e-4, name
    # fp32 accuracy, not just the fp32 bound: output and q, k, v gradients within 2x of plain fp32 CG's
    # error (measured 1.2-1.8x on an AMX CPU; 3-7x before the mixed solve kept plain CG's floor margin)
    o32 = _op(q32, k32, v32, ridge=lam32, precision="fp32")
    grads32 = torch.autograd.grad((o32 * g.float()).sum(), (q32, k32, v32))
    assert rel_err(o, ref) <= 2 * rel_err(o32, ref)
    for name, a, a32, b in zip("q k v".split(), grads, grads32, grads_ref):
        assert rel_err(a, b, atol=1e-2) <= 2 * rel_err(a32, b, atol=1e-2), name
    if T > 1:  # rows seeing one key solve exactly at x = 0 or in one step; longer ones use bf16 matvecs
        st = _stats(q32.detach(), k32.detach(), v32.detach(), 1.0, "mixed")
        assert st[6] > 0  # bf16 row-key products


def test_mixed_long_rows_mostly_bf16_and_accurate():
    """Default routing at a length where most rows see many keys: most matvec work is bf16, no row is
    less accurate than the fp32 bound, the reported residual is the fp32 true residual's order."""
    q, k, v = make_qkv(1, 384, 2, 32, dtype=torch.float32, seed=3)
    ref = local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=1.0)
    o, aux = _op(q, k, v, ridge=1.0, precision="mixed", return_aux=True)
    o32, aux32 = _op(q, k, v, ridge=1.0, precision="fp32", return_aux=True)
    assert rel_err(o, ref) < 1e-5 and rel_err(o32, ref) < 1e-5
    assert aux.residual < 1e-4
    st = _stats(q, k, v, 1.0, "mixed")
    assert st[6] > st[7]  # bf16 row-key products outnumber the fp32 ones


def test_stall_falls_back_to_fp32(every_row_in_bf16):
    """Ill-conditioned for bf16 (ridge 0.01, keys x3): refinement cannot converge in bf16; the rows are
    finished in fp32, the answer is as accurate as plain fp32 CG's, and the aux says so."""
    q, k, v = make_qkv(1, 96, 2, 16, dtype=torch.float32, seed=11)
    k = k * 3
    ref = local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o32 = _op(q, k, v, ridge=0.01, precision="fp32")
        o, aux = _op(q, k, v, ridge=0.01, precision="mixed", return_aux=True)
    assert aux.precision.startswith("mixed+fp32 (") and int(aux.precision.split("(")[1].split()[0]) > 0
    e32, e = rel_err(o32, ref), rel_err(o, ref)
    assert e <= max(2 * e32, 1e-5), (e, e32)
    st = _stats(q, k, v, 0.01, "mixed")
    assert st[5] > 0 and st[7] > 0  # rows handed to fp32, fp32 matvecs run


def test_fp32_is_the_plain_path_and_fp64_ignores_precision(monkeypatch):
    q, k, v = make_qkv(1, 200, 2, 32, dtype=torch.float32, seed=2)
    o, aux = _op(q, k, v, precision="fp32", return_aux=True)
    assert aux.precision == "fp32"
    st = _stats(q, k, v, 1.0, "fp32")
    assert st[6] == 0 and st[5] == 0  # no bf16 work, no fallback
    # "auto" without fast bf16 is the same plain fp32 path, bit for bit
    monkeypatch.setattr(policy, "_fast_bf16", lambda device: False)
    assert torch.equal(_op(q, k, v, precision="auto"), o)
    q64, k64, v64 = make_qkv(1, 40, 2, 16, seed=4)
    o64, aux64 = _op(q64, k64, v64, precision="mixed", return_aux=True)
    assert aux64.precision == "fp64" and o64.dtype == torch.float64
    assert torch.equal(o64, _op(q64, k64, v64, precision="fp32"))


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(policy, "_fast_bf16", lambda device: True)
    assert policy.resolve_precision("auto", torch.float32, torch.device("cpu")) == "mixed"
    assert policy.resolve_precision("auto", torch.bfloat16, torch.device("cpu")) == "mixed"
    assert policy.resolve_precision("fp32", torch.float32, torch.device("cpu")) == "fp32"
    assert policy.resolve_precision("mixed", torch.float64, torch.device("cpu")) == "fp64"
    monkeypatch.setattr(policy, "_fast_bf16", lambda device: False)
    assert policy.resolve_precision("auto", torch.float32, torch.device("cpu")) == "fp32"
    assert policy.resolve_precision("mixed", torch.float32, torch.device("cpu")) == "mixed"


def test_compiled_path_resolves_precision_as_the_eager_op(monkeypatch):
    """The custom op that torch.compile traces resolves ``precision="auto"`` by the eager op's rule,
    the (longest packed) sequence length included, and honours an explicit choice (it used to drop
    the argument and treat "auto" as long: mixed at any length on CUDA or an AMX CPU)."""
    from lla.ops.lla.custom_op import lla_compiled

    monkeypatch.setattr(policy, "_fast_bf16", lambda device: True)  # as on CUDA or a CPU with AMX
    monkeypatch.setattr(policy, "MIXED_MIN_KEYS", 32)
    seen = []
    real = fn.lla_forward
    monkeypatch.setattr(fn, "lla_forward", lambda *a: seen.append(a[-1].precision) or real(*a))
    q, k, v = make_qkv(1, 48, 2, 16, dtype=torch.float32, seed=1)
    lam = torch.ones(1, 48, 2)
    kw = dict(scale=0.25, window_size=(-1, 0), solver="cg", max_iters=None, tol=None, precondition=True)
    cu = torch.tensor([0, 20, 48])
    for cu_q, precision, want in ((None, "auto", "mixed"), (cu, "auto", "fp32"), (None, "fp32", "fp32"),
                                  (cu, "mixed", "mixed")):
        seen.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o, _lse = lla_compiled(q, k, v, lam, None if cu_q is None else Varlen(cu_q, cu_q), precision=precision,
                                   **kw)
            eager, aux = _op(q, k, v, precision=precision, cu_seqlens=cu_q, return_aux=True)
        assert seen and set(seen) == {want}, (cu_q, precision, seen)
        assert aux.precision.split("+")[0] == want
        assert torch.equal(o, eager)


def test_auto_is_fp32_on_any_cpu():
    """On a CPU "auto" is plain fp32 at every length, with or without AMX (measured slower there too)."""
    assert not policy._fast_bf16(torch.device("cpu"))
    for keys in (16, 1024, 16384, None):
        assert policy.resolve_precision("auto", torch.float32, torch.device("cpu"), keys) == "fp32"


@pytest.mark.parametrize("bad", ["bf16", "FP32", None, 32])
def test_bad_precision_raises(bad):
    q, k, v = make_qkv(1, 8, 1, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="precision"):
        _op(q, k, v, precision=bad)


def test_mixed_locality_and_finite(every_row_in_bf16):
    """A huge key a row cannot see does not move it (bf16 rows never mix); finite in, finite out."""
    T, j = 128, 100
    q, k, v = make_qkv(1, T, 2, 32, dtype=torch.float32, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o0 = _op(q, k, v, ridge=0.5, precision="mixed")
        k2 = k.clone()
        k2[:, j] *= 1e4
        o1 = _op(q, k2, v, ridge=0.5, precision="mixed")
    assert torch.isfinite(o1).all()
    assert rel_err(o1[:, :j], o0[:, :j]) <= 1e-5


def test_work_counters_add_up():
    """The stats' row-key products: plain fp32 CG over a tile counts rows x keys per iteration."""
    R, n, D = 8, 50, 16
    g = torch.Generator().manual_seed(0)
    s = torch.softmax(torch.randn(1, R, n, generator=g), -1)
    kc = torch.randn(1, n, D, generator=g)
    m = s @ kc
    lam = torch.ones(1, R)
    b = torch.randn(1, R, D, generator=g)
    w = solvers.Work()
    x, it, _ = solvers.pcg_compact(s, kc, m, lam, b, None, tol=1e-30, max_iters=3, work=w)
    assert it == 3 and w.fp32 == 3 * R * n and w.lowp == 0


def test_auto_is_fp32_for_short_sequences(monkeypatch):
    """The mixed solve's casts and refinement cost more than its bf16 GEMMs save below
    ``MIXED_MIN_KEYS`` keys per sequence: ``auto`` runs fp32 there even on fast-bf16 hardware."""
    monkeypatch.setattr(policy, "_fast_bf16", lambda device: True)
    cpu = torch.device("cpu")
    assert policy.resolve_precision("auto", torch.float32, cpu, keys=policy.MIXED_MIN_KEYS - 1) == "fp32"
    assert policy.resolve_precision("auto", torch.float32, cpu, keys=policy.MIXED_MIN_KEYS) == "mixed"
    assert policy.resolve_precision("mixed", torch.float32, cpu, keys=16) == "mixed"  # forced stays forced
    q, k, v = (t.float() for t in make_qkv(1, 40, 2, 16, seed=3))
    _, aux = _op(q, k, v, precision="auto", return_aux=True)
    assert aux.precision == "fp32"
