"""Sampling bytes from a trained byte-level language model: ``lla generate RUN_DIR``.

Library:

- ``sample_next(logits, temperature=, top_k=, top_p=, generator=)``: one token id from one row of
  logits ``[V]``: temperature (0 = greedy argmax, no random draw), then top-k, then top-p (nucleus),
  with Hugging Face's and flash-attn's semantics (below).
- ``generate(model, prompt, max_new_tokens, ...)``: an iterator of the new token ids (ints), one per
  step.  With a cache (``model.supports_cache``: the lla, parallax, softmax and sliding_window
  mixers) the prompt is prefilled in one forward call through an ``lla.nn.KVCache`` and each step
  feeds the one new token; without (gated_deltanet, mesa, linear) every step recomputes the whole
  prefix (``O(T)`` work per token for them, ``O(T^2)`` for a quadratic mixer).  Both paths give the
  same greedy bytes (``tests/experiments/test_generate.py``).
- ``find_checkpoint(run_dir, ...)``, ``load_model(path)``: a run's final weights -> ``CausalModel``.

Sampling semantics (``transformers``' ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, in that order, as ``generate`` applies them; ``tests/experiments/test_generate.py`` checks
the kept set and the probabilities against them; flash-attn's ``utils.generation.sample`` filters the
same way: top-k, the temperature, then top-p on the tempered logits):
``logits / temperature``; ``top_k > 0`` keeps the ``top_k`` largest logits (0: all); ``top_p < 1``
keeps the smallest set of most probable tokens whose probability (after temperature and top-k)
sums to at least ``top_p``, i.e. a token is kept when the mass of the tokens strictly more probable
than it is below ``top_p`` (the most probable token is always kept); then one draw from the
renormalised distribution with ``torch.multinomial`` and the given ``torch.Generator``.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sys
import time
from collections.abc import Iterator

import torch

__all__ = ["check_sampling", "sampling_probs", "sample_next", "stream_text", "generate", "find_checkpoint", "load_model", "main"]

#: vocabulary of the byte-level language models
BYTE_VOCAB = 256


# ------------------------------------------------------------------------------------- sampling
def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """``ValueError`` naming the argument when a sampling option is out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p!r}")


def sampling_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution ``sample_next`` draws from: ``probs [V]`` (float32 at least), zero outside the
    top-k / nucleus set (see the module docstring); ``temperature > 0``."""
    if logits.dim() != 1:
        raise ValueError(f"logits must be [V], got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"sampling_probs needs temperature > 0 (0 is greedy: an argmax), got {temperature!r}")
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(cdt) / temperature  # [V]
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th are kept, as HF does
    probs = torch.softmax(logits, dim=-1)  # [V]
    if top_p < 1:
        p_sorted, order = torch.sort(probs, descending=True)  # [V]
        mass_before = torch.cumsum(p_sorted, dim=-1) - p_sorted  # mass of the tokens ranked above each
        drop_sorted = mass_before >= top_p
        drop_sorted[0] = False  # the most probable token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum()
    return probs


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """One token id from ``logits [V]`` (see the module docstring for the semantics).

    ``temperature == 0`` is greedy: the argmax, no random number is drawn (so the generator's
    state, and the seed, do not matter).  Otherwise one ``torch.multinomial`` draw from
    ``sampling_probs(logits, ...)`` with ``generator``.
    """
    if logits.dim() != 1:
        raise ValueError(f"logits must be [V], got {tuple(logits.shape)}")
    if temperature == 0:
        return int(torch.argmax(logits))
    if generator is not None and generator.device != logits.device:
        logits = logits.to(generator.device)  # e.g. CUDA logits, a CPU generator: draw where the generator lives
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def stream_text(tokens, out, decoder=None) -> int:
    """Write byte ids to the text stream ``out`` as they come, decoded as UTF-8 with replacement
    (incrementally: a character whose bytes arrive over several steps is written once whole; an
    invalid byte becomes U+FFFD), flushing after each write; at the end the decoder is flushed (an
    unfinished character -> U+FFFD).  ``decoder``: an incremental UTF-8 decoder to continue (one
    that has already seen the prompt).  Returns the number of bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if decoder is None else decoder
    n = 0
    for token in tokens:
        n += 1
        text = decoder.decode(bytes([token]))
        if text:
            out.write(text)
            out.flush()
    tail = decoder.decode(b"", final=True)
    if tail:
        out.write(tail)
        out.flush()
    return n


# ------------------------------------------------------------------------------------- generation
def _as_ids(prompt, device) -> torch.Tensor:
    """bytes / str (UTF-8) / a sequence of ints / a 1-D int tensor -> ``[1, T]`` int64 on ``device``."""
    if isinstance(prompt, str):
        prompt = prompt.encode("utf-8")
    if isinstance(prompt, (bytes, bytearray)):
        ids = torch.tensor(list(prompt), dtype=torch.int64)
    elif isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            raise TypeError(f"prompt as a tensor must be 1-D integer token ids, got {prompt.dtype} {tuple(prompt.shape)}")
        ids = prompt.to(torch.int64)
    else:
        try:
            ids = torch.tensor(list(prompt), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"prompt must be bytes, str, a sequence of ints or a 1-D int tensor, got {type(prompt).__name__}") from None
        if ids.dim() != 1:
            raise TypeError("prompt must be a flat sequence of token ids")
    if ids.numel() == 0:
        raise ValueError("prompt must hold at least one token (the model conditions on it)")
    return ids.to(device)[None]  # [1, T]


def _vocab(model) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "vocab_size", 0) or 0)


def generate(model: torch.nn.Module, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool | None = None) -> Iterator[int]:
    """Yield ``max_new_tokens`` new token ids sampled from ``model`` after ``prompt``, one per step.

    ``model``: a ``CausalModel`` (``forward(x [B, T], cache=None) -> logits [B, T, V]``).
    ``prompt``: bytes, str (UTF-8 encoded), a sequence of ints or a 1-D int tensor; at least one token.
    ``use_cache``: None = ``model.supports_cache``; True: prefill the prompt in one call through an
    ``lla.nn.KVCache``, then one token per call (``ValueError`` when the model's mixer has no cache
    path); False: recompute the whole prefix every step.
    Sampling: see ``sample_next``; ``generator`` (a ``torch.Generator`` on the CPU) makes draws
    reproducible.  Runs under ``torch.inference_mode()``; the model's train/eval mode is left as
    it is (the loader returns it in eval mode).  The arguments are checked when called, before
    the first step.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    supports = bool(getattr(model, "supports_cache", False))
    if use_cache is None:
        use_cache = supports
    elif use_cache and not supports:
        mixer = getattr(getattr(model, "cfg", None), "mixer", "?")
        raise ValueError(f"use_cache=True, but the model's mixer ({mixer!r}) does not decode through a cache; "
                         "use use_cache=False (recompute the prefix) or None")
    device = next(model.parameters()).device
    ids = _as_ids(prompt, device)  # [1, T]
    vocab = _vocab(model)
    if int(ids.min()) < 0 or (vocab and int(ids.max()) >= vocab):
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got min {int(ids.min())}, max {int(ids.max())}")
    return _steps(model, ids, max_new_tokens, temperature, top_k, top_p, generator, use_cache)


def _steps(model, ids, max_new_tokens, temperature, top_k, top_p, generator, use_cache):
    """The generator body of ``generate`` (its checks run eagerly, before this starts)."""
    if max_new_tokens == 0:
        return
    from lla.nn import KVCache

    with torch.inference_mode():
        if use_cache:
            cache = KVCache(max_len=ids.shape[1] + max_new_tokens)
            logits = model(ids, cache=cache)[0, -1]  # [V]: prefill, one call
            for i in range(max_new_tokens):
                token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                yield token
                if i + 1 < max_new_tokens:
                    step = torch.tensor([[token]], dtype=torch.int64, device=ids.device)  # [1, 1]
                    logits = model(step, cache=cache)[0, -1]
        else:
            prefix = ids  # [1, T + i]
            for i in range(max_new_tokens):
                logits = model(prefix)[0, -1]  # [V]: the whole prefix again
                token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                yield token
                if i + 1 < max_new_tokens:
                    prefix = torch.cat([prefix, prefix.new_tensor([[token]])], dim=1)


# ------------------------------------------------------------------------------------- run folders
def _lr_name(lr) -> str:
    return f"{float(lr):g}"


def find_checkpoint(run_dir: str, *, mixer: str | None = None, run_seed: int | None = None) -> str:
    """The final checkpoint of a finished run: ``RUN_DIR/seed{S}/ckpt/{experiment}_{mixer}_lr{lr:g}.pt``
    for ``mixer`` (default: the first of ``run.json``'s ``mixers``), ``run_seed`` (default: its first
    seed) and the mixer's chosen learning rate.  ``FileNotFoundError`` / ``ValueError`` with what
    was looked for."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        found = sorted(glob.glob(os.path.join(run_dir, "seed*", "ckpt", "*.pt")))
        hint = ("; checkpoints there: " + ", ".join(found[:8]) + (" ..." if len(found) > 8 else "") +
                " (pass one with --checkpoint)") if found else "; no checkpoint found under seed*/ckpt/ either"
        raise FileNotFoundError(f"{run_dir!r} has no run.json (not a run folder, or the run has not finished){hint}")
    with open(path) as f:
        run = json.load(f)
    experiment = run.get("experiment", "lm")
    if experiment != "lm":
        raise ValueError(f"lla generate needs a language-model run (lla run lm), but {run_dir!r} is a {experiment!r} run")
    mixers, seeds = list(run.get("mixers") or []), list(run.get("seeds") or [])
    if not mixers or not seeds:
        raise ValueError(f"{path} lists no mixers or no seeds")
    mixer = mixers[0] if mixer is None else mixer
    if mixer not in mixers:
        raise ValueError(f"mixer {mixer!r} is not in this run; its mixers: {', '.join(mixers)}")
    run_seed = seeds[0] if run_seed is None else run_seed
    if run_seed not in seeds:
        raise ValueError(f"run seed {run_seed!r} is not in this run; its seeds: {', '.join(map(str, seeds))}")
    chosen = (run.get("chosen") or {}).get(mixer, {})
    lr = chosen.get("all:chosen_lr")
    if lr is None:
        lrs = run.get("lrs") or []
        if len(lrs) != 1:
            raise ValueError(f"{path} records no chosen learning rate for mixer {mixer!r}")
        lr = lrs[0]
    ckpt = os.path.join(run_dir, f"seed{run_seed}", "ckpt", f"{experiment}_{mixer}_lr{_lr_name(lr)}.pt")
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"no checkpoint at {ckpt} (mixer {mixer}, seed {run_seed}, chosen lr {lr:g})")
    return ckpt


def load_model(path: str, device="cpu"):
    """``(model, info)`` from a checkpoint written by the runner: the ``CausalModel`` built from its
    ``meta["model"]`` with its ``"model"`` weights, in eval mode; ``info`` has ``mixer``, ``step``,
    ``steps`` (the run's planned steps, when recorded), ``context`` (trained length, when recorded)."""
    from .model import CausalModel, ModelConfig

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    # weights_only=False: the runner's checkpoints also hold plain-Python training state (as train.py loads them)
    state = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "model" not in (state.get("meta") or {}):
        raise ValueError(f"{path} is not a runner checkpoint (needs 'model' weights and meta['model'])")
    mcfg = dict(state["meta"]["model"])
    cfg = ModelConfig(**mcfg)
    if cfg.vocab_size != BYTE_VOCAB or cfg.output_dim != BYTE_VOCAB:
        raise ValueError(f"{path}: lla generate needs a byte-level language model (vocab_size = output_dim = 256), "
                         f"got vocab_size {cfg.vocab_size}, output_dim {cfg.output_dim}")
    model = CausalModel(cfg)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    meta = state["meta"]
    task = meta.get("task") or {}
    train = meta.get("train") or {}
    info = {"mixer": cfg.mixer, "step": state.get("step"), "steps": train.get("steps"),
            "context": task.get("context") if isinstance(task, dict) else None}
    return model, info


# ------------------------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """``lla generate``'s arguments on an ``argparse`` (sub)parser."""
    p.add_argument("run_dir", nargs="?", default=None,
                   help="a finished `lla run lm` folder (its run.json picks the checkpoint); optional with --checkpoint")
    p.add_argument("--checkpoint", default=None, help="a checkpoint file to load instead (relative paths: cwd, then RUN_DIR)")
    p.add_argument("--mixer", default=None, help="which of the run's mixers (default: its first)")
    p.add_argument("--run-seed", type=int, default=None, help="which training seed's model (default: the run's first seed)")
    p.add_argument("--prompt", default=None, help="prompt text (UTF-8)")
    p.add_argument("--prompt-file", default=None, help="read the prompt's bytes from this file instead")
    p.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (deterministic whatever --seed); default 1")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most probable bytes (0 = all; default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the most probable bytes up to this mass (1 = all; default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every step even where a KV cache exists")
    p.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def main(args, out=None, err=None) -> int:
    """``lla generate``: load, then stream the sampled bytes to ``out`` (stdout) as UTF-8 text
    (incremental decoding with replacement: a character split across steps prints whole); a
    summary line (bytes, seconds, bytes/s) to ``err`` (stderr).  Errors -> ``SystemExit`` with a message."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        if (args.prompt is None) == (args.prompt_file is None):
            raise ValueError("give the prompt with exactly one of --prompt TEXT or --prompt-file F")
        if args.prompt_file is not None:
            if not os.path.isfile(args.prompt_file):
                raise FileNotFoundError(f"prompt file {args.prompt_file!r} does not exist")
            with open(args.prompt_file, "rb") as f:
                prompt = f.read()
        else:
            prompt = args.prompt.encode("utf-8")
        if not prompt:
            raise ValueError("the prompt is empty: give at least one byte")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.checkpoint is not None:
            ckpt = args.checkpoint
            if not os.path.exists(ckpt) and args.run_dir is not None and os.path.exists(os.path.join(args.run_dir, ckpt)):
                ckpt = os.path.join(args.run_dir, ckpt)
        elif args.run_dir is None:
            raise ValueError("give a run folder (RUN_DIR) or --checkpoint PATH")
        else:
            ckpt = find_checkpoint(args.run_dir, mixer=args.mixer, run_seed=args.run_seed)
        model, info = load_model(ckpt, device=args.device)
        if args.checkpoint is not None and args.mixer is not None and args.mixer != info["mixer"]:
            raise ValueError(f"--mixer {args.mixer} does not match the checkpoint's mixer {info['mixer']}")
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"lla generate: {e}") from None

    if info["step"] is not None and info["steps"] is not None and info["step"] < info["steps"]:
        print(f"lla generate: note: {ckpt} is from step {info['step']} of {info['steps']} (an unfinished run)", file=err)
    context = info["context"]
    if isinstance(context, int) and len(prompt) + args.max_new_tokens > context:
        print(f"lla generate: note: prompt + new bytes ({len(prompt) + args.max_new_tokens}) exceed the trained "
              f"context ({context}); quality past it is untested", file=err)
    use_cache = False if args.no_cache else None
    gen = torch.Generator().manual_seed(args.seed)
    if out is sys.stdout and hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a traceback
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if not args.no_echo:
        out.write(decoder.decode(prompt))
        out.flush()
    t0, t_first = time.perf_counter(), None

    def timed(tokens):
        nonlocal t_first
        for token in tokens:
            if t_first is None:
                t_first = time.perf_counter()
            yield token

    tokens = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, generator=gen, use_cache=use_cache)
    n = stream_text(timed(tokens), out, decoder)
    out.write("\n")
    out.flush()
    t1 = time.perf_counter()
    cached = bool(getattr(model, "supports_cache", False)) and not args.no_cache
    rate = f"; then {(n - 1) / (t1 - t_first):.1f} bytes/s" if n > 1 and t1 > t_first else ""
    first = f"first byte after {t_first - t0:.2f} s" if t_first is not None else "no bytes"
    print(f"lla generate: {info['mixer']} ({'KV cache' if cached else 'prefix recomputed each step'}), "
          f"{len(prompt)}-byte prompt, {n} new bytes: {first}{rate}  [{ckpt}]", file=err)
    return 0
