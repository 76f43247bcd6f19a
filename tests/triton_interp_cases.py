"""Triton-backend cases run on CPU tensors under the Triton interpreter.

``TRITON_INTERPRET=1`` only takes effect when set before triton is imported, so these cases run in
a fresh process: ``python tests/triton_interp_cases.py CASE [CASE ...]`` (or ``all``).  Each case
compares the Triton kernels (``backend="triton"``, ``solver="cg"``) with the float64 reference and
raises on a mismatch; the process prints one ``OK <case> <metrics>`` line per case and exits 0, or
prints the failure and exits 1.  ``tests/test_triton.py`` drives it.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lla  # noqa: E402
from conftest import TOL, make_qkv, rel_err  # noqa: E402
from lla import local_linear_attention_ref  # noqa: E402

F32 = TOL[torch.float32]
#: CG tolerance pinned by these cases (the op's fp32 default may change; the kernels' accuracy
#: against the reference is what is checked here)
CG_TOL = 1e-6


def _outputs_and_grads(q, k, v, ridge, do, dtype, backend, **kw):
    """o and the gradients of ``sum(o * do)`` w.r.t. q, k, v and the ridge (ridge a float64 tensor)."""
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    lam = ridge.detach().clone().requires_grad_()
    if backend == "ref":
        o = local_linear_attention_ref(qq, kk, vv, ridge=lam, **kw)
    else:
        o = lla.local_linear_attention(qq, kk, vv, ridge=lam, backend=backend, solver="cg", tol=CG_TOL, **kw)
    (o.double() * do).sum().backward()
    return o, qq.grad, kk.grad, vv.grad, lam.grad


def _check_against_reference(name, *, B=1, T=40, S=None, H=2, Hk=None, D=16, Dv=None, ridge="head",
                             seed=0, **kw):
    """fp32 Triton forward and all four gradients against the float64 reference."""
    q, k, v = make_qkv(B=B, T=T, S=S, H=H, Hk=Hk, D=D, Dv=Dv, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if ridge == "head":
        lam = 0.5 + torch.rand(H, generator=g, dtype=torch.float64)  # [H]
    elif ridge == "position":
        lam = 0.5 + 2 * torch.rand(B, T, H, generator=g, dtype=torch.float64)  # [B, T, H]
    else:
        lam = torch.tensor(float(ridge), dtype=torch.float64)
    do = torch.randn(B, T, H, v.shape[-1], generator=g, dtype=torch.float64)
    got = _outputs_and_grads(q, k, v, lam, do, torch.float32, "triton", **kw)
    ref = _outputs_and_grads(q, k, v, lam, do, torch.float64, "ref", **kw)
    errs = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv", "dridge"), got, ref)}
    assert got[0].dtype == torch.float32 and got[0].shape == ref[0].shape
    for n, e in errs.items():
        assert e < F32, f"{name}: {n} relative error {e:.3g} >= {F32}"
    return got, ref, " ".join(f"{n}={e:.2e}" for n, e in errs.items())


def case_causal_d16():
    return _check_against_reference("causal_d16", T=40, D=16)[2]


def case_noncausal_d64():
    return _check_against_reference("noncausal_d64", T=32, D=64, causal=False, ridge=2.0)[2]


def case_gqa_cross_d48_padded():
    # D = 48 and Dv = 20 are padded to 64 / 32 inside the kernels; S > T, grouped-query
    return _check_against_reference("gqa_cross_d48", T=24, S=40, H=4, Hk=2, D=48, Dv=20)[2]


def case_s_lt_t_empty_rows():
    got, ref, msg = _check_against_reference("s_lt_t", B=2, T=40, S=24, ridge="position")
    o = got[0]
    assert torch.count_nonzero(o[:, :16]) == 0, "rows that see no key must output zeros"
    assert torch.count_nonzero(got[1][:, :16]) == 0, "and get zero dq"
    return msg


def case_noncausal_t_lt_s_gqa_h4():
    return _check_against_reference("noncausal_gqa", T=20, S=52, H=4, Hk=1, D=32, causal=False)[2]


def case_windows():
    a = _check_against_reference("window_causal", T=64, D=16, window_size=(7, -1))[2]
    b = _check_against_reference("window_two_sided", T=50, D=16, causal=False, window_size=(5, 9))[2]
    return f"causal(7): {a} | two-sided(5,9): {b}"


def case_varlen():
    cu = torch.tensor([0, 10, 30, 31, 48])
    got, ref, msg = _check_against_reference("varlen", T=48, D=16, cu_seqlens=cu)
    # the packed call equals the torch backend (which runs the sequences one by one)
    q, k, v = make_qkv(T=48, D=16, dtype=torch.float32)
    o_t = lla.local_linear_attention(q, k, v, backend="torch", solver="cg", cu_seqlens=cu, tol=CG_TOL)
    o_k = lla.local_linear_attention(q, k, v, backend="triton", solver="cg", cu_seqlens=cu, tol=CG_TOL)
    e = rel_err(o_k, o_t)
    assert e < F32, e
    return f"{msg} vs-torch={e:.2e}"


def case_d128_padded_dv():
    """D = 128 with Dv = 100 (padded to 128), GQA, S > T.  A scalar ridge's gradient sums cancelling
    per-row terms, so in fp32 its error sits above 1e-4 for both backends: it must be no worse than
    twice the torch backend's; everything else meets the fp32 tolerance."""
    q, k, v = make_qkv(B=1, T=20, S=24, H=2, Hk=1, D=128, Dv=100)
    lam = torch.tensor(3.0, dtype=torch.float64)
    do = torch.randn(1, 20, 2, 100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _outputs_and_grads(q, k, v, lam, do, torch.float64, "ref")
    got = _outputs_and_grads(q, k, v, lam, do, torch.float32, "triton")
    tor = _outputs_and_grads(q, k, v, lam, do, torch.float32, "torch")
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    for n, e in zip(("o", "dq", "dk", "dv"), errs):
        assert e < F32, (n, e)
    e_torch = rel_err(tor[4], ref[4])
    assert errs[4] <= 2 * e_torch, (errs[4], e_torch)
    return " ".join(f"{n}={e:.2e}" for n, e in zip(("o", "dq", "dk", "dv", "dridge"), errs)) + f" (torch dridge {e_torch:.2e})"


def case_long_t100_d32():
    # several query and key tiles, tiles beyond the causal diagonal skipped
    return _check_against_reference("t100", T=100, H=1, D=32, ridge=1.0, seed=3)[2]


def _naive_same_dtype(q, k, v, ridge):
    """Causal LLA straight from the math in q's dtype (solve in float32: no half solver exists)."""
    B, T, H, D = q.shape
    Q, K, V = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, *]
    logits = (Q @ K.transpose(-1, -2)) * D**-0.5
    logits = logits + torch.full((T, T), float("-inf"), dtype=q.dtype).triu(1)
    s = torch.softmax(logits, -1)  # [B, H, T, S]
    z = K[:, :, None] - Q[:, :, :, None]  # [B, H, T, S, D]
    mu = (s[..., None] * z).sum(-2)  # [B, H, T, D]
    sigma = (s[..., None, None] * z[..., :, None] * z[..., None, :]).sum(-3)
    sigma = sigma + ridge * torch.eye(D, dtype=q.dtype)  # [B, H, T, D, D]
    rho = torch.linalg.solve(sigma.float(), mu.float()[..., None])[..., 0].to(q.dtype)
    delta = 1 - (mu * rho).sum(-1)
    w = s * (1 - (z * rho[..., None, :]).sum(-1)) / delta[..., None]
    return (w @ V).transpose(1, 2)


def case_half_precision():
    """bf16 / fp16 inputs: output in the input dtype, error at most twice a naive same-dtype LLA's;
    gradients finite and in the input dtype."""
    q, k, v = make_qkv(1, 64, 2, 16, seed=21)
    ref = local_linear_attention_ref(q, k, v, ridge=1.0)
    msgs = []
    for dtype in (torch.bfloat16, torch.float16):
        lo = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        o = lla.local_linear_attention(*lo, ridge=1.0, backend="triton", solver="cg")
        assert o.dtype == dtype and torch.isfinite(o).all()
        err = rel_err(o, ref)
        naive = rel_err(_naive_same_dtype(*[t.detach() for t in lo], 1.0), ref)
        assert err <= 2 * naive, (dtype, err, naive)
        o.float().pow(2).sum().backward()
        for t in lo:
            assert t.grad.dtype == dtype and torch.isfinite(t.grad).all()
        msgs.append(f"{str(dtype)[6:]}: err={err:.2e} naive={naive:.2e}")
    return " | ".join(msgs)


def case_aux_and_solver_controls():
    """lse, iterations and residual agree with the torch backend; no-preconditioner path; a capped
    CG warns; float64 / direct / non-finite keys fall back to the torch backend."""
    q, k, v = make_qkv(1, 40, 2, 16, S=48, seed=5, dtype=torch.float32)
    o_k, aux_k = lla.local_linear_attention(q, k, v, backend="triton", solver="cg", tol=CG_TOL, return_aux=True)
    o_t, aux_t = lla.local_linear_attention(q, k, v, backend="torch", solver="cg", tol=CG_TOL, return_aux=True)
    assert aux_k.solver == "cg" and aux_k.lse.shape == (1, 40, 2) and aux_k.lse.dtype == torch.float32
    assert torch.allclose(aux_k.lse, aux_t.lse, atol=1e-5), (aux_k.lse - aux_t.lse).abs().max()
    assert 1 <= aux_k.iters <= 2 * 16, aux_k.iters  # default cap 2 D
    assert aux_k.residual <= CG_TOL * 1.0001, aux_k.residual  # tol reached by every row
    assert abs(aux_k.amplification - aux_t.amplification) <= 1e-3 * aux_t.amplification
    ref = local_linear_attention_ref(q.double(), k.double(), v.double())
    o_plain = lla.local_linear_attention(q, k, v, backend="triton", solver="cg", precondition=False, tol=CG_TOL)
    e_plain = rel_err(o_plain, ref)
    assert rel_err(o_k, ref) < F32 and e_plain < F32, e_plain
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lla.local_linear_attention(q, k, v, ridge=0.05, backend="triton", solver="cg", max_iters=2)
    assert any(issubclass(x.category, lla.LLAConvergenceWarning) for x in w), "capped CG must warn"
    # fallbacks
    q64, k64, v64 = (t.double() for t in (q, k, v))
    assert rel_err(lla.local_linear_attention(q64, k64, v64, backend="triton"), ref) < TOL[torch.float64]
    o_dir = lla.local_linear_attention(q, k, v, backend="triton", solver="direct", ridge=0.01)
    assert rel_err(o_dir, local_linear_attention_ref(q.double(), k.double(), v.double(), ridge=0.01)) < F32
    k_bad = k.clone()
    k_bad[0, 30, 0, 3] = float("nan")
    o_bad = lla.local_linear_attention(q, k_bad, v, backend="triton", solver="cg")
    first_bad_row = 30 - (48 - 40)  # bottom-right causal: row i sees keys <= i + 8
    assert torch.isfinite(o_bad[0, :first_bad_row]).all()
    assert torch.isnan(o_bad[0, first_bad_row:, 0]).all() and torch.isfinite(o_bad[0, :, 1]).all()
    return f"iters {aux_k.iters} (torch {aux_t.iters}) resid {aux_k.residual:.1e} unprec-err {e_plain:.1e}"


def case_robustness():
    """Finite outputs and gradients where fp32 is strained; with huge keys the in-kernel CG (centred
    matvec, weights from the row max and mass kept apart) still converges when given iterations."""
    msgs = []
    for case in ("logits-in-thousands", "keys-norm-1e3", "offset-keys"):
        q, k, v = make_qkv(1, 32, 2, 16, seed=31)
        if case == "logits-in-thousands":
            q, k = q * 30, k * 30
        elif case == "keys-norm-1e3":
            k = k * 250.0
        else:
            q, k = q + 1e3, k + 1e3
        q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
        ref = local_linear_attention_ref(q32.double(), k32.double(), v32.double())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            o = lla.local_linear_attention(q32, k32, v32, backend="triton", solver="cg")
            o.sum().backward()
        assert torch.isfinite(o).all(), case
        assert all(torch.isfinite(t.grad).all() for t in (q32, k32, v32)), case
        warned = any(issubclass(w.category, lla.LLAConvergenceWarning) for w in caught)
        err = rel_err(o, ref)
        assert warned or err < 1e-3, (case, err)
        msgs.append(f"{case}: err={err:.1e}{' (warned)' if warned else ''}")
        if case == "keys-norm-1e3":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, aux = lla.local_linear_attention(q32.detach(), k32.detach(), v32.detach(), backend="triton",
                                                    solver="cg", max_iters=150, tol=CG_TOL, return_aux=True)
            assert aux.residual <= CG_TOL * 1.0001, ("CG must converge", aux.residual, aux.iters)
            msgs[-1] += f", converges in {aux.iters} iters"
    return " | ".join(msgs)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main(argv) -> int:
    names = list(CASES) if argv == ["all"] else argv
    torch.set_num_threads(int(os.environ.get("LLA_TEST_THREADS", "2")))
    status = 0
    for name in names:
        if name not in CASES:
            print(f"UNKNOWN {name}; cases: {' '.join(CASES)}")
            return 2
        try:
            msg = CASES[name]()
        except Exception as exc:  # report and keep going
            import traceback

            traceback.print_exc()
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            status = 1
        else:
            print(f"OK {name} {msg}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
