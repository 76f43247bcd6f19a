"""The README and docs/*.md cite only things that exist.

Two kinds of citation are checked in ``README.md`` and every ``docs/*.md``:

* dotted API names ``lla.<name>...`` (``lla.nn.LocalLinearAttention``, ``lla.local_linear_attention``):
  the longest importable module prefix is imported, the rest is looked up with ``getattr``;
* repository paths: ``src/...``, ``benchmarks/...``, ``docs/...``, ``results/...``, ``tests/...``,
  ``.ci/...`` (from the repository root) and package-relative source paths (``ops/...``, ``nn/...``,
  ``experiments/...``, ``integrations/...``, ``baselines/...``, ``lla/...``, ending in ``.py``; from
  ``src/lla``). ``{a,b}`` is expanded, ``*`` and ``<placeholder>`` match anything (at least one file
  must match), and a ``::name`` after a ``.py`` path must be defined in that file (a test function, a
  function, a class or a module-level assignment).

CLI commands (``lla run lm``) and names without the ``lla.`` prefix are not checked.
"""

from __future__ import annotations

import glob
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: ``lla.a.b``; not part of a path (``nn/lla.py``), a longer word or a dotted chain
NAME = re.compile(r"(?<![\w./-])lla(?:\.[A-Za-z_]\w*)+")
#: file-name suffixes that make ``lla.<x>`` a file name, not an API name
FILE_SUFFIXES = {"py", "md", "json", "png", "txt", "toml"}
_SEGMENT = r"(?:[\w.*\-/]|<[\w\- ]+>|\{[\w.,\-]+\})*"
#: a path from the repository root, with an optional ``::name``
ROOT_PATH = re.compile(r"(?<![\w./<>\-])((?:src|benchmarks|docs|results|tests|\.ci)/" + _SEGMENT + r")(?:::(\w+))?")
#: a source path relative to ``src/lla`` (``ops/lla/api.py``, ``lla/ops/lla/decode.py``)
PKG_PATH = re.compile(r"(?<![\w./<>\-])((?:lla/)?(?:ops|nn|experiments|integrations|baselines)/[\w/]*\w\.py)(?:::(\w+))?")


def _expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if m is None:
        return [path]
    out = []
    for alt in m.group(1).split(","):
        out += _expand_braces(path[: m.start()] + alt + path[m.end():])
    return out


def _defines(file: Path, name: str) -> bool:
    text = file.read_text(encoding="utf-8", errors="replace")
    pattern = rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*(?::[^=]*)?="
    return re.search(pattern, text, flags=re.M) is not None


def _check_path(raw: str, base: Path, member: str | None) -> str | None:
    """None when ``raw`` (relative to ``base``) exists, else why not."""
    raw = raw.rstrip(".-")
    matches: list[Path] = []
    for alt in _expand_braces(raw):
        pattern = re.sub(r"<[^<>]*>", "*", alt)
        if "*" in pattern:
            found = [Path(p) for p in glob.glob(str(base / pattern))]
        else:
            found = [base / pattern] if (base / pattern).exists() else []
        if not found:
            cited = raw + (f"::{member}" if member else "")
            return f"path {cited}: {pattern} does not exist"
        matches += found
    if member is not None:
        files = [p for p in matches if p.is_file() and p.suffix == ".py"]
        if files and not any(_defines(p, member) for p in files):
            return f"path {raw}::{member}: {member} is not defined there"
    return None


def _check_name(dotted: str) -> str | None:
    """None when ``dotted`` imports / resolves, else why not."""
    parts = dotted.split(".")
    if parts[-1] in FILE_SUFFIXES:
        return None
    if "__main__" in parts:  # importing it would run the CLI: the file is the name
        where = SRC.joinpath(*parts[: parts.index("__main__")], "__main__.py")
        return None if where.is_file() else f"name {dotted}: {where} does not exist"
    obj, used = None, 0
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj, used = importlib.import_module(module), i
            break
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                return f"name {dotted}: importing {module} failed: {e}"
        except Exception as e:  # noqa: BLE001 - a module that exists but fails to import is a finding
            return f"name {dotted}: importing {module} failed: {type(e).__name__}: {e}"
    for j in range(used, len(parts)):
        if not hasattr(obj, parts[j]):
            return f"name {dotted}: {'.'.join(parts[:j])} has no attribute {parts[j]!r}"
        obj = getattr(obj, parts[j])
    return None


def find_missing(text: str, root: Path = ROOT) -> list[str]:
    """Every cited ``lla.`` name and repository path in ``text`` that does not exist, one line each."""
    problems: list[str] = []
    seen: set[tuple] = set()

    def add(key, problem):
        if key not in seen:
            seen.add(key)
            if problem is not None:
                problems.append(problem)

    for m in NAME.finditer(text):
        add(("name", m.group(0)), _check_name(m.group(0)))
    for m in ROOT_PATH.finditer(text):
        add(("path", m.group(1), m.group(2)), _check_path(m.group(1), root, m.group(2)))
    for m in PKG_PATH.finditer(text):
        rel = m.group(1)[len("lla/"):] if m.group(1).startswith("lla/") else m.group(1)
        add(("pkg", rel, m.group(2)), _check_path(rel, root / "src" / "lla", m.group(2)))
    return problems


@pytest.mark.parametrize("doc", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_cited_names_and_paths_exist(doc: Path):
    problems = find_missing(doc.read_text(encoding="utf-8"))
    assert not problems, f"{doc.relative_to(ROOT)} cites what does not exist:\n" + "\n".join(problems)


def test_checker_reports_a_bad_name_and_a_bad_path(tmp_path: Path):
    """The checker has teeth: a copy of a real doc with a fake name and a fake path fails on both."""
    good = (
        "Use `lla.local_linear_attention` and `lla.nn.LocalLinearAttention`; code in `src/lla/__init__.py`,\n"
        "results in `results/README.md`, `tests/docs/test_docs.py::find_missing`.\n"
    )
    assert find_missing(good) == []
    doc = tmp_path / "fake.md"
    doc.write_text(
        good
        + "The op `lla.no_such_op(q, k, v)` and the layer `lla.nn.NoSuchLayer` live in `src/lla/no_such_file.py`;\n"
        + "see `benchmarks/results/no_such_table.md` and `tests/docs/test_docs.py::no_such_test`.\n",
        encoding="utf-8",
    )
    problems = find_missing(doc.read_text(encoding="utf-8"))
    for bad in ("lla.no_such_op", "lla.nn.NoSuchLayer", "src/lla/no_such_file.py",
                "benchmarks/results/no_such_table.md", "no_such_test"):
        assert any(bad in p for p in problems), (bad, problems)
    assert len(problems) == 5, problems
