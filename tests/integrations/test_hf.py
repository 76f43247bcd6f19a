"""transformers integration: tiny random Llama / Qwen2 models (no downloads) with attn_implementation="lla"."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lla  # noqa: E402
import lla.integrations.transformers as lla_hf  # noqa: E402
from conftest import rel_err  # noqa: E402
from lla.ops.lla.reference import softmax_attention_ref  # noqa: E402


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


def test_attention_function_defaults_and_decode_step():
    class M(torch.nn.Module):
        is_causal = True
        config = None

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, w = lla_hf.lla_attention_forward(M(), q[:, :, -2:], k, v, None, scaling=0.5)
    assert w is None and out.shape == (1, 2, 4, 8)
    ref = lla.local_linear_attention_ref(q[:, :, -2:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ridge=lla_hf.DEFAULT_RIDGE, scale=0.5)
    assert rel_err(out, ref) <= 1e-10  # bottom-right causal: the last 2 queries of 6 keys
    one, _ = lla_hf.lla_attention_forward(M(), q[:, :, -1:], k, v, None, scaling=0.5)  # decode step
    assert rel_err(one, ref[:, -1:]) <= 1e-10
    with pytest.raises(ValueError, match="2-D"):
        lla_hf.lla_attention_forward(M(), q, k, v, torch.ones(1, 1, 6, 6, dtype=torch.bool))


@pytest.mark.parametrize("causal, T", [(True, 3), (True, 7), (False, 7)])
def test_padded_batch_paths_equal_each_sequence_alone(causal, T):
    """Padded batches through the attention function (one varlen op call, no loop over the batch):
    a chunk of T = 3 queries against S = 7 cached keys (bottom-right causal), a padded prefill, and
    non-causal (encoder) attention; interior padding included.  Each sequence equals its real tokens
    alone; padded query rows are zero."""
    class M(torch.nn.Module):
        is_causal = causal
        config = None

    g = torch.Generator().manual_seed(6)
    S = 7
    q = torch.randn(3, 4, T, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 2, S, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(3, S, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, [1, 5]] = False  # interior padding (a query row too)
    out, _ = lla_hf.lla_attention_forward(M(), q, k, v, mask, scaling=0.4)
    assert out.shape == (3, T, 4, 8)
    for b in range(3):
        kj, qi = mask[b], mask[b, S - T :]
        alone = lla.local_linear_attention_ref(q[b : b + 1, :, qi].transpose(1, 2), k[b : b + 1, :, kj].transpose(1, 2),
                                               v[b : b + 1, :, kj].transpose(1, 2), ridge=lla_hf.DEFAULT_RIDGE, scale=0.4,
                                               causal=causal)
        assert rel_err(out[b, qi], alone[0]) <= 1e-10
        assert torch.equal(out[b, ~qi], torch.zeros_like(out[b, ~qi]))


def test_padded_chunk_against_cache_computes_only_real_query_rows(monkeypatch):
    """A padded chunk of T = 3 queries against S = 7 keys: one varlen op call whose query rows are the
    real queries only (cu_seqlens_q / cu_seqlens_k), not S rows per sequence; outputs as alone."""
    class M(torch.nn.Module):
        is_causal = True
        config = None

    calls = []
    op = lla_hf.local_linear_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k")))
        return op(q, k, v, **kw)

    monkeypatch.setattr(lla_hf, "local_linear_attention", spy)
    g = torch.Generator().manual_seed(7)
    T, S = 3, 7
    q = torch.randn(3, 4, T, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 2, S, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(3, S, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, [1, 5]] = False  # interior padding, one of them a query row
    out, _ = lla_hf.lla_attention_forward(M(), q, k, v, mask, scaling=0.4)
    assert len(calls) == 1
    rows_q, rows_k, cu_q, cu_k = calls[0]
    assert rows_q == int(mask[:, S - T :].sum()) == 8 and rows_k == int(mask.sum()) == 16
    assert cu_q.tolist() == [0, 3, 6, 8] and cu_k.tolist() == [0, 7, 11, 16]
    for b in range(3):
        kj, qi = mask[b], mask[b, S - T :]
        alone = lla.local_linear_attention_ref(q[b : b + 1, :, qi].transpose(1, 2), k[b : b + 1, :, kj].transpose(1, 2),
                                               v[b : b + 1, :, kj].transpose(1, 2), ridge=lla_hf.DEFAULT_RIDGE, scale=0.4)
        assert rel_err(out[b, qi], alone[0]) <= 1e-10
        assert torch.equal(out[b, ~qi], torch.zeros_like(out[b, ~qi]))


def test_register_takes_no_process_global_ridge():
    with pytest.raises(TypeError, match="lla_ridge"):
        lla_hf.register(ridge=0.3)
    with pytest.raises(TypeError, match="lla_solver"):
        lla_hf.register(solver="cg")


def test_ridge_and_solver_are_per_model():
    """Two models in one process, each with its own config ridge / solver."""
    transformers.AttentionInterface.register("lla_ref_test", _ref_attention)
    transformers.masking_utils.AttentionMaskInterface.register("lla_ref_test", transformers.masking_utils.flash_attention_mask)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(6))
    a = _model(dtype=torch.float64, lla_ridge=0.05)
    b = _model(dtype=torch.float64, lla_ridge=20.0)  # same weights (same seed), another ridge
    got_a, got_b = a(ids).logits, b(ids).logits
    assert rel_err(got_a, got_b) > 1e-3  # the ridges differ, so must the models
    for model, got in ((a, got_a), (b, got_b)):
        model.set_attn_implementation("lla_ref_test")
        assert rel_err(got, model(ids).logits) <= 1e-9
        model.set_attn_implementation("lla")
    # the solver too: a bad one in one model's config fails that model only
    a.config.lla_solver = "no-such-solver"
    with pytest.raises(ValueError, match="solver"):
        a(ids)
    b(ids)


def _softmax_window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """Softmax attention with our reading of ``sliding_window`` (window_size left = sliding_window - 1;
    ``module.window_shift`` moves it, to show an off-by-one would be seen)."""
    assert attention_mask is None
    left = sliding_window - 1 + getattr(module, "window_shift", 0)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return softmax_attention_ref(q, k, v, scale=scaling, window_size=(left, 0)).to(query.dtype), None


def _lla_window_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """The float64 LLA reference with window_size left = sliding_window - 1."""
    assert attention_mask is None and sliding_window is not None
    ridge = getattr(module.config, "lla_ridge", None) or 1.0
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return lla.local_linear_attention_ref(q, k, v, ridge=ridge, scale=scaling, window_size=(sliding_window - 1, 0)).to(query.dtype), None


def test_sliding_window_is_transformers_semantics():
    """Mistral with sliding_window (4) < sequence (11): transformers' own eager attention equals
    softmax attention with window_size = (sliding_window - 1, 0), and the lla model equals the float64
    LLA reference with that window."""
    mi = transformers.masking_utils.AttentionMaskInterface
    for name, fn in (("softmax_window_test", _softmax_window_attention), ("lla_window_test", _lla_window_reference)):
        transformers.AttentionInterface.register(name, fn)
        mi.register(name, transformers.masking_utils.flash_attention_mask)
    model = _model("MistralForCausalLM", "MistralConfig", attn="sdpa", dtype=torch.float64, sliding_window=4, lla_ridge=0.3)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(7))
    hf_sdpa = model(ids).logits
    model.set_attn_implementation("eager")
    assert rel_err(model(ids).logits, hf_sdpa) <= 1e-6  # (eager's softmax runs in float32)
    model.set_attn_implementation("softmax_window_test")
    assert rel_err(model(ids).logits, hf_sdpa) <= 1e-12
    for shift in (-1, 1):  # one key more or less in the window is seen
        for layer in model.model.layers:
            layer.self_attn.window_shift = shift
        assert rel_err(model(ids).logits, hf_sdpa) > 1e-3
    model.set_attn_implementation("lla")
    got = model(ids).logits
    model.set_attn_implementation("lla_window_test")
    assert rel_err(got, model(ids).logits) <= 1e-9


def test_sliding_window_hides_tokens_outside_it():
    """One Mistral layer, window 4: the last position's logits do not move when a token 5 back changes
    (it would without the window), and do when a token inside the window changes."""
    model = _model("MistralForCausalLM", "MistralConfig", dtype=torch.float64, sliding_window=4, num_hidden_layers=1).eval()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(8))
    base = model(ids).logits[0, -1]
    outside, inside = ids.clone(), ids.clone()
    outside[0, 5] = (ids[0, 5] + 1) % 64  # key 5 of 10: the last query (9) sees keys 6..9
    inside[0, 6] = (ids[0, 6] + 1) % 64
    assert rel_err(model(outside).logits[0, -1], base) <= 1e-12
    assert rel_err(model(inside).logits[0, -1], base) > 1e-4


def test_sliding_window_generate_cache_and_left_padding():
    """Generation through transformers' sliding-window cache (it keeps sliding_window - 1 past keys)
    and the padded decode path give what the uncached, unpadded model gives."""
    model = _model("MistralForCausalLM", "MistralConfig", dtype=torch.float64, sliding_window=3).eval()
    model.generation_config.eos_token_id = None  # always 4 new tokens
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    alone = model.generate(ids[1:, 3:], attention_mask=mask[1:, 3:], use_cache=True, **kw)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[1, 8:], alone[0, 5:])
    full = model(cached[:1]).logits[0, -5:-1]
    step_logits = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True).logits
    assert rel_err(torch.stack(step_logits, 1)[0], full) <= 1e-6  # generate hands back float32 logits


def test_softcap_dropout_and_position_bias_are_refused():
    class M(torch.nn.Module):
        is_causal = True
        config = None

    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    f = lla_hf.lla_attention_forward
    with pytest.raises(ValueError, match="softcap"):
        f(M(), q, q, q, None, scaling=0.5, softcap=50.0)
    with pytest.raises(ValueError, match="dropout"):
        f(M(), q, q, q, None, scaling=0.5, dropout=0.1)
    with pytest.raises(ValueError, match="position_bias"):
        f(M(), q, q, q, None, position_bias=torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="sliding_window"):
        f(M(), q, q, q, None, sliding_window=0)
    f(M(), q, q, q, None, dropout=0.0, softcap=None)  # the values models pass when unused are fine
    # through models: attention dropout in training mode; Gemma 2's logit soft-capping
    model = _model(attention_dropout=0.1)
    ids = torch.randint(0, 64, (1, 6))
    with pytest.raises(ValueError, match="dropout"):
        model.train()(ids)
    model.eval()(ids)  # dropout is only passed in training mode
    gemma = _model("Gemma2ForCausalLM", "Gemma2Config", head_dim=8, attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="softcap"):
        gemma(ids)
