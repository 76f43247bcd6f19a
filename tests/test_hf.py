"""transformers integration: tiny random Llama / Qwen2 models (no downloads) with attn_implementation="lla"."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lla  # noqa: E402
import lla.integrations.transformers as lla_hf  # noqa: E402
from conftest import rel_err  # noqa: E402


def _config(cls_name="LlamaConfig", **kw):
    cls = getattr(transformers, cls_name)
    args = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    args.update(kw)
    return cls(**args)


def _model(cls_name="LlamaForCausalLM", cfg_name="LlamaConfig", attn="lla", dtype=torch.float32, **kw):
    lla_hf.register()
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(_config(cfg_name, **kw)).to(dtype)
    model.set_attn_implementation(attn)
    return model


def _ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Test-local attention function: the float64 reference on the same tensors."""
    assert attention_mask is None
    ridge = getattr(module.config, "lla_ridge", None) or 1.0
    o = lla.local_linear_attention_ref(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), ridge=ridge, scale=scaling)
    return o.to(query.dtype), None


def test_training_step_runs():
    model = _model()
    assert model.config._attn_implementation == "lla"
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_greedy_generate_cache_equals_no_cache(family):
    model = _model(f"{family}ForCausalLM", f"{family}Config", dtype=torch.float64).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with_cache = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    no_cache = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, no_cache)
    # and the logits along the way agree to rounding (not just the argmax)
    full = model(with_cache).logits[:, -1]
    assert torch.isfinite(full).all()


def test_left_padded_generate_equals_unpadded():
    model = _model(dtype=torch.float64).eval()
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    padded = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[1:, 4:], attention_mask=mask[1:, 4:], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(padded[1, 10:], alone[0, 6:])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() does; rotary runs in float32
    logits_pad = model(ids, attention_mask=mask, position_ids=positions).logits[1, 4:]
    logits_alone = model(ids[1:, 4:]).logits[0]
    assert rel_err(logits_pad, logits_alone) <= 1e-10


@pytest.mark.parametrize("ridge", [None, 0.2])
def test_model_equals_direct_op_call(ridge):
    transformers.AttentionInterface.register("lla_ref_test", _ref_attention)
    transformers.masking_utils.AttentionMaskInterface.register("lla_ref_test", transformers.masking_utils.flash_attention_mask)
    extra = {} if ridge is None else {"lla_ridge": ridge}
    model = _model(dtype=torch.float64, **extra)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(4))
    got = model(ids).logits
    model.set_attn_implementation("lla_ref_test")
    want = model(ids).logits
    assert rel_err(got, want) <= 1e-9
    if ridge is not None:  # the config's ridge is used: a different ridge gives different logits
        model.config.lla_ridge = 5.0
        assert rel_err(model(ids).logits, want) > 1e-4


def test_register_ridge_default_and_attention_function(monkeypatch):
    monkeypatch.setitem(lla_hf._state, "ridge", None)
    lla_hf.register(ridge=0.3)
    assert lla_hf._state["ridge"] == 0.3

    class M(torch.nn.Module):
        is_causal = True
        config = None

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, w = lla_hf.lla_attention_forward(M(), q[:, :, -2:], k, v, None, scaling=0.5)
    assert w is None and out.shape == (1, 2, 4, 8)
    ref = lla.local_linear_attention_ref(q[:, :, -2:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ridge=0.3, scale=0.5)
    assert rel_err(out, ref) <= 1e-10  # bottom-right causal: the last 2 queries of 6 keys
    one, _ = lla_hf.lla_attention_forward(M(), q[:, :, -1:], k, v, None, scaling=0.5)  # decode step
    assert rel_err(one, ref[:, -1:]) <= 1e-10
    with pytest.raises(ValueError, match="ridge"):
        lla_hf.register(ridge=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        lla_hf.lla_attention_forward(M(), q, k, v, torch.ones(1, 1, 6, 6, dtype=torch.bool))
