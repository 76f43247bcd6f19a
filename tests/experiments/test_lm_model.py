"""The language model's building blocks: rotary positions in the mixers, tied embeddings, and
prefill + token-by-token decoding through ``KVCache`` equal to the full forward."""

import pytest
import torch

from lla.experiments.model import CausalModel, ModelConfig
from lla.nn import KVCache
from lla.experiments.mixers import CACHE_MIXERS, MIXERS, ROPE_MIXERS


def _model(mixer, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=mixer, d_model=32, num_heads=2, n_layers=2, vocab_size=256, output_dim=256, rope=True,
                      tie_embeddings=True, mixer_kwargs={"window": 5} if mixer == "sliding_window" else {}, **kw)
    return CausalModel(cfg).double().eval()


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_every_mixer_builds_with_rope_and_tied_embeddings(mixer):
    m = _model(mixer)
    assert m.head.weight is m.read_in.weight and m.head.bias is None
    assert m.supports_cache == (mixer in CACHE_MIXERS)
    x = torch.randint(0, 256, (2, 9))
    out = m(x)
    assert out.shape == (2, 9, 256) and torch.isfinite(out).all()
    # tied: the read-out is the embedding's transpose
    h = m.norm(torch.randn(1, 1, 32, dtype=torch.float64))
    torch.testing.assert_close(m.head(h), h @ m.read_in.weight.T)


@pytest.mark.parametrize("mixer", sorted(ROPE_MIXERS))
def test_rope_makes_the_mixer_position_aware(mixer):
    """Without positions these mixers are permutation-equivariant in the visible keys; rotary breaks
    that: the last row's output changes when two earlier tokens swap."""
    m = _model(mixer)
    x = torch.randint(0, 256, (1, 8))
    y = x.clone()
    y[0, [1, 2]] = x[0, [2, 1]]
    assert not torch.allclose(m(x)[0, -1], m(y)[0, -1], atol=1e-9)
    torch.manual_seed(0)
    plain = CausalModel(ModelConfig(mixer=mixer, d_model=32, num_heads=2, n_layers=1, vocab_size=256, output_dim=256,
                                    mixer_kwargs={"window": 64} if mixer == "sliding_window" else {})).double().eval()
    torch.testing.assert_close(plain(x)[0, -1], plain(y)[0, -1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixer", list(CACHE_MIXERS))
def test_cached_decoding_equals_the_full_forward(mixer):
    m = _model(mixer)
    x = torch.randint(0, 256, (2, 12))
    full = m(x)
    cache = KVCache(4)  # small: the buffers grow on the way
    inc = torch.cat([m(x[:, :7], cache=cache)] + [m(x[:, i : i + 1], cache=cache) for i in range(7, 12)], dim=1)
    torch.testing.assert_close(inc, full, rtol=1e-10, atol=1e-10)
    assert cache.get_seq_length(0) == 12 and cache.get_seq_length(1) == 12


@pytest.mark.parametrize("mixer", sorted(set(MIXERS) - set(CACHE_MIXERS)))
def test_recurrent_mixers_refuse_a_cache(mixer):
    with pytest.raises(ValueError, match="does not decode through a cache"):
        _model(mixer)(torch.randint(0, 256, (1, 3)), cache=KVCache())


def test_tied_embeddings_need_a_vocabulary_readout():
    with pytest.raises(ValueError, match="tie_embeddings"):
        CausalModel(ModelConfig(vocab_size=256, output_dim=10, tie_embeddings=True))
