"""Hugging Face ``transformers`` integration: ``register()`` adds ``"lla"`` as an attention backend.

    import lla.integrations.transformers as lla_hf
    lla_hf.register()                                   # or register(ridge=0.5)
    config = LlamaConfig(..., attn_implementation="lla")  # or model.set_attn_implementation("lla")
    config.lla_ridge = 0.5                              # optional, per model (float or one per head)

Any model that dispatches through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Mistral, ...) then
computes its attention with ``lla.local_linear_attention``; training (``loss.backward()``) and
``generate()`` with the standard ``DynamicCache`` work (the cache hands the attention the full
key/value history and LLA's bottom-right causal alignment does the rest).

Masks: the name is also registered with ``AttentionMaskInterface`` using the flash-attention mask
builder, so the model hands us ``None`` (pure causal) or the 2-D ``[B, S]`` padding mask; padded
sequences are then run one by one on their real tokens.  Attention dropout is not applied (LLA's
weights are not a probability distribution).
"""

from __future__ import annotations

import torch

from ..ops import local_linear_attention, local_linear_attention_with_kvcache

__all__ = ["register", "lla_attention_forward", "NAME", "DEFAULT_RIDGE"]

NAME = "lla"
#: Ridge used when the model config has no ``lla_ridge`` and ``register`` got none.
DEFAULT_RIDGE = 1.0
_state = {"ridge": None, "solver": "auto"}


def _ridge_for(module, query):
    """The ridge for a module: ``config.lla_ridge`` > ``register(ridge=...)`` > ``DEFAULT_RIDGE``.

    A float, or a sequence / tensor with one value per query head.
    """
    config = getattr(module, "config", None)
    ridge = getattr(config, "lla_ridge", None)
    if ridge is None:
        ridge = _state["ridge"]
    if ridge is None:
        ridge = DEFAULT_RIDGE
    if isinstance(ridge, (list, tuple)):
        ridge = torch.tensor(ridge, dtype=torch.float32, device=query.device)
    elif isinstance(ridge, torch.Tensor):
        ridge = ridge.to(query.device)
    return ridge


def lla_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q ``[B, H, T, D]``, k/v ``[B, Hk, S, D]`` -> (``[B, T, H, Dv]``, None).

    ``attention_mask``: None (causal, bottom-right aligned so that ``T < S`` with a cache works) or
    the 2-D ``[B, S]`` padding mask (True / 1 = real token).
    """
    q = query.transpose(1, 2)  # [B, T, H, D]
    k = key.transpose(1, 2)  # [B, S, Hk, D]
    v = value.transpose(1, 2)
    causal = bool(getattr(module, "is_causal", True))
    ridge = _ridge_for(module, query)
    kw = {"scale": scaling, "causal": causal, "solver": _state["solver"]}
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"lla attention expects no mask or a 2-D [B, S] padding mask, got shape {tuple(attention_mask.shape)}; "
            "call lla.integrations.transformers.register() so the model builds the right mask"
        )
    if attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.bool().all())):
        if q.shape[1] == 1 and not torch.compiler.is_compiling():
            # one decoding step: the cache's keys/values are all visible; the kvcache op's direct
            # single-token solve reads them in place (no copies)
            o = local_linear_attention_with_kvcache(
                q, k, v, cache_seqlens=k.shape[1], ridge=ridge, scale=scaling, solver=_state["solver"]
            )
            return o, None
        return local_linear_attention(q, k, v, ridge=ridge, **kw).contiguous(), None
    B, T = q.shape[:2]
    S = k.shape[1]
    keep = attention_mask.bool()[:, -S:]  # [B, S]
    out = q.new_zeros(B, T, q.shape[2], v.shape[3])
    for b in range(B):  # padded batch: each sequence on its real tokens
        kj = keep[b].nonzero().squeeze(-1)
        qi = keep[b, S - T :].nonzero().squeeze(-1)
        if kj.numel() == 0 or qi.numel() == 0:
            continue
        ob = local_linear_attention(q[b : b + 1, qi], k[b : b + 1, kj], v[b : b + 1, kj], ridge=ridge, **kw)
        out = out.index_put((torch.tensor([b], device=q.device), qi), ob[0])
    return out, None


def register(ridge=None, *, solver: str = "auto", name: str = NAME) -> str:
    """Register LLA with transformers' ``AttentionInterface`` (and its mask builder) as ``name``.

    Args:
        ridge: default ridge for models whose config has no ``lla_ridge`` (float, or one value
            per query head).  None keeps the previous default (``DEFAULT_RIDGE`` at first).
        solver: passed to the op.
        name: the ``attn_implementation`` string.

    Returns the name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    if ridge is not None:
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float, list, tuple, torch.Tensor)):
            raise TypeError(f"ridge must be a float, a per-head sequence or a tensor, got {type(ridge).__name__}")
        if isinstance(ridge, (int, float)) and not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        _state["ridge"] = ridge
    _state["solver"] = solver
    AttentionInterface.register(name, lla_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
