"""One rank of the multi-process tests in ``test_distributed.py`` (not collected by pytest).

``python tests/integrations/dist_worker.py CASE OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set (gloo, CPU).  Every rank computes the single-process op on the unsharded
sequence itself (same seeds on every rank), runs the context-parallel op on its shard, and writes
``OUT_DIR/rank{R}.json``: a list of ``{"name", "err", "tol"}`` checks (``err`` the relative-RMS error
of an output or gradient), plus anything else the case reports.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

import lla
from lla.distributed import context_parallel_attention, shard, unshard

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def _inputs(B, T, H, Hk, D, dtype, seed, ridge_kind, with_r=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x = {"q": t(B, T, H, D), "k": t(B, T, Hk, D), "v": t(B, T, Hk, D)}
    if with_r:
        x["r"] = 0.3 * t(B, T, H, D)
    if ridge_kind == "head":
        x["ridge"] = (0.5 + torch.rand(H, generator=g, dtype=torch.float64)).to(dtype)
    elif ridge_kind == "position":
        x["ridge"] = (0.5 + torch.rand(B, T, H, generator=g, dtype=torch.float64)).to(dtype)
    return x


def compare(name, *, B=2, T=24, H=2, Hk=None, D=8, dtype=torch.float64, sharding="zigzag", causal=True,
            window=(-1, -1), ridge_kind="scalar", mechanism="lla", seed=0, group=None, **op_kwargs):
    """CP op vs single-process op: output and the gradients of every input (an upstream gradient
    drawn with the same seed on every rank)."""
    Hk = H if Hk is None else Hk
    parallax = mechanism == "parallax"
    full = _inputs(B, T, H, Hk, D, dtype, seed, ridge_kind, with_r=parallax)
    for x in full.values():
        x.requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype)

    # single process, unsharded
    kw = dict(op_kwargs, causal=causal, window_size=window)
    if parallax:
        o_ref = lla.parallax_attention(full["q"], full["r"], full["k"], full["v"], **kw)
    else:
        ridge = full.get("ridge", 1.0)
        o_ref = lla.local_linear_attention(full["q"], full["k"], full["v"], ridge=ridge, **kw)
    names = [n for n in full]
    grads_ref = torch.autograd.grad(o_ref, [full[n] for n in names], do)

    # sharded (padding at the end when T does not divide)
    loc = {n: shard(x.detach(), group, sharding, pad=True).requires_grad_(True)
           for n, x in full.items() if not (n == "ridge" and ridge_kind == "head")}
    if ridge_kind == "head":
        loc["ridge"] = full["ridge"].detach().clone().requires_grad_(True)
    args = dict(group=group, sharding=sharding, causal=causal, window_size=window, seqlen=T, mechanism=mechanism, **op_kwargs)
    if parallax:
        o = context_parallel_attention(loc["q"], loc["k"], loc["v"], r=loc["r"], **args)
    else:
        o = context_parallel_attention(loc["q"], loc["k"], loc["v"], ridge=loc.get("ridge", 1.0), **args)
    grads = torch.autograd.grad(o, [loc[n] for n in names], shard(do, group, sharding, pad=True))
    checks = [{"name": f"{name}/o", "err": rel_err(unshard(o.detach(), group, sharding, seqlen=T), o_ref), "tol": TOL[dtype]}]
    for n, gl, gr in zip(names, grads, grads_ref):
        if n == "ridge" and ridge_kind == "head":
            gl = gl.clone()
            dist.all_reduce(gl, group=group)  # a shared parameter: every rank holds its share
        else:
            gl = unshard(gl, group, sharding, seqlen=T)
        checks.append({"name": f"{name}/d{n}", "err": rel_err(gl, gr), "tol": TOL[dtype]})
    tail = unshard(o.detach(), group, sharding)[:, T:]  # padded rows (if any) output zeros
    if tail.numel():
        checks.append({"name": f"{name}/padded rows are zero", "err": float(tail.abs().max()), "tol": 0.0})
    return checks


def case_attention(group=None):
    f64, f32 = torch.float64, torch.float32
    checks = []
    for sharding in ("zigzag", "contiguous"):
        for causal in (True, False):
            tag = f"{sharding}/{'causal' if causal else 'full'}"
            checks += compare(f"{tag}/fp64", sharding=sharding, causal=causal, dtype=f64)
            checks += compare(f"{tag}/fp32", sharding=sharding, causal=causal, dtype=f32, seed=1)
            checks += compare(f"{tag}/fp64/gqa/window/ridge[B,T,H]", sharding=sharding, causal=causal, H=4, Hk=2,
                              window=(5, 3), ridge_kind="position", seed=2)
            checks += compare(f"{tag}/fp64/T=21/ridge[H]", sharding=sharding, causal=causal, T=21, ridge_kind="head", seed=3)
    checks += compare("zigzag/causal/fp32/cg", dtype=f32, solver="cg", seed=4)
    checks += compare("zigzag/causal/fp32/direct/gqa", dtype=f32, solver="direct", H=4, Hk=1, seed=5)
    checks += compare("zigzag/full/fp64/window(-1,2)", causal=False, window=(-1, 2), seed=6)
    checks += compare("zigzag/full/fp64/window(4,-1)", causal=False, window=(4, -1), seed=7)
    checks += compare("contiguous/causal/fp64/window(0,0)", sharding="contiguous", window=(0, 0), seed=8)
    checks += layer_checks(group)
    world = dist.get_world_size()
    for cp in sorted({world, 2, 1}):
        checks += model_checks(cp)
    return {"checks": checks, "warning": _warning_check(group)}


def _warning_check(group):
    """A solve cut off after one CG iteration must warn on this rank, naming the rank."""
    rank = dist.get_rank(group)
    x = _inputs(1, 32, 2, 2, 16, torch.float32, 9, "scalar")
    loc = {n: shard(t, group) for n, t in x.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        context_parallel_attention(loc["q"], loc["k"], loc["v"], ridge=1e-2, group=group, solver="cg", max_iters=1)
    msgs = [str(w.message) for w in caught if issubclass(w.category, lla.LLAConvergenceWarning)]
    return {"n": len(msgs), "names_rank": any(f"context parallel rank {rank}/" in m for m in msgs)}


def model_checks(cp: int):
    """One training step's gradients under the trainer's context/data parallelism (``cp`` ranks
    per sequence, ``world / cp`` replicas, DDP) equal one process's on the whole batch.

    MQAR at T = 30 (padded to a multiple of 2 cp), learned positions, the ``lla`` mixer (sharded
    natively) and ``softmax`` (the gather-everything fallback).  The task loss runs in float32, so
    the tolerance is float32's (1e-5).
    """
    import copy

    from torch.nn.parallel import DistributedDataParallel

    from lla.distributed import set_context_parallel
    from lla.experiments.model import CausalModel, ModelConfig
    from lla.experiments.tasks.mqar import MQARTask, make_mqar
    from lla.experiments.train import _cp_loss, context_parallel_groups

    cp_group, dp_rank, dp_world = context_parallel_groups(cp)
    x, y = make_mqar(4, 30, 4, 64, torch.Generator().manual_seed(0))
    checks = []
    for mixer in ("lla", "softmax"):
        torch.manual_seed(0)
        model = CausalModel(ModelConfig(mixer=mixer, d_model=16, num_heads=2, n_layers=2, vocab_size=64, output_dim=64,
                                        max_len=32)).double()
        ref = copy.deepcopy(model)
        loss_ref = MQARTask.loss(ref(x), y)
        loss_ref.backward()
        per = x.shape[0] // dp_world
        xs, ys = x[dp_rank * per : (dp_rank + 1) * per], y[dp_rank * per : (dp_rank + 1) * per]
        ddp = DistributedDataParallel(model)
        if cp > 1:
            set_context_parallel(model, cp_group)
            xs, ys = shard(xs, cp_group, pad=True), shard(ys, cp_group, pad=True, pad_value=-100)
            loss = _cp_loss(MQARTask, ddp(xs), ys, cp_group, cp)
        else:
            loss = MQARTask.loss(ddp(xs), ys)
        loss.backward()
        lv = loss.detach().clone()
        dist.all_reduce(lv)
        lv /= dist.get_world_size()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        grads_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
        tag = f"model/{mixer}/cp{cp}xdp{dp_world}"
        checks.append({"name": f"{tag}/loss", "err": rel_err(lv, loss_ref), "tol": 1e-5})
        checks.append({"name": f"{tag}/grad", "err": rel_err(grads, grads_ref), "tol": 1e-5})
    return checks


def layer_checks(group=None):
    """``nn.LocalLinearAttention(cp_group=...)``: rotary at the global positions, GQA; output and
    the gradients of x and of every parameter (summed over ranks) equal the unsharded layer's."""
    import copy

    from lla.nn import LocalLinearAttention

    checks = []
    for sharding in ("zigzag", "contiguous"):
        torch.manual_seed(0)
        ref = LocalLinearAttention(32, 4, 2, qk_norm=True, dtype=torch.float64)
        layer = copy.deepcopy(ref)
        layer.cp_group, layer.cp_sharding = dist.group.WORLD if group is None else group, sharding
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 16, 32, generator=g, dtype=torch.float64, requires_grad=True)
        do = torch.randn(2, 16, 32, generator=g, dtype=torch.float64)
        o_ref = ref(x)
        (o_ref * do).sum().backward()
        x_loc = shard(x.detach(), group, sharding).requires_grad_(True)
        o = layer(x_loc)
        (o * shard(do, group, sharding)).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
        dist.all_reduce(grads, group=group)
        tag = f"layer/{sharding}"
        checks.append({"name": f"{tag}/o", "err": rel_err(unshard(o.detach(), group, sharding), o_ref), "tol": 1e-10})
        checks.append({"name": f"{tag}/dx", "err": rel_err(unshard(x_loc.grad, group, sharding), x.grad), "tol": 1e-10})
        checks.append({"name": f"{tag}/dparams", "err": rel_err(grads, torch.cat([p.grad.flatten() for p in ref.parameters()])),
                       "tol": 1e-10})
    return checks


def case_parallax(group=None):
    checks = []
    for sharding in ("zigzag", "contiguous"):
        for causal in (True, False):
            tag = f"parallax/{sharding}/{'causal' if causal else 'full'}"
            checks += compare(f"{tag}/fp64", mechanism="parallax", sharding=sharding, causal=causal)
            checks += compare(f"{tag}/fp32", mechanism="parallax", sharding=sharding, causal=causal, dtype=torch.float32, seed=1)
            checks += compare(f"{tag}/fp64/gqa/window/T=21", mechanism="parallax", sharding=sharding, causal=causal,
                              H=4, Hk=2, window=(5, 3), T=21, seed=2)
    return {"checks": checks}


def main():
    case, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        res = {"case_attention": case_attention, "case_parallax": case_parallax}[f"case_{case}"]()
        with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
