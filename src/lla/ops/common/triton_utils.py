"""What the LLA and Parallax Triton kernels share: the one matrix product ``_dot`` with its GPU
rounding emulation, and the switch that picks the emulation.

The Triton interpreter's ``tl.dot`` is a plain float32 product whatever ``input_precision`` asks, so
interpreter tests would never see the rounding of the GPU's tensor cores.  Every dot of both kernel
families goes through ``_dot(a, b, PREC, EMU)``: with ``EMU == 0`` (compiled for a GPU) it is
``tl.dot(a, b, input_precision=PREC)``; with ``EMU > 0`` (interpreter only) the operands are first
rounded as the tensor cores see them: TF32 (10 explicit mantissa bits) for ``"tf32"``, the split
``a = hi + lo`` three-product scheme for ``"tf32x3"``; ``"ieee"`` stays an exact float32 product.
``emulation_mode()`` gives ``EMU``: 0 on the GPU; under the interpreter 1 (TF32 round to nearest
even, the default), 2 (truncation, ``LLA_TRITON_EMULATE=trunc``) or 0 (``LLA_TRITON_EMULATE=0``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

__all__ = ["emulation_mode", "interpreting", "device_arch", "target_arch", "SMEM_LIMIT"]


def interpreting() -> bool:
    """True when the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


#: shared memory a block may opt into, bytes, per compute capability (major * 10 + minor); other archs
#: take the entry of the nearest one below (H100/H200: 227 KB; A100: 163 KB; consumer Ampere / Ada: 99 KB)
SMEM_LIMIT = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448}

_ARCH_OVERRIDE: list = []


def device_arch(device) -> int:
    """The compute capability (``major * 10 + minor``) the kernels are launched for on ``device``: the
    CUDA device's (``torch.cuda.get_device_capability``), or the arch set by ``target_arch`` (the
    compile check compiles for sm_90 / sm_80 on a CPU machine); 90 for CPU tensors (the interpreter,
    whose tiles do not depend on it)."""
    if _ARCH_OVERRIDE:
        return _ARCH_OVERRIDE[-1]
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


@contextmanager
def target_arch(arch: int):
    """Inside the block the launchers pick tiles for compute capability ``arch`` whatever the device
    (``benchmarks/compile_check.py`` compiles for sm_90 and sm_80 on CPU tensors)."""
    _ARCH_OVERRIDE.append(int(arch))
    try:
        yield
    finally:
        _ARCH_OVERRIDE.pop()


def smem_limit(arch: int) -> int:
    """Opt-in shared memory per block (bytes) of compute capability ``arch``."""
    below = [a for a in SMEM_LIMIT if a <= arch]
    return SMEM_LIMIT[max(below)] if below else 49_152


def emulation_mode() -> int:
    """How ``tl.dot`` operands are rounded: 0 as asked (on the GPU), 1 TF32 round-to-nearest-even
    (default under the interpreter), 2 TF32 truncation (``LLA_TRITON_EMULATE=trunc``)."""
    if not interpreting():
        return 0
    mode = os.environ.get("LLA_TRITON_EMULATE", "1").lower()
    return {"0": 0, "off": 0, "trunc": 2}.get(mode, 1)


@triton.jit
def _round_tf32(a, EMU: tl.constexpr):
    """float32 -> the nearest TF32 value (10 explicit mantissa bits), as float32.  ``EMU == 1``:
    round to nearest, ties to even; ``EMU == 2``: truncate (drop the low 13 bits)."""
    bits = a.to(tl.uint32, bitcast=True)
    if EMU == 1:
        bits = bits + (0xFFF + ((bits >> 13) & 1))
    bits = bits & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_half(a, PREC: tl.constexpr):
    """float32 -> the nearest bf16 (``PREC == "bf16"``) or fp16 (``"fp16"``) value, as float32, rounded
    to nearest even (bf16 in the bits, since the interpreter's float32 -> bf16 cast truncates)."""
    if PREC == "bf16":
        bits = a.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return a.to(tl.float16).to(tl.float32)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, EMU: tl.constexpr):
    """``tl.dot(a, b)`` with float32 accumulation at precision ``PREC``: ``"ieee"``, ``"tf32"``,
    ``"tf32x3"``, or ``"bf16"`` / ``"fp16"`` (both operands cast to that half type: the tensor cores'
    fastest products, float32 accumulators).  With ``EMU`` (interpreter only) the operands are rounded
    as the GPU's tensor cores see them: TF32 for ``"tf32"``, the split ``a = hi + lo`` three-product
    scheme for ``"tf32x3"``, round-to-nearest-even bf16 / fp16 for the half precisions; ``"ieee"`` is
    left exact."""
    if EMU == 0:
        if PREC == "bf16":
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
        elif PREC == "fp16":
            return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
        else:
            return tl.dot(a, b, input_precision=PREC)
    elif (PREC == "bf16") | (PREC == "fp16"):
        return tl.dot(_round_half(a, PREC), _round_half(b, PREC), input_precision="ieee")
    elif PREC == "tf32":
        return tl.dot(_round_tf32(a, EMU), _round_tf32(b, EMU), input_precision="ieee")
    elif PREC == "tf32x3":
        a_hi = _round_tf32(a, EMU)
        b_hi = _round_tf32(b, EMU)
        a_lo = _round_tf32(a - a_hi, EMU)
        b_lo = _round_tf32(b - b_hi, EMU)
        small = tl.dot(a_lo, b_hi, input_precision="ieee") + tl.dot(a_hi, b_lo, input_precision="ieee")
        return small + tl.dot(a_hi, b_hi, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _cast(x, dtype: tl.constexpr, EMU: tl.constexpr):
    """``x.to(dtype)`` for a float32 result being stored.  The GPU rounds float32 -> bf16 to nearest
    even; the interpreter truncates (twice the RMS error), so with ``EMU`` the bf16 value is first
    rounded to nearest even in the bits (after which the cast is exact).  float16 is rounded to
    nearest even by the interpreter already."""
    if EMU != 0 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


#: CUDA's limit on grid axis 0 (the kernels fold tiles x batch x heads into it; axes 1 and 2 stop at 65535)
MAX_GRID_X = 2**31 - 1


def launch_grid(n_tiles: int, n_heads: int) -> tuple:
    """The 1-D grid of ``n_tiles`` tiles for each of ``n_heads`` (batch x head) slices: CUDA caps
    axes 1 and 2 at 65535, so everything goes on axis 0 (limit ``2^31 - 1``)."""
    n = n_tiles * n_heads
    if n > MAX_GRID_X:
        raise ValueError(
            f"too many tiles for one launch: {n_tiles} tiles x {n_heads} (batch, head) pairs > {MAX_GRID_X}")
    return (n,)


@triton.jit
def _program_ids(n, BLOCK: tl.constexpr):
    """(tile, flat batch*head) of this program on a ``launch_grid``: axis 0 holds the ``cdiv(n, BLOCK)``
    tiles of every (batch, head) slice."""
    pid = tl.program_id(0)
    n_t = tl.cdiv(n, BLOCK)
    return pid % n_t, pid // n_t
