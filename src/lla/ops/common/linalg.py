"""``solve``: ``torch.linalg.solve`` without the CPU hang of batched LU on large matrices.

With MKL (the CPU wheels) and more than one intra-op thread, batched LU of matrices wider than 150
(``torch.linalg.solve`` / ``lu_factor`` / ``inv`` on ``[b >= 2, n >= 151, n]``) prints
``Intel oneMKL ERROR: Parameter 6 was incorrect on entry to DLASWP`` and then either raises
("Pivots given to lu_solve must all be greater or equal to 1") or never returns.  Reproduced with
torch 2.13.0+cpu at 2 threads (n = 151..256, batch 2..64: every call; n <= 150, one matrix, or one
thread: never); upstream: pytorch/pytorch#142815 and #141358.  Cholesky (``cholesky_ex``,
``cholesky_solve``) is not affected, and neither is a single matrix.

``solve`` runs exactly ``torch.linalg.solve`` where that is safe and one matrix at a time where it is
not, so the result and its autograd are those of ``torch.linalg.solve`` either way.  Everything in the
package that needs a batched LU solve (the float64 reference, the MesaNet baseline, the regression
task's least-squares baselines) goes through it.
"""

from __future__ import annotations

import torch

__all__ = ["solve"]

#: The widest matrix MKL's batched LU handles correctly with several threads (151 fails).
MKL_BATCHED_LU_MAX_N = 150


def _batched_lu_at_risk(A: torch.Tensor) -> bool:
    return (A.device.type == "cpu" and A.shape[-1] > MKL_BATCHED_LU_MAX_N and A.dim() > 2
            and A.shape[:-2].numel() > 1 and torch.get_num_threads() > 1 and torch.backends.mkl.is_available())


def solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve(A, B)`` for ``A [..., n, n]`` and ``B [..., n, k]`` (``B`` a matrix: callers
    pass vectors as ``[..., n, 1]``), batch dimensions broadcast as in torch; on the CPU, for
    ``n > 150`` and several threads, one matrix at a time (see the module docstring)."""
    if not _batched_lu_at_risk(A):
        return torch.linalg.solve(A, B)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    A_ = A.expand(*batch, *A.shape[-2:]).reshape(-1, *A.shape[-2:])  # [b, n, n]
    B_ = B.expand(*batch, *B.shape[-2:]).reshape(-1, *B.shape[-2:])  # [b, n, k]
    X = torch.stack([torch.linalg.solve(a, b) for a, b in zip(A_.unbind(0), B_.unbind(0))])  # [b, n, k]
    return X.reshape(*batch, *X.shape[-2:])
