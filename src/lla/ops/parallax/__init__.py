"""Parallax, the solver-free relative of LLA (Zuo et al. 2026), in the layout of flash-linear-attention:

* ``reference.py``: the formula in float64 (the spec),
* ``torch_backend.py``: blockwise PyTorch forward / backward (CPU and CUDA),
* ``triton_backend.py``: fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``),
* ``decode.py``: KV-cache decoding and chunked prefill,
* ``custom_op.py``: the ``torch.library`` op ``torch.compile`` sees,
* ``api.py``: the public op (checks and dispatch).
"""

from .api import parallax_attention
from .decode import parallax_attention_with_kvcache
from .reference import parallax_attention_ref

__all__ = ["parallax_attention", "parallax_attention_with_kvcache", "parallax_attention_ref"]
