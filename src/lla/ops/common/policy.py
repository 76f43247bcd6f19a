"""Policy shared by the ops: which backend runs, which solver, in which precision.

Every rule the public ops apply to turn ``"auto"`` into a choice lives here, so that the eager path,
the ``torch.compile`` custom op and the KV-cache path resolve alike:

* ``pick_backend``: ``"auto"`` / ``"torch"`` / ``"triton"`` -> the backend that runs;
* ``resolve_solver``: LLA's ``solver="auto"`` (CG or the direct Cholesky solve);
* ``resolve_precision``: the PyTorch backend's CG precision (``"fp32"`` / ``"mixed"`` / ``"fp64"``);
* ``triton_precision``: the Triton kernels' precision rule.
"""

from __future__ import annotations

import functools
import os

import torch

from .checks import BACKENDS, check_choice

__all__ = ["pick_backend", "resolve_solver", "resolve_precision", "triton_precision", "MIXED_MIN_KEYS",
           "PRECISIONS"]

#: the op's ``precision`` choices (the Triton backend also takes ``"authors"``: the authors'
#: fixed-iteration all-bf16 solve, for comparison)
PRECISIONS = ("auto", "fp32", "mixed")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def pick_backend(backend, q: torch.Tensor) -> str:
    """``"auto"`` / ``"torch"`` / ``"triton"`` -> the backend that runs.

    ``"auto"``: Triton for CUDA tensors when triton is installed, else PyTorch; while
    ``torch.compile`` traces, PyTorch (the compiled custom op runs the PyTorch backend).  An explicit
    ``"triton"`` is honoured or refused with a ``ValueError`` (no triton, CPU tensors without
    ``TRITON_INTERPRET=1``, or under ``torch.compile``), never replaced."""
    check_choice("backend", backend, BACKENDS)
    compiling = torch.compiler.is_compiling()
    if backend == "auto":
        return "triton" if (q.is_cuda and not compiling and _triton_available()) else "torch"
    if backend == "triton":
        if compiling:
            raise ValueError("backend='triton' is not supported under torch.compile (the compiled op runs the "
                             "PyTorch backend); pass backend='auto' or 'torch', or call the op eagerly")
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend


def resolve_solver(solver: str, ridge_min: float, D: int, dtype: torch.dtype, S: int | None = None) -> str:
    """The ``solver="auto"`` rule.

    CG's iteration count grows like sqrt(cond(A)) and cond(A) ~ ||Cov(k)|| / ridge, while the
    direct solve forms the D x D moment of every row (``R n D^2 / 2`` multiply-adds) and runs one
    small batched Cholesky per row (LAPACK-bound on the CPU, whatever the key length).  The torch
    backend's CG drops converged rows, so CG wins almost everywhere once the (batch, key head) pairs
    are batched together; the direct solve wins for small D with long sequences and small ridges
    (``python benchmarks/solver_rule.py``; the measured crossover is in ``docs/performance.md``).  So:
    direct for float64 (exactness expected), tiny ridges (< 1e-3), D <= 16 at ``S >= 512`` and D <= 32
    with ridge < 0.5 at ``S >= 1024``; CG otherwise.  ``S`` unknown counts as short.
    On the Triton backend (CUDA) ``auto`` means CG, the solver the fused kernels run.
    """
    if solver != "auto":
        return solver
    if dtype == torch.float64 or ridge_min < 1e-3:
        return "direct"
    if S is not None and ((D <= 16 and S >= 512) or (D <= 32 and ridge_min < 0.5 and S >= 1024)):
        return "direct"
    return "cg"


# Below this many keys per sequence the mixed solve's extra casts and refinement steps cost more
# than its bf16 GEMMs save, whatever the GEMM speed (docs/performance.md, "mixed precision by size").
MIXED_MIN_KEYS = 1024


@functools.lru_cache(maxsize=None)
def _fast_bf16(device: torch.device) -> bool:
    """Whether bf16 GEMMs are fast enough on ``device`` to pay for the mixed solve: CUDA with bf16
    support.  Not a CPU, with or without AVX512-BF16 / AMX: the CG's compacted row blocks are short,
    and its replacements, routing and casts are fp32 work the bf16 GEMMs do not speed up
    (``benchmarks/mixed_ab.py`` and ``lla bench``; the figures are in ``docs/performance.md``)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, dtype: torch.dtype, device: torch.device, keys: int | None = None) -> str:
    """The precision a CG solve runs in: ``"fp64"`` (float64 inputs, always), ``"fp32"`` or
    ``"mixed"`` (bf16 matvecs refined to the fp32 tolerance, ``solvers.pcg_mixed``).

    ``"auto"`` is ``"mixed"`` when bf16 GEMMs pay for it on the device (``_fast_bf16``: CUDA) and the
    sequences are long enough (``keys``, the longest sequence's key count, at least
    ``MIXED_MIN_KEYS``; unknown counts as long), else ``"fp32"``.
    ``torch.get_float32_matmul_precision()`` is not consulted: it lets *matmul results*
    lose accuracy, while the mixed solve returns what the fp32 solve does (the same tolerance on the
    fp32 true residual; rows where bf16 refinement stalls finish in fp32), so even ``"highest"``
    is honoured.  ``"fp32"`` forces the plain fp32 CG (bitwise the pre-mixed path).
    """
    if dtype == torch.float64:
        return "fp64"
    if precision == "auto":
        long_enough = keys is None or keys >= MIXED_MIN_KEYS
        return "mixed" if long_enough and _fast_bf16(device) else "fp32"
    return precision


def triton_precision(precision: str, dtype: torch.dtype) -> str:
    """``"auto"`` -> ``"mixed"`` for bf16 / fp16 inputs; for float32 inputs it follows PyTorch's
    ``torch.get_float32_matmul_precision()``: ``"highest"`` (PyTorch's default) -> ``"fp32"`` (plain
    float32 solves, no tensor cores), ``"high"`` / ``"medium"`` -> ``"mixed"``.  Both give float32
    accuracy; ``"mixed"`` is the faster scheme on tensor cores."""
    if precision not in PRECISIONS and precision != "authors":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if dtype != torch.float32:
        return "mixed"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "mixed"
