"""``lla generate`` and ``lla.experiments.generate``: KV-cache decoding equals prefix recomputation,
sampling semantics (temperature, top-k, top-p as Hugging Face's warpers), seeds, UTF-8 streaming,
and the command line on a run folder laid out as the runner writes it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from lla.cli import main as cli_main
from lla.experiments.generate import (
    find_checkpoint,
    generate,
    load_model,
    sample_next,
    sampling_probs,
    stream_text,
)
from lla.experiments.model import CausalModel, ModelConfig
from lla.experiments.mixers import CACHE_MIXERS, MIXERS

from conftest import SRC

PROMPT = b"def add(a, b):\n    return a"  # 27 bytes: longer than the sliding window below


def _cfg(mixer: str) -> ModelConfig:
    return ModelConfig(mixer=mixer, d_model=32, num_heads=2, n_layers=2, vocab_size=256, output_dim=256, rope=True,
                       tie_embeddings=True, mixer_kwargs={"window": 8} if mixer == "sliding_window" else {})


def _model(mixer: str, seed: int = 0) -> CausalModel:
    torch.manual_seed(seed)
    return CausalModel(_cfg(mixer)).eval()


def _record_logits(model):
    """Record the last row's logits ``[V]`` of every forward call."""
    rec = []
    handle = model.register_forward_hook(lambda mod, inp, out: rec.append(out[0, -1].detach().clone()))
    return rec, handle


# ------------------------------------------------------------------------------------- cache == recompute
@pytest.mark.parametrize("mixer", ["lla", "parallax", "softmax", "sliding_window"])
def test_greedy_with_cache_equals_recomputation(mixer):
    """Greedy bytes through the KV cache (prefill in one call, then one token per call) equal greedy
    bytes from recomputing the whole prefix every step, and so do the logits of every step.  The
    byte equality cannot pass by a near tie: every step's top-2 logit gap is checked to be >= 100x
    the largest difference between the two paths' logits (float32)."""
    assert mixer in CACHE_MIXERS
    m = _model(mixer)
    n_new = 32
    rec, handle = _record_logits(m)
    cached = list(generate(m, PROMPT, n_new, temperature=0, use_cache=True))
    calls_cached, logits_cached = len(rec), torch.stack(rec)
    rec.clear()
    recomputed = list(generate(m, PROMPT, n_new, temperature=0, use_cache=False))
    logits_full = torch.stack(rec)
    handle.remove()
    assert calls_cached == n_new and len(logits_cached) == n_new  # one prefill call + (n_new - 1) one-token calls
    assert cached == recomputed
    assert len(cached) == n_new and all(0 <= t < 256 for t in cached)
    diff = (logits_cached - logits_full).abs().max()
    torch.testing.assert_close(logits_cached, logits_full, rtol=1e-5, atol=1e-5)
    top2 = logits_full.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).min()
    assert gap > 100 * diff, (float(gap), float(diff))
    # each step's byte is the argmax of a full forward over prompt + the bytes before it (the definition)
    with torch.inference_mode():
        full = m(torch.tensor([list(PROMPT) + cached]))[0, len(PROMPT) - 1 : -1]  # [n_new, V]
    assert full.argmax(-1).tolist() == cached


def test_greedy_with_cache_equals_recomputation_float64():
    """In float64 (the paths then agree to ~1e-15): 40 new bytes after a 24-byte prompt, for lla and
    parallax, logits compared at every step."""
    for mixer in ("lla", "parallax"):
        m = _model(mixer).double()
        prompt = bytes(range(60, 84))
        rec, handle = _record_logits(m)
        cached = list(generate(m, prompt, 40, temperature=0))
        logits_cached = torch.stack(rec)
        rec.clear()
        recomputed = list(generate(m, prompt, 40, temperature=0, use_cache=False))
        handle.remove()
        assert cached == recomputed, mixer
        torch.testing.assert_close(logits_cached, torch.stack(rec), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixer", sorted(set(MIXERS) - set(CACHE_MIXERS)))
def test_recurrent_mixers_recompute_the_prefix(mixer):
    """gated_deltanet, mesa, linear: ``use_cache=None`` recomputes (one full forward per new byte, each
    one longer); ``use_cache=True`` is refused with a ValueError naming the mixer."""
    m = _model(mixer)
    assert not m.supports_cache
    lengths = []
    handle = m.register_forward_hook(lambda mod, inp, out: lengths.append(inp[0].shape[1]))
    out = list(generate(m, b"abc", 4, temperature=0))
    handle.remove()
    assert lengths == [3, 4, 5, 6]
    with torch.inference_mode():
        assert out[-1] == int(m(torch.tensor([list(b"abc") + out[:-1]]))[0, -1].argmax())
    with pytest.raises(ValueError, match=f"use_cache=True.*{mixer}"):
        generate(m, b"abc", 4, temperature=0, use_cache=True)


# ------------------------------------------------------------------------------------- sampling
def test_temperature_zero_ignores_the_seed_and_draws_nothing():
    m = _model("softmax")
    g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    state = g0.get_state().clone()
    a = list(generate(m, PROMPT, 20, temperature=0, generator=g0, top_k=5, top_p=0.5))
    b = list(generate(m, PROMPT, 20, temperature=0, generator=g1))
    assert a == b
    assert torch.equal(g0.get_state(), state)  # no random number was drawn


def test_seed_reproduces_and_differs_at_temperature_one():
    m = _model("softmax")
    run = lambda seed: list(generate(m, PROMPT, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed)))  # noqa: E731
    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0) != list(generate(m, PROMPT, 30, temperature=0))  # it does sample


def test_top_k_one_and_tiny_top_p_are_greedy():
    m = _model("parallax")
    greedy = list(generate(m, PROMPT, 16, temperature=0))
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        assert list(generate(m, PROMPT, 16, temperature=1.0, top_k=1, generator=g)) == greedy
        assert list(generate(m, PROMPT, 16, temperature=1.0, top_p=1e-6, generator=g)) == greedy
        assert list(generate(m, PROMPT, 16, temperature=5.0, top_p=1e-6, generator=g)) == greedy


def test_sampling_probs_match_transformers_warpers():
    """temperature -> top-k -> top-p as ``transformers``' logits processors (HF ``generate``'s order)."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        logits = torch.randn(256, generator=g, dtype=torch.float64) * (0.5 + 3 * trial / 30)
        temperature = [0.3, 0.7, 1.0, 1.5][trial % 4]
        top_k = [0, 1, 5, 40, 256][trial % 5]
        top_p = [1.0, 0.9, 0.5, 0.1, 1e-3, 0.99][trial % 6]
        scores = logits[None] / temperature
        if top_k:
            scores = lp.TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = lp.TopPLogitsWarper(top_p)(None, scores)
        want = torch.softmax(scores[0], dim=-1)
        got = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        assert torch.equal(got > 0, want > 0), (trial, temperature, top_k, top_p)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_sample_next_draws_from_the_filtered_distribution():
    logits = torch.tensor([1.0, 2.0, 3.0, 0.0, -1.0])
    p = torch.softmax(logits, -1)  # [0.086, 0.234, 0.636, 0.032, 0.012]
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: torch.bincount(torch.tensor([sample_next(logits, generator=g, **kw) for _ in range(4000)]), minlength=5) / 4000  # noqa: E731
    torch.testing.assert_close(draw(), p, atol=0.03, rtol=0)
    torch.testing.assert_close(draw(temperature=0.5), torch.softmax(2 * logits, -1), atol=0.03, rtol=0)
    top2 = draw(top_k=2)
    assert top2[[0, 3, 4]].sum() == 0
    torch.testing.assert_close(top2[[1, 2]], p[[1, 2]] / p[[1, 2]].sum(), atol=0.03, rtol=0)
    # nucleus 0.8: 2 (0.636) is below 0.8, so 1 (mass above it 0.636 < 0.8) is kept; 0 (0.870 above) is not
    assert set(torch.nonzero(draw(top_p=0.8)).flatten().tolist()) == {1, 2}
    assert set(torch.nonzero(draw(top_p=0.5)).flatten().tolist()) == {2}
    assert sample_next(logits, temperature=0) == 2


@pytest.mark.parametrize("kw, match", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": -0.2}, "top_p"),
])
def test_bad_sampling_arguments(kw, match):
    m = _model("softmax")
    with pytest.raises(ValueError, match=match):
        generate(m, b"a", 3, **kw)


def test_bad_generate_arguments():
    m = _model("softmax")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, b"a", -1)
    with pytest.raises(ValueError, match="at least one"):
        generate(m, b"", 3)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        generate(m, [3, 300], 3)
    with pytest.raises(TypeError, match="prompt"):
        generate(m, 3.5, 3)
    assert list(generate(m, "é", 0)) == []
    assert len(list(generate(m, "é", 2, temperature=0))) == 2  # str prompts are UTF-8 encoded


# ------------------------------------------------------------------------------------- streaming
class _Writes(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_stream_text_decodes_characters_split_across_steps():
    out = _Writes()
    data = "a€b✓é".encode()  # 1 + 3 + 1 + 3 + 2 bytes
    assert stream_text(iter(data), out) == len(data)
    assert out.writes == ["a", "€", "b", "✓", "é"]  # each character written once, whole, when its last byte came
    out = _Writes()
    stream_text([0x61, 0xFF, 0x62, 0xE2, 0x82], out)  # an invalid byte, then an unfinished character
    assert out.getvalue() == "a\ufffdb\ufffd"


# ------------------------------------------------------------------------------------- command line
def _save(path, model, lr_tag_steps=10):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "opt": {}, "step": lr_tag_steps, "loss": 1.0,
                "meta": {"model": model.cfg.to_dict(), "task": {"context": 64}, "train": {"steps": lr_tag_steps}}}, path)


@pytest.fixture
def run_dir(tmp_path):
    """A finished two-mixer run in the runner's layout: softmax (chosen lr 0.003), lla (chosen lr 0.001,
    with a decoy at lr 0.003 holding other weights), one seed; the models are random (seeds 10, 11, 12)."""
    d = tmp_path / "run"
    models = {("softmax", 0.003): _model("softmax", 10), ("lla", 0.001): _model("lla", 11), ("lla", 0.003): _model("lla", 12)}
    for (mixer, lr), m in models.items():
        _save(str(d / "seed0" / "ckpt" / f"lm_{mixer}_lr{lr:g}.pt"), m)
    with open(d / "run.json", "w") as f:
        json.dump({"experiment": "lm", "preset": "smoke", "mixers": ["softmax", "lla"], "seeds": [0], "lrs": [0.001, 0.003],
                   "chosen": {"softmax": {"all:chosen_lr": 0.003}, "lla": {"all:chosen_lr": 0.001}}}, f)
    return str(d), models


def _cli(args, capsys):
    assert cli_main(["generate", *args]) == 0
    cap = capsys.readouterr()
    return cap.out, cap.err


def test_cli_greedy_matches_the_library_on_the_chosen_checkpoint(run_dir, capsys):
    d, models = run_dir
    expect = lambda m, n: bytes(generate(m, b"def f", n, temperature=0)).decode("utf-8", "replace")  # noqa: E731
    out, err = _cli([d, "--prompt", "def f", "--max-new-tokens", "12", "--temperature", "0"], capsys)
    assert out == "def f" + expect(models[("softmax", 0.003)], 12) + "\n"
    assert "softmax (KV cache)" in err and "12 new bytes" in err
    out, _ = _cli([d, "--mixer", "lla", "--prompt", "def f", "--max-new-tokens", "12", "--temperature", "0", "--no-echo"], capsys)
    assert out == expect(models[("lla", 0.001)], 12) + "\n"
    assert out != expect(models[("lla", 0.003)], 12) + "\n"  # the decoy would have given other bytes
    ck = os.path.join(d, "seed0", "ckpt", "lm_lla_lr0.003.pt")
    out, _ = _cli(["--checkpoint", ck, "--prompt", "def f", "--max-new-tokens", "12", "--temperature", "0", "--no-echo"], capsys)
    assert out == expect(models[("lla", 0.003)], 12) + "\n"
    out2, _ = _cli([d, "--mixer", "lla", "--no-cache", "--prompt", "def f", "--max-new-tokens", "12", "--temperature", "0",
                    "--no-echo", "--seed", "5"], capsys)
    assert out2 == expect(models[("lla", 0.001)], 12) + "\n"


def test_cli_sampling_seed(run_dir, capsys):
    d, models = run_dir
    args = [d, "--prompt", "x = ", "--max-new-tokens", "30", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95"]
    a, _ = _cli(args + ["--seed", "3"], capsys)
    b, _ = _cli(args + ["--seed", "3"], capsys)
    c, _ = _cli(args + ["--seed", "4"], capsys)
    assert a == b and a != c
    g = torch.Generator().manual_seed(3)
    want = bytes(generate(models[("softmax", 0.003)], b"x = ", 30, temperature=0.9, top_k=40, top_p=0.95, generator=g))
    assert a == "x = " + want.decode("utf-8", "replace") + "\n"


def test_cli_prompt_file_and_find_checkpoint(run_dir, tmp_path, capsys):
    d, models = run_dir
    assert find_checkpoint(d) == os.path.join(d, "seed0", "ckpt", "lm_softmax_lr0.003.pt")
    model, info = load_model(find_checkpoint(d, mixer="lla"))
    assert info == {"mixer": "lla", "step": 10, "steps": 10, "context": 64}
    assert model.head.weight is model.read_in.weight  # tied after loading
    for name, p in models[("lla", 0.001)].state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    f = tmp_path / "prompt.txt"
    f.write_bytes("π = 3.14\n".encode())
    out, _ = _cli([d, "--prompt-file", str(f), "--max-new-tokens", "5", "--temperature", "0"], capsys)
    want = bytes(generate(models[("softmax", 0.003)], "π = 3.14\n", 5, temperature=0))
    assert out == "π = 3.14\n" + want.decode("utf-8", "replace") + "\n"


@pytest.mark.parametrize("args, match", [
    (["--temperature", "-1"], "temperature"),
    (["--top-k", "-2"], "top_k"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.01"], "top_p"),
    (["--max-new-tokens", "-3"], "max-new-tokens"),
    (["--mixer", "mesa"], "mixer 'mesa' is not in this run; its mixers: softmax, lla"),
    (["--run-seed", "7"], "run seed 7 is not in this run"),
])
def test_cli_errors(run_dir, args, match):
    d, _ = run_dir
    with pytest.raises(SystemExit, match=match):
        cli_main(["generate", d, "--prompt", "a", *args])


def test_cli_errors_on_folders_and_prompts(run_dir, tmp_path):
    d, _ = run_dir
    with pytest.raises(SystemExit, match="does not exist"):
        cli_main(["generate", str(tmp_path / "nope"), "--prompt", "a"])
    with pytest.raises(SystemExit, match="no run.json"):
        cli_main(["generate", str(tmp_path), "--prompt", "a"])
    with pytest.raises(SystemExit, match="exactly one of --prompt"):
        cli_main(["generate", d])
    with pytest.raises(SystemExit, match="empty"):
        cli_main(["generate", d, "--prompt", ""])
    with pytest.raises(SystemExit, match="prompt file"):
        cli_main(["generate", d, "--prompt-file", str(tmp_path / "missing.txt")])
    os.remove(os.path.join(d, "seed0", "ckpt", "lm_softmax_lr0.003.pt"))
    with pytest.raises(SystemExit, match="no checkpoint at .*lm_softmax_lr0.003.pt"):
        cli_main(["generate", d, "--prompt", "a"])
    with open(os.path.join(d, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump({**run, "experiment": "mqar"}, f)
    with pytest.raises(SystemExit, match="language-model run"):
        cli_main(["generate", d, "--prompt", "a"])
    with pytest.raises(SystemExit, match="checkpoint .* does not exist"):
        cli_main(["generate", "--checkpoint", str(tmp_path / "x.pt"), "--prompt", "a"])
    with pytest.raises(SystemExit, match="does not match the checkpoint's mixer"):
        cli_main(["generate", "--checkpoint", os.path.join(d, "seed0", "ckpt", "lm_lla_lr0.001.pt"), "--mixer", "softmax",
                  "--prompt", "a"])


def test_cli_subprocess_streams_utf8(run_dir):
    """The installed entry point (``python -m lla generate``) end to end: UTF-8 text on stdout, the
    summary on stderr."""
    d, models = run_dir
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC,
                                                        os.environ.get("PYTHONPATH", "")]), "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-m", "lla", "generate", d, "--prompt", "€ ", "--max-new-tokens", "8",
                        "--temperature", "0", "--threads", "1"], capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    want = bytes(generate(models[("softmax", 0.003)], "€ ", 8, temperature=0))
    assert r.stdout.decode("utf-8") == "€ " + want.decode("utf-8", "replace") + "\n"
    assert b"8 new bytes" in r.stderr


def test_generate_from_a_real_lla_run_lm(tmp_path, capsys):
    """End to end: ``lla run lm --preset smoke`` (one mixer, 3 steps, this file as the corpus) writes a
    run folder; ``lla generate`` on it loads the final checkpoint and prints the library's greedy bytes."""
    out = str(tmp_path / "lm")
    assert cli_main(["run", "lm", "--preset", "smoke", "--mixers", "softmax", "--steps", "3", "--corpus", __file__,
                     "--out", out, "--no-progress"]) == 0
    capsys.readouterr()
    ckpt = find_checkpoint(out)
    assert ckpt == os.path.join(out, "seed0", "ckpt", "lm_softmax_lr0.003.pt")
    model, info = load_model(ckpt)
    assert info["mixer"] == "softmax" and info["step"] == info["steps"] == 3 and info["context"] == 64
    assert model.supports_cache and model.cfg.rope and model.cfg.tie_embeddings
    text, err = _cli([out, "--prompt", "def ", "--max-new-tokens", "20", "--temperature", "0"], capsys)
    assert text == "def " + bytes(generate(model, b"def ", 20, temperature=0)).decode("utf-8", "replace") + "\n"
    assert "20 new bytes" in err and "unfinished" not in err
