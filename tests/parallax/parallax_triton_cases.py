"""Parallax Triton kernels on CPU tensors under the Triton interpreter, against the float64 reference.

``TRITON_INTERPRET=1`` must be set before triton is imported, so these run in a fresh process:
``python tests/parallax/parallax_triton_cases.py CASE [CASE ...]`` (or ``all``), one ``OK <case> <metrics>``
line per case, exit 1 on the first failure.  ``tests/parallax/test_parallax_triton.py`` drives it
(``conftest.interp_report``).
"""

from __future__ import annotations

import os

#: ``LLA_TRITON_DEVICE=cuda``: compiled and run on the GPU instead (as ``triton_interp_cases.py``)
DEVICE = os.environ.get("LLA_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import sys  # noqa: E402

import torch  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # tests/parallax/: test_parallax; tests/: conftest

from conftest import rel_err  # noqa: E402
from test_parallax import NAMES, make_qrkv, out_and_grads, ref  # noqa: E402

from lla import parallax_attention  # noqa: E402


def tri(*x, **kw):
    if DEVICE != "cpu":  # inputs to the GPU, outputs back (autograd flows through the copies)
        out = parallax_attention(*(t.to(DEVICE) for t in x), backend="triton",
                                 **{k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in kw.items()})
        return tuple(o.cpu() if torch.is_tensor(o) else o for o in out) if isinstance(out, tuple) else out.cpu()
    return parallax_attention(*x, backend="triton", **kw)


def _check(B=1, T=40, S=None, H=2, Hk=None, D=16, Dv=None, seed=0, dtype=torch.float32, tol=1e-5, prep=None, **kw):
    x = make_qrkv(B=B, T=T, S=S, H=H, Hk=Hk, D=D, Dv=Dv, seed=seed)
    if prep is not None:
        x = prep(*x)
    do = torch.randn(B, T, H, x[3].shape[-1], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    want = out_and_grads(ref, x, do, torch.float64, **kw)
    got = out_and_grads(tri, x, do, dtype, **kw)
    naive = out_and_grads(ref, x, do, dtype, **kw) if dtype != torch.float32 or prep is not None else None
    errs = {}
    for i, (name, g, w) in enumerate(zip(NAMES, got, want)):
        assert g.dtype == dtype and bool(torch.isfinite(g).all()), name
        errs[name] = rel_err(g, w)
        bound = tol if naive is None else 2 * max(rel_err(naive[i], w), 1e-7)
        assert errs[name] <= bound, (name, errs[name], bound)
    return " ".join(f"{k} {v:.1e}" for k, v in errs.items())


def case_causal_gqa_d16():
    return _check(B=2, T=40, H=4, Hk=2, D=16, Dv=8)


def case_noncausal_s_ne_t_d48_padded():
    return _check(T=33, S=50, H=2, Hk=1, D=48, Dv=20, causal=False)


def case_s_lt_t_empty_rows_d80():
    return _check(T=63, S=30, H=2, D=80, Dv=16)


def case_t1_decode_shape():
    return _check(T=1, S=37, H=4, Hk=1, D=16)


def case_windows():
    a = _check(T=45, H=2, D=16, window_size=(6, -1))
    b = _check(T=45, S=40, H=2, D=16, causal=False, window_size=(3, 5), seed=2)
    return a + " | " + b


def case_varlen():
    cu = torch.tensor([0, 1, 17, 40], dtype=torch.int32)
    return _check(T=40, H=2, Hk=1, D=16, cu_seqlens=cu) + " | " + _check(T=40, H=2, D=16, causal=False, cu_seqlens=cu)


def case_long_t100():
    return _check(T=100, H=2, D=16, Dv=16, seed=4)


def case_half_precision():
    return " | ".join(_check(T=40, H=2, Hk=1, D=16, dtype=dt, seed=5) for dt in (torch.bfloat16, torch.float16))


def case_rk_offset_centring():
    """``r . k ~ 9000 + O(1)``: the uncentred flash form loses every digit; the kernel must not."""
    def prep(q, r, k, v):
        u = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(6),
                                                      dtype=torch.float64), dim=0)
        return q, r + 30 * u, k + 300 * u, v
    return _check(T=50, H=2, D=16, prep=prep, seed=6)


def case_half_rk_offset():
    """Half inputs with ``r . k ~ 9000 + O(1)``: the standard (2x a same-dtype naive implementation)
    and, since the naive one loses every digit here, the kernel's own error: against the exact
    result for the half-rounded inputs, no worse than 2x that result correctly rounded to the dtype.
    Plain TF32 (emulated) in the query-gradient kernel gives dq, dr 4.5x (bf16) / 36x (fp16) that."""
    u = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(8),
                                                  dtype=torch.float64), dim=0)

    def prep(q, r, k, v):
        return q, r + 30 * u, k + 300 * u, v

    parts = []
    for dt in (torch.bfloat16, torch.float16):
        parts.append(_check(T=50, H=2, D=16, dtype=dt, prep=prep, seed=8))
        x = prep(*make_qrkv(T=50, H=2, D=16, seed=8))
        x = [t.to(dt).double() for t in x]
        do = torch.randn(1, 50, 2, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dt).double()
        exact = out_and_grads(ref, x, do, torch.float64)
        got = out_and_grads(tri, x, do, dt)
        for name, g, w in zip(NAMES, got, exact):
            err, floor = rel_err(g, w), rel_err(w.to(dt), w)
            assert err <= 2 * floor, (str(dt), name, err, floor)
        parts.append("same-input " + " ".join(f"{n} {rel_err(g, w) / rel_err(w.to(dt), w):.2f}x"
                                              for n, g, w in zip(NAMES, got, exact)))
    return " | ".join(parts)


def case_huge_invisible_key():
    q, r, k, v = make_qrkv(T=50, H=2, D=16, dtype=torch.float32, seed=7)
    base = tri(q, r, k, v)
    k2 = k.clone()
    k2[:, -1] = 1e4
    out = tri(q, r, k2, v)
    assert torch.equal(out[:, :-1], base[:, :-1])
    return "rows before the huge key unchanged"


CASES = {n[len("case_"):]: f for n, f in dict(globals()).items() if n.startswith("case_")}

if __name__ == "__main__":
    names = sys.argv[1:] or ["all"]
    if names == ["all"]:
        names = list(CASES)
    for name in names:
        try:
            print(f"OK {name}: {CASES[name]()}", flush=True)
        except Exception as exc:  # report and stop
            import traceback

            print(f"FAIL {name}: {exc!r}", flush=True)
            traceback.print_exc()
            sys.exit(1)
