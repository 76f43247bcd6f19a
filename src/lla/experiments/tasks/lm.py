"""Task 5: byte-level language modelling on real text (vocabulary 256, no tokenizer).

Corpus: a text file or a folder of text files (``cfg["corpus"]``; recursively, files in sorted
order of their relative paths, one separator byte ``SEP`` (0, NUL: never in a text file) between
files).  Without one, the running interpreter's standard library source: every ``.py`` file under
``sysconfig.get_paths()["stdlib"]`` outside test folders (any path part starting with ``test`` or
ending with ``_test`` / ``_tests``) and outside ``site-packages`` / ``dist-packages``.

Split (deterministic): a folder of at least ``FILE_SPLIT_MIN`` files is split by file: with the
files in sorted order, file ``i`` goes to test when ``i % 20 == 0``, to validation when
``i % 20 == 1``, else to train.  A single file (or a folder of fewer files) is split by bytes of the
concatenation: the first 90% train, the next 5% validation, the last 5% test.

Training batches are windows of ``context + 1`` bytes at uniformly random offsets into the train
split, drawn from the trainer's per-step generator (so the loader's whole state is the step).
Evaluation uses a FIXED set of ``eval_windows`` / ``test_windows`` windows at evenly spaced offsets
of the validation / test split: the same bytes for every mixer and seed.  Metric: bits per byte
(mean cross-entropy in nats / ln 2); the curve is the loss (bits) at each position of the context.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig

import torch
import torch.nn.functional as F

VOCAB = 256
#: the byte between two files of a folder corpus
SEP = 0
#: folders with at least this many files are split by file, smaller ones by bytes
FILE_SPLIT_MIN = 20
SPLITS = ("train", "val", "test")


def default_corpus() -> str:
    """The running interpreter's standard library folder (its ``.py`` files are the default corpus)."""
    return sysconfig.get_paths()["stdlib"]


def _excluded(parts: tuple[str, ...]) -> bool:
    for p in parts:
        low = p.lower()
        if low.startswith("test") or low.endswith(("_test", "_tests")) or low in ("site-packages", "dist-packages", "__pycache__"):
            return True
    return False


def corpus_files(path: str, default: bool = False) -> list[tuple[str, str]]:
    """``[(relative path, absolute path)]`` of a corpus, sorted by relative path.

    ``default``: the stdlib rule (``.py`` files only, test folders and site-packages excluded);
    otherwise every regular file under ``path`` (hidden files and folders skipped).
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"corpus must be a path to a text file or a folder, got {path!r}")
    if not os.path.exists(path):
        raise ValueError(f"corpus {path!r} does not exist")
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    if not os.path.isdir(path):
        raise ValueError(f"corpus {path!r} is neither a file nor a folder")
    out = []
    for root, dirs, files in os.walk(path):
        rel_root = os.path.relpath(root, path)
        parts = () if rel_root == "." else tuple(rel_root.split(os.sep))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (default and _excluded(parts + (d,))))
        for f in files:
            if f.startswith("."):
                continue
            if default and (not f.endswith(".py") or _excluded(parts + (f,))):
                continue
            full = os.path.join(root, f)
            if os.path.isfile(full):
                out.append((os.path.join(*parts, f) if parts else f, full))
    out.sort(key=lambda t: t[0])
    return out


def _read_text(full: str) -> bytes:
    with open(full, "rb") as fh:
        data = fh.read()
    if b"\x00" in data:
        raise ValueError(f"corpus file {full!r} is binary (contains NUL bytes); the corpus must be text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {full!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return data


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


_CACHE: dict = {}


def load_corpus(path: str | None, min_len: int) -> dict:
    """Read and split a corpus: ``{"train", "val", "test"}`` uint8 tensors and ``"record"`` (what it is).

    ``min_len``: every split must hold at least this many bytes (one window: context + 1), else
    ValueError.  The record names the corpus path, how it was split, the number of files and bytes
    and the SHA-256 of each split and of the whole (the concatenation of the files with ``SEP``
    between them), and the interpreter version.
    """
    default = path is None
    root = default_corpus() if default else path
    key = (os.path.abspath(root) if isinstance(root, str) else root, default)
    if key not in _CACHE:
        files = corpus_files(root, default=default)
        if not files:
            raise ValueError(f"corpus {root!r} holds no {'.py ' if default else ''}files")
        texts = [_read_text(full) for _, full in files]
        sep = bytes([SEP])
        whole = sep.join(texts)
        if not any(texts):
            raise ValueError(f"corpus {root!r} is empty (0 bytes)")
        if len(files) >= FILE_SPLIT_MIN:
            how = f"by file: sorted relative paths, i % 20 == 0 test, i % 20 == 1 val, else train ({len(files)} files)"
            parts = {s: [] for s in SPLITS}
            for i, t in enumerate(texts):
                parts["test" if i % 20 == 0 else "val" if i % 20 == 1 else "train"].append(t)
            data = {s: sep.join(parts[s]) for s in SPLITS}
            n_files = {s: len(parts[s]) for s in SPLITS}
        else:
            how = f"by bytes of the concatenation: first 90% train, next 5% val, last 5% test ({len(files)} file(s))"
            n = len(whole)
            a, b = int(n * 0.9), int(n * 0.95)
            data = {"train": whole[:a], "val": whole[a:b], "test": whole[b:]}
            n_files = None
        record = {"corpus": os.path.abspath(root), "default_stdlib": default, "split": how, "files": len(files),
                  "bytes": len(whole), "sha256": _sha(whole),
                  "splits": {s: {"bytes": len(data[s]), "sha256": _sha(data[s]), **({"files": n_files[s]} if n_files else {})}
                             for s in SPLITS},
                  "python": sys.version.split()[0], "separator_byte": SEP}
        tensors = {s: torch.frombuffer(bytearray(data[s]), dtype=torch.uint8) if data[s] else torch.zeros(0, dtype=torch.uint8)
                   for s in SPLITS}
        _CACHE[key] = {**tensors, "record": record}
    out = _CACHE[key]
    if out["record"]["bytes"] < min_len:
        raise ValueError(f"corpus {root!r} holds {out['record']['bytes']} bytes, fewer than one window of context + 1 = {min_len}")
    for s in SPLITS:
        if len(out[s]) < min_len:
            raise ValueError(f"corpus {root!r}: its {s} split holds {len(out[s])} bytes, fewer than one window of "
                             f"context + 1 = {min_len} ({out['record']['split']}); use a larger corpus or a shorter context")
    return out


class LMTask:
    """Next-byte prediction on windows of ``cfg["context"]`` bytes of a text corpus."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.context = cfg["context"]
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
            raise ValueError(f"context must be a positive int, got {self.context!r}")
        for k in ("eval_windows", "test_windows", "eval_batch"):
            v = cfg.get(k, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
        self.data = load_corpus(cfg.get("corpus"), self.context + 1)
        self.record = self.data["record"]

    def model_kwargs(self) -> dict:
        return {"vocab_size": VOCAB, "output_dim": VOCAB, "max_len": 0}

    def meta(self) -> dict:
        """What a checkpoint must agree on besides the configs: the data's identity."""
        return {"data_sha256": self.record["sha256"]}

    def windows(self, split: str, starts: torch.Tensor):
        """``x [N, T]``, ``y [N, T]`` int64: the bytes at ``starts + (0 .. T-1)`` and the next ones."""
        buf = self.data[split]
        idx = starts[:, None] + torch.arange(self.context + 1)  # [N, T + 1]
        w = buf[idx].long()
        return w[:, :-1], w[:, 1:]

    def sample(self, batch, generator):
        """``batch`` windows at uniformly random offsets of the train split (``generator``: the step's)."""
        n = len(self.data["train"]) - (self.context + 1)
        starts = torch.randint(0, n + 1, (batch,), generator=generator)
        return self.windows("train", starts)

    @staticmethod
    def loss(logits, targets):
        """Mean cross-entropy in nats (float32 whatever the autocast dtype)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def eval_starts(self, split: str) -> torch.Tensor:
        """The fixed window offsets of ``split``: evenly spaced over it (deterministic; no seed)."""
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        n_win = self.cfg["eval_windows"] if split == "val" else self.cfg["test_windows"]
        last = len(self.data[split]) - (self.context + 1)
        return torch.linspace(0, last, n_win, dtype=torch.float64).round().long()

    @torch.no_grad()
    def position_loss(self, model, device, split: str = "test") -> torch.Tensor:
        """Cross-entropy (nats, float64) at every position of every fixed window: ``[N, T]``."""
        x, y = self.windows(split, self.eval_starts(split))
        out = []
        bs = self.cfg.get("eval_batch", 32)
        for i in range(0, len(x), bs):
            logits = model(x[i : i + bs].to(device))
            out.append(F.cross_entropy(logits.float().transpose(1, 2), y[i : i + bs].to(device), reduction="none").double().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, model, device, seed: int, split: str = "test"):
        """Rows: ``bpb`` (val) or ``test_bpb`` and ``test_bpb_pos<a>-<b>`` (the four quarters of the
        context) on the fixed windows of the split; curves: bits at each position (test).  ``seed`` is
        unused: the windows are the same for every seed and mixer."""
        nats = self.position_loss(model, device, split)  # [N, T]
        bits = nats / math.log(2)
        by_pos = bits.mean(0)  # [T]
        if split == "val":
            return [{"metric": "bpb", "value": bits.mean().item()}], []
        T = self.context
        rows = [{"metric": "test_bpb", "value": bits.mean().item()}]
        for q in range(4):
            a, b = q * T // 4, (q + 1) * T // 4
            if b > a:
                rows.append({"metric": f"test_bpb_pos{a}-{b - 1}", "value": by_pos[a:b].mean().item()})
        return rows, [{"x": list(range(T)), "y": by_pos.tolist()}]
