"""FlashLLA-style Triton backend (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

Imported lazily by ``lla.ops.lla.api`` only when this backend is picked, so ``import lla`` never needs
Triton.  See ``function.py`` for what runs where and the cases handed to the PyTorch backend.
"""

from .function import LLATritonFunction, lla_triton

__all__ = ["lla_triton", "LLATritonFunction"]
