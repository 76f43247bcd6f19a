"""Local Linear Attention, in the layout of flash-linear-attention:

* ``reference.py``: the formula in float64 (the spec),
* ``torch_backend/``: blockwise PyTorch forward / adjoint backward (CPU and CUDA), ``solvers.py`` the CG
  and direct solves,
* ``triton_backend/``: FlashLLA-style Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``),
* ``decode.py``: KV-cache decoding and chunked prefill,
* ``custom_op.py``: the ``torch.library`` op ``torch.compile`` sees,
* ``api.py``: the public op (its dispatch; the argument checks are ``lla.ops.common.checks``, shared by every op).
"""

from .api import LLAAux, local_linear_attention
from .decode import local_linear_attention_with_kvcache
from .reference import local_linear_attention_ref

__all__ = ["local_linear_attention", "local_linear_attention_with_kvcache", "local_linear_attention_ref", "LLAAux"]
