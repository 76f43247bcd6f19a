"""Hugging Face ``transformers`` integration: ``register()`` adds ``"lla"`` as an attention backend.

    import lla.integrations.transformers as lla_hf
    lla_hf.register()
    config = MistralConfig(..., attn_implementation="lla")  # or model.set_attn_implementation("lla")
    config.lla_ridge = 0.5      # optional, per model: a float or one value per query head (default 1.0)
    config.lla_solver = "cg"    # optional, per model: "auto" (default), "cg" or "direct"

Any model that dispatches through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen2, ...) then
computes its attention with ``lla.local_linear_attention``; training (``loss.backward()``) and
``generate()`` with the standard ``DynamicCache`` work (the cache hands the attention the full
key/value history and LLA's bottom-right causal alignment does the rest).

What the model passes is honoured or refused, never dropped:

* ``sliding_window`` (Mistral, Qwen2's sliding layers): transformers' convention for the attention
  function's argument is that a query sees ``sliding_window`` keys counting itself (the mask keeps
  ``kv_idx > q_idx - sliding_window``; its flash-attention path passes
  ``window_size = (sliding_window - 1, sliding_window - 1)``), so it becomes the op's
  ``window_size = (sliding_window - 1, sliding_window - 1)`` (the right side is moot when causal).
* ``is_causal`` (when given) overrides ``module.is_causal``.
* ``softcap`` (Gemma 2's logit soft-capping), ``dropout > 0`` (attention dropout in training) and
  ``position_bias`` raise a ``ValueError``: LLA has no such terms.

The ridge and the solver are read from the module's config (``config.lla_ridge``,
``config.lla_solver``) on every call, so two models in one process keep their own.

Masks: the name is also registered with ``AttentionMaskInterface`` using the flash-attention mask
builder, so the model hands us ``None`` (no padding) or the 2-D ``[B, S]`` padding mask.  A padded
batch goes through ``lla.nn.base.padded_attention`` (no loop over the batch): eager, the real
tokens are packed into one varlen sequence (the op's ``cu_seqlens``); under ``torch.compile`` a
causal batch takes a static-shape path (real tokens sorted to the front).  A padded chunk against a
cache (``T < S``) packs the real queries and each sequence's real keys into one varlen call with
``cu_seqlens_q`` / ``cu_seqlens_k`` (bottom-right causal per sequence): only the real query rows
are computed.  Under ``torch.compile`` the ``T`` queries are instead placed at the last ``T`` key
positions of a length-``S`` query tensor (zeros elsewhere, outputs dropped; ``S`` rows).  A padded
decoding step (``T == 1``) reads each sequence's real cache entries through
``local_linear_attention_with_kvcache``.  A window counts real tokens (as transformers'
flash-attention paths do; with left or right padding that is also what its sdpa/eager masks do).
"""

from __future__ import annotations

import torch

from ..nn.base import real_tokens_first, padded_attention
from ..ops import local_linear_attention, local_linear_attention_with_kvcache

__all__ = ["register", "lla_attention_forward", "NAME", "DEFAULT_RIDGE", "DEFAULT_SOLVER"]

NAME = "lla"
#: Ridge used when the module's config has no ``lla_ridge``.
DEFAULT_RIDGE = 1.0
#: Solver used when the module's config has no ``lla_solver``.
DEFAULT_SOLVER = "auto"


def _settings(module, query):
    """``(ridge, solver)`` of a module, from its config (``lla_ridge``, ``lla_solver``) or the defaults.

    The ridge is a float, or a sequence / tensor with one value per query head.
    """
    config = getattr(module, "config", None)
    ridge = getattr(config, "lla_ridge", None)
    solver = getattr(config, "lla_solver", None)
    if ridge is None:
        ridge = DEFAULT_RIDGE
    if solver is None:
        solver = DEFAULT_SOLVER
    if isinstance(ridge, (list, tuple)):
        ridge = torch.tensor(ridge, dtype=torch.float32, device=query.device)
    elif isinstance(ridge, torch.Tensor):
        ridge = ridge.to(query.device)
    return ridge, solver


def _window(sliding_window) -> int:
    """transformers' ``sliding_window`` (keys a query sees, itself included) -> the op's ``left``."""
    if sliding_window is None:
        return -1
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    return sliding_window - 1


def _refuse(softcap, dropout, position_bias, attention_mask) -> None:
    """``ValueError`` for what LLA has no term for (never dropped silently)."""
    if softcap is not None:
        raise ValueError(
            f"lla attention has no logit soft-capping, got softcap={softcap!r} (e.g. Gemma 2's "
            "attn_logit_softcapping): set it to None in the config or use another attn_implementation"
        )
    if dropout is not None and float(dropout) > 0:
        raise ValueError(
            f"lla attention does not implement attention dropout, got dropout={dropout!r}: set the config's "
            "attention_dropout to 0.0 (it is only applied in training mode)"
        )
    if position_bias is not None:
        raise ValueError("lla attention does not take an additive position_bias (T5-style relative attention)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"lla attention expects no mask or a 2-D [B, S] padding mask, got shape {tuple(attention_mask.shape)}; "
            "call lla.integrations.transformers.register() so the model builds the right mask"
        )


def _decode_step(q, k, v, keep, *, ridge, scale, solver, left):
    """One decoding step (``T == 1``): the kvcache op's single-token solve reads the keys in place;
    with padding (``keep [B, S]``), each sequence's real entries are sorted to the front (its cache
    length)."""
    lens = k.shape[1]
    if keep is not None:
        _, _, (k, v) = real_tokens_first(keep, (k, v))
        lens = keep.sum(1)
    return local_linear_attention_with_kvcache(q, k, v, cache_seqlens=lens, ridge=ridge, scale=scale, solver=solver,
                                               window_size=(left, -1))


def lla_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window=None,
    softcap=None,
    is_causal=None,
    position_bias=None,
    **kwargs,
):
    """transformers attention function: q ``[B, H, T, D]``, k/v ``[B, Hk, S, D]`` -> (``[B, T, H, Dv]``, None).

    ``attention_mask``: None (no padding; causal attention is bottom-right aligned so that ``T < S``
    with a cache works) or the 2-D ``[B, S]`` padding mask (True / 1 = real token).
    ``sliding_window``: a query sees the last ``sliding_window`` keys, itself included (op
    ``window_size = (sliding_window - 1, sliding_window - 1)``).  ``softcap``, ``dropout > 0`` and
    ``position_bias`` raise ``ValueError``.  Other keyword arguments (``position_ids``,
    ``output_attentions``, ...) do not change the attention and are ignored.
    """
    _refuse(softcap, dropout, position_bias, attention_mask)
    left = _window(sliding_window)
    q = query.transpose(1, 2)  # [B, T, H, D]
    k = key.transpose(1, 2)  # [B, S, Hk, D]
    v = value.transpose(1, 2)
    B, T = q.shape[:2]
    S = k.shape[1]
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    ridge, solver = _settings(module, query)
    kw = {"ridge": ridge, "scale": scaling, "solver": solver, "window_size": (left, left)}
    compiling = torch.compiler.is_compiling()
    keep = None if attention_mask is None else attention_mask.bool()[:, -S:]  # [B, S]
    if keep is not None and not compiling and bool(keep.all()):
        keep = None
    if T == 1 and not compiling and (causal or keep is None):
        return _decode_step(q, k, v, keep, ridge=ridge, scale=scaling, solver=solver, left=left), None
    if keep is None:
        return local_linear_attention(q, k, v, causal=causal, **kw).contiguous(), None
    if T < S and not compiling:  # only the real query rows, against each sequence's real keys
        return _packed_chunk(q, k, v, keep, causal=causal, **kw), None
    if T < S:  # compiled (static shapes): the queries are the last T key positions, put them there
        q = torch.cat([q.new_zeros(B, S - T, *q.shape[2:]), q], dim=1)
    o = padded_attention(local_linear_attention, (q,), k, v, keep, causal=causal, **kw)
    return o[:, S - T :], None


def _packed_chunk(q, k, v, keep, *, causal, **kw):
    """A padded chunk of ``T`` queries against ``S > T`` keys (cache + chunk), eager: the real queries
    and the real keys of every sequence packed into one varlen call (``cu_seqlens_q``,
    ``cu_seqlens_k``: bottom-right aligned per sequence, so the real queries, which are the sequence's
    last real keys, see exactly the real keys up to their own; a window counts real tokens).  Only the
    real query rows are computed; padded ones output zeros.  q ``[B, T, H, D]``, k, v ``[B, S, Hk, *]``,
    keep ``[B, S]`` bool -> ``[B, T, H, Dv]``."""
    B, T, H = q.shape[:3]
    S, Dv = k.shape[1], v.shape[3]
    keep_q = keep[:, S - T :]
    rows_q = keep_q.reshape(-1).nonzero().squeeze(-1)
    rows_k = keep.reshape(-1).nonzero().squeeze(-1)
    cu_seqlens_q = torch.nn.functional.pad(keep_q.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_seqlens_k = torch.nn.functional.pad(keep.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    out = q.new_zeros(B * T, H, Dv)
    if rows_q.numel():
        pack = lambda t, rows: t.reshape(-1, *t.shape[2:]).index_select(0, rows)[None]  # noqa: E731
        o = local_linear_attention(pack(q, rows_q), pack(k, rows_k), pack(v, rows_k), causal=causal,
                                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **kw)
        out = out.index_copy(0, rows_q, o[0])
    return out.view(B, T, H, Dv)


def register(name: str = NAME, **removed) -> str:
    """Register LLA with transformers' ``AttentionInterface`` (and its mask builder) as ``name``.

    The ridge and solver are per model: set ``config.lla_ridge`` / ``config.lla_solver`` (defaults
    ``DEFAULT_RIDGE`` = 1.0 and ``DEFAULT_SOLVER`` = "auto").  Returns the name.
    """
    if removed:
        raise TypeError(
            f"register() got {sorted(removed)}: the ridge and the solver are per model now; set "
            "config.lla_ridge / config.lla_solver on each model's config instead"
        )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, lla_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
