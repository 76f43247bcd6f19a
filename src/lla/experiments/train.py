"""Training loop: AdamW, warmup + cosine schedule, seeded data, evaluation, checkpoint/resume,
tqdm progress, JSONL metrics; single process or DistributedDataParallel under ``torchrun``,
optionally with context parallelism (each sequence sharded over a group of ranks).

Every step's global batch is drawn from a generator seeded by ``(seed, step)``; each data-parallel
replica takes its slice.  So a resumed run sees exactly the batches an uninterrupted run would have
seen, and any number of processes trains on the same data as one process.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from lla.ops.common.diagnostics import LLAConvergenceWarning


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 32  # global: split over ranks
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    dtype: str = "fp32"  # "bf16": forward and loss under bf16 autocast (weights, gradients, optimizer fp32)

    def to_dict(self) -> dict:
        return asdict(self)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint exists at the run's path but was made under another configuration."""

    def __init__(self, path: str, old: dict | None, new: dict):
        diff = sorted(_diff_keys(old or {}, new))
        super().__init__(f"checkpoint {path} was made under another configuration (differs in: {', '.join(diff) or 'meta'}); "
                         f"use a new output directory, or restart=True (lla run --restart) to start over explicitly")
        self.path, self.differs = path, diff


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in dict.fromkeys([*a, *b]):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed() -> torch.device:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def batch_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank * 104_729 + 1)


def rng_state() -> dict:
    """Every RNG a training step may touch: torch CPU, CUDA (when present), python ``random``, numpy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is an extra
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def context_parallel_groups(cp: int):
    """``(cp_group, dp_rank, dp_world)`` for context-parallel groups of ``cp`` consecutive ranks.

    Every rank creates every group (``new_group`` is collective); ``cp_group`` is this rank's.
    """
    rank, world = dist_info()
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1 or world % cp:
        raise ValueError(f"context_parallel must be a positive divisor of the world size {world}, got {cp!r}")
    if cp == 1:
        return None, rank, world
    mine = None
    for d in range(world // cp):
        g = dist.new_group(list(range(d * cp, (d + 1) * cp)))
        if d == rank // cp:
            mine = g
    return mine, rank // cp, world // cp


def _cp_loss(task, out, y, cp_group, cp: int):
    """This rank's share of the replica's loss, times ``cp`` (DDP averages over all ranks).

    The share is the task's mean over this rank's labelled tokens weighted by their fraction of the
    replica's labelled tokens (labels ``-100`` are ignored), so the shares sum to the loss of the
    whole sequence batch.
    """
    n_loc = (y != -100).sum()
    n_all = n_loc.clone()
    dist.all_reduce(n_all, group=cp_group)
    if int(n_loc) == 0:  # nothing labelled here: still join the backward's collectives
        return out.sum().float() * 0.0  # (float32, like the tasks' losses: the loss all-reduce matches)
    return task.loss(out, y) * (n_loc / n_all) * cp


def _report_warnings(caught, log, desc: str, step: int) -> None:
    """Log each ``LLAConvergenceWarning`` of a training step (``{"kind": "warning", "run", "step",
    "message"}`` in metrics.jsonl, so that it can be traced to its run and step), then re-issue every
    caught warning as usual."""
    for w in caught:
        if log is not None and issubclass(w.category, LLAConvergenceWarning):
            log({"kind": "warning", "run": desc, "step": step, "message": str(w.message)})
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def train(model, task, cfg: TrainConfig, *, device, ckpt_path: str | None = None, log=None,
          desc: str = "train", stop_after: int | None = None, progress: bool = True, meta: dict | None = None,
          context_parallel: int = 1, eval_fn=None, eval_every: int = 0, restart: bool = False) -> dict:
    """Train ``model`` on ``task`` for ``cfg.steps`` steps (resuming from ``ckpt_path`` if it exists).

    ``task.sample(batch, generator) -> (inputs, targets)`` and ``task.loss(outputs, targets)``.
    ``stop_after`` ends this invocation after that many total steps (an interruption, for tests).
    ``meta`` (e.g. the model and train configs) is stored in the checkpoint; a checkpoint whose meta
    differs raises ``CheckpointMismatchError`` naming the differing keys (never a silent restart);
    ``restart=True`` ignores an existing checkpoint and starts over explicitly.
    ``eval_fn(model, step)`` (single process, no context parallelism) is called every ``eval_every``
    steps and after the last step, in eval mode (an evaluation curve; a resumed run calls it only for
    the steps it runs); an ``eval_fn`` with a ``seconds`` parameter also gets the training wall-clock
    seconds so far (training steps only, summed over resumed invocations).
    ``cfg.dtype`` "bf16": forward and loss under ``torch.autocast(dtype=bfloat16)``; weights,
    gradients and optimizer state stay fp32.  A non-finite loss or gradient norm raises
    ``FloatingPointError``.
    Checkpoints (atomic: a temporary file, then ``os.replace``) hold the model, optimizer, scheduler,
    the loader's state (``{"seed", "step"}``: batches are drawn from ``batch_generator(seed, step)``),
    every RNG state (torch, CUDA, ``random``, numpy; restored on resume) and the training seconds.
    ``context_parallel`` ``C`` > 1: groups of ``C`` consecutive ranks share each batch slice and shard
    its sequences (``lla.distributed``, zigzag, padded at the end); the task's targets must be
    per-token labels ``[B, T]`` (``-100`` ignored).  Data parallelism runs over ``world / C`` replicas;
    the loss is the mean of the replicas' losses (the whole batch's when every sequence has the same
    number of labelled tokens, as in every task here).
    Returns ``{"step", "loss", "train_seconds"}`` of the last step run (``train_seconds``: the
    training steps' wall-clock, summed over resumed invocations).  Rank 0 writes checkpoints and logs.
    """
    rank, world = dist_info()
    cp = context_parallel
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    autocast_dtype = DTYPES[cfg.dtype]
    cp_group, dp_rank, dp_world = context_parallel_groups(cp)
    if cfg.batch_size % dp_world != 0:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the data-parallel size {dp_world}")
    if cp > 1:
        from lla.distributed import set_context_parallel

        set_context_parallel(model, cp_group)
    model.to(device)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.warmup, cfg.steps))
    meta = {"train": cfg.to_dict(), **(meta or {})}
    start, start_loss, train_seconds = _resume(ckpt_path, model, opt, sched, cfg, meta, device, restart)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    eval_takes_seconds = eval_fn is not None and "seconds" in inspect.signature(eval_fn).parameters

    def save(step, loss):
        _save_checkpoint(ckpt_path if rank == 0 else None, model, opt, sched, step, loss, meta, cfg, train_seconds)
        if world > 1:
            dist.barrier()

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    last = {"step": start, "loss": start_loss}  # a finished run resumed reports its last loss
    bar = tqdm(range(start, end), desc=desc, disable=not progress or rank != 0, leave=False, dynamic_ncols=True)
    ddp.train()
    per = cfg.batch_size // dp_world
    tokens, t_log = 0, train_seconds  # tokens since the last log record, training seconds at it
    for step in bar:
        t_step = time.perf_counter()
        x, y = task.sample(cfg.batch_size, batch_generator(cfg.seed, step, 0))  # the global batch
        tokens += x.shape[0] * x.shape[1] if x.dim() >= 2 else x.numel()
        x, y = x[dp_rank * per : (dp_rank + 1) * per].to(device), y[dp_rank * per : (dp_rank + 1) * per].to(device)
        loss, grad_norm = _train_step(ddp, model, opt, task, x, y, cfg, autocast_dtype, cp, cp_group,
                                      log if rank == 0 else None, desc, step)
        sched.step()
        lv = loss.detach()
        if world > 1:
            dist.all_reduce(lv)
            lv /= world
        last = {"step": step + 1, "loss": lv.item()}
        train_seconds += time.perf_counter() - t_step
        if not math.isfinite(last["loss"]):
            raise FloatingPointError(f"{desc}: loss became {last['loss']} at step {step + 1}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if log is not None and rank == 0:
                dt = train_seconds - t_log
                rec = {"kind": "train", "run": desc, "step": step + 1, "loss": last["loss"], "lr": sched.get_last_lr()[0],
                       "tokens_per_s": tokens / dt if dt > 0 else None, "train_seconds": train_seconds}
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                log(rec)
            tokens, t_log = 0, train_seconds
        if eval_fn is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
            model.eval()
            eval_fn(model, step + 1, **({"seconds": train_seconds} if eval_takes_seconds else {}))
            ddp.train()
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < end:
            save(step + 1, last["loss"])
    bar.close()
    if end > start:
        save(end, last["loss"])
    if cp > 1:
        set_context_parallel(model, enabled=False)  # evaluation runs whole sequences
    model.eval()
    last["train_seconds"] = train_seconds
    return last


def _resume(ckpt_path, model, opt, sched, cfg, meta, device, restart):
    """Load ``ckpt_path`` (when it exists and ``restart`` is False) into the model, optimizer, scheduler and
    every RNG; a checkpoint of another configuration (``meta``) or another loader state raises
    ``CheckpointMismatchError``.  -> (first step, its loss, training seconds so far)"""
    state = torch.load(ckpt_path, map_location=device, weights_only=False) if ckpt_path and os.path.exists(ckpt_path) else None
    if state is not None and state.get("meta") != meta and not restart:
        raise CheckpointMismatchError(ckpt_path, state.get("meta"), meta)
    if state is None or restart:
        return 0, float("nan"), 0.0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    start = state["step"]
    if "loader" in state and state["loader"] != {"seed": cfg.seed, "step": start}:
        raise CheckpointMismatchError(ckpt_path, {"loader": state["loader"]}, {"loader": {"seed": cfg.seed, "step": start}})
    if "rng" in state:
        set_rng_state(state["rng"])
    return start, state.get("loss", float("nan")), state.get("train_seconds", 0.0)


def _save_checkpoint(ckpt_path, model, opt, sched, step, loss, meta, cfg, train_seconds) -> None:
    """Write the checkpoint atomically (a temporary file, then ``os.replace``); nothing when ``ckpt_path``
    is None.  The loader's state is the step (batches are drawn from ``batch_generator(seed, step, 0)``)."""
    if not ckpt_path:
        return
    os.makedirs(os.path.dirname(ckpt_path) or ".", exist_ok=True)
    tmp = ckpt_path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step, "loss": loss,
                "meta": meta, "loader": {"seed": cfg.seed, "step": step}, "rng": rng_state(),
                "train_seconds": train_seconds}, tmp)
    os.replace(tmp, ckpt_path)


def _train_step(ddp, model, opt, task, x, y, cfg, autocast_dtype, cp, cp_group, log, desc, step):
    """One optimizer step on the local batch ``x, y`` (forward and loss under autocast when asked; context
    parallel: sharded first), its numerical warnings logged with the step; the gradient clipped to
    ``cfg.grad_clip`` (a non-finite norm raises ``FloatingPointError``).  -> (loss, gradient norm or None)"""
    with warnings.catch_warnings(record=True) as caught:  # numerical warnings, logged with their step
        warnings.simplefilter("always", LLAConvergenceWarning)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            if cp > 1:
                from lla.distributed import shard

                if y.dim() != 2 or y.shape != x.shape[:2] or y.is_floating_point():
                    raise ValueError(f"{desc}: context parallelism needs per-token integer labels [B, T], got {tuple(y.shape)}")
                x, y = shard(x, cp_group, pad=True), shard(y, cp_group, pad=True, pad_value=-100)
                loss = _cp_loss(task, ddp(x), y, cp_group, cp)
            else:
                loss = task.loss(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    _report_warnings(caught, log, desc, step + 1)
    grad_norm = None
    if cfg.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"{desc}: gradient norm became {grad_norm} at step {step + 1}")
    opt.step()
    return loss, grad_norm
