"""Blockwise PyTorch backend (CPU and CUDA): see ``function.py`` for the math it computes."""

from .function import LLATorchFunction, lla_torch

__all__ = ["lla_torch", "LLATorchFunction"]
