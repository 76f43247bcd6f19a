"""torch.compile(fullgraph=True) of code using the op: no graph breaks, matches eager (CPU).

Compile is slow: few, small cases.  The "aot_eager" backend exercises the same tracing (dynamo +
fake tensors + autograd registration) as inductor, quicker; one case runs the default inductor.
"""

from __future__ import annotations

import pytest
import torch

import lla
from lla.nn import LocalLinearAttention, ParallaxAttention
from conftest import make_qkv, rel_err


def _fn(q, k, v, ridge):
    return lla.local_linear_attention(q, k, v, ridge=ridge) * 2.0 + 1.0


def test_custom_op_registered_and_opcheck():
    from lla.ops.lla import custom_op  # noqa: F401

    q, k, v = make_qkv(B=1, T=6, H=2, Hk=1, D=4, dtype=torch.float64, requires_grad=True)
    lam = torch.full((1, 6, 2), 0.5, dtype=torch.float64, requires_grad=True)
    args = (q, k, v, lam, None, 0.5, -1, 0, "direct", 16, 1e-11, True, "auto")
    torch.library.opcheck(torch.ops.lla.fwd.default, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiled_function_forward_backward_matches_eager():
    q, k, v = make_qkv(B=2, T=12, H=4, Hk=2, D=8, dtype=torch.float32, requires_grad=True)
    ridge = torch.tensor([0.3, 1.0, 2.0, 5.0], requires_grad=True)
    compiled = torch.compile(_fn, fullgraph=True)
    out_c = compiled(q, k, v, ridge)
    grads_c = torch.autograd.grad(out_c.square().sum(), (q, k, v, ridge))
    out_e = _fn(q, k, v, ridge)
    grads_e = torch.autograd.grad(out_e.square().sum(), (q, k, v, ridge))
    assert rel_err(out_c, out_e) <= 1e-6
    for gc, ge in zip(grads_c, grads_e):
        assert rel_err(gc, ge) <= 1e-5


def test_compiled_layer_and_varlen_aot_eager():
    torch.manual_seed(0)
    layer = LocalLinearAttention(32, 4, num_kv_heads=2, qk_norm=True)
    x = torch.randn(2, 10, 32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out_c = compiled(x)
    out_c.sum().backward()
    g_c = layer.raw_ridge.grad.clone()
    layer.zero_grad()
    out_e = layer(x)
    out_e.sum().backward()
    assert rel_err(out_c, out_e) <= 1e-6
    assert rel_err(g_c, layer.raw_ridge.grad) <= 1e-5

    q, k, v = make_qkv(B=1, T=9, H=2, D=8, dtype=torch.float64, seed=2)
    cu = torch.tensor([0, 4, 9])
    f = torch.compile(lambda q, k, v, cu: lla.local_linear_attention(q, k, v, ridge=0.7, cu_seqlens=cu), fullgraph=True, backend="aot_eager")
    ref = torch.cat([lla.local_linear_attention_ref(q[:, a:b], k[:, a:b], v[:, a:b], ridge=0.7) for a, b in ((0, 4), (4, 9))], 1)
    assert rel_err(f(q, k, v, cu), ref) <= 1e-10


@pytest.mark.parametrize("cls", [LocalLinearAttention, ParallaxAttention])
def test_compiled_layer_with_padding_mask_fullgraph(cls):
    """A padding mask under torch.compile(fullgraph=True): the static-shape path (real tokens sorted
    to the front) equals eager's packed varlen path (forward and every gradient), padded rows zero,
    and a padded token changes nothing it must not."""
    torch.manual_seed(0)
    layer = cls(32, 4, num_kv_heads=2, qk_norm=True, dtype=torch.float64)
    if cls is ParallaxAttention:
        torch.nn.init.normal_(layer.r_proj.weight, std=0.1)
    x = torch.randn(3, 9, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :4] = False  # left padded
    mask[1, 6:] = False  # right padded
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out_c = compiled(x, attention_mask=mask)
    grads_c = torch.autograd.grad(out_c.sin().sum(), (x, *layer.parameters()))
    out_e = layer(x, attention_mask=mask)
    grads_e = torch.autograd.grad(out_e.sin().sum(), (x, *layer.parameters()))
    assert rel_err(out_c, out_e) <= 1e-12
    for gc, ge in zip(grads_c, grads_e):
        assert rel_err(gc, ge) <= 1e-10
    assert torch.equal(out_c[~mask], torch.zeros_like(out_c[~mask]))
    assert torch.equal(grads_c[0][~mask], torch.zeros_like(grads_c[0][~mask]))  # pads get no gradient
    # each padded sequence equals the sequence alone
    for b in range(2):
        assert rel_err(out_c[b, mask[b]], layer(x[b : b + 1, mask[b]])[0]) <= 1e-10
    # a wild padded token changes no real output
    x2 = x.detach().clone()
    x2[0, 1] *= 1e4
    x2[1, 7] *= 1e4
    out2 = compiled(x2, attention_mask=mask)
    assert torch.isfinite(out2).all()
    assert rel_err(out2[mask], out_c[mask]) <= 1e-12
