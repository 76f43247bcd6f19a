"""The package's layering, checked from the source: no import cycle, no upward import, and the two
mechanisms (``ops/lla``, ``ops/parallax``) stand on ``ops/common`` without importing each other.

Every ``import`` counts, module-level and inside functions.  Layers, bottom to top:

    0  ops.common          the shared floor (checks, varlen, masks, kvcache, policy, diagnostics, result, ...)
    1  ops.lla, ops.parallax, baselines   one folder per mechanism; functional baselines
    2  ops                 the package re-exporting the public ops
    3  distributed         context parallelism over the ops
    4  nn                  layers
    5  integrations, experiments, bench
    6  cli, __main__
    7  lla                 the package root
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "lla"

LAYERS = [
    ("lla.ops.common", 0), ("lla.ops.lla", 1), ("lla.ops.parallax", 1), ("lla.baselines", 1), ("lla.ops", 2),
    ("lla.distributed", 3), ("lla.nn", 4), ("lla.integrations", 5), ("lla.experiments", 5), ("lla.bench", 5),
    ("lla.cli", 6), ("lla.__main__", 6), ("lla", 7),
]
#: deliberate exceptions: the deprecated aliases ``lla.nn.MIXERS`` / ``lla.nn.build_mixer`` import the
#: registry from the experiments lazily, only when the old name is used
ALLOWED_UPWARD = {("lla.nn", "lla.experiments")}
MECHANISMS = ("lla.ops.lla", "lla.ops.parallax")


def module_names(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """``{dotted module name: (file, package parts)}`` for every ``.py`` under ``root`` (a package dir)."""
    mods = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            pkg = parts
        else:
            pkg = parts[:-1]
        mods[".".join(parts)] = (p, pkg)
    return mods


def import_edges(root: Path) -> dict[str, set[str]]:
    """``{module: {imported module of the same package}}``, relative imports resolved."""
    mods = module_names(root)
    top = root.name
    edges = {}
    for name, (path, pkg) in mods.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg[: len(pkg) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != top:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    out.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.split(".")[0] == top)
        edges[name] = {t for t in out if t != name}
    return edges


def layer_of(module: str) -> tuple[str, int]:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Upward imports and imports between the mechanisms (``ALLOWED_UPWARD`` excepted)."""
    bad = []
    for src, targets in edges.items():
        (ps, rs) = layer_of(src)
        for dst in targets:
            (pd, rd) = layer_of(dst)
            if rd > rs and (ps, pd) not in ALLOWED_UPWARD:
                bad.append(f"upward: {src} ({ps}, layer {rs}) imports {dst} ({pd}, layer {rd})")
            if ps in MECHANISMS and pd in MECHANISMS and ps != pd:
                bad.append(f"between mechanisms: {src} imports {dst}")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_and_no_upward_import():
    edges = import_edges(SRC)
    assert len(edges) > 40  # the walk found the package
    # the allowed lazy aliases are not import-time edges: without them the graph has no cycle
    real = {s: {d for d in ts if (layer_of(s)[0], layer_of(d)[0]) not in ALLOWED_UPWARD} for s, ts in edges.items()}
    assert cycles(real) == []
    assert violations(edges) == []


def test_the_mechanisms_stand_on_common_only():
    edges = import_edges(SRC)
    for src, targets in edges.items():
        if src.startswith("lla.ops.parallax"):
            assert not any(t.startswith("lla.ops.lla") for t in targets), (src, targets)
        if src.startswith("lla.ops.lla"):
            assert not any(t.startswith("lla.ops.parallax") for t in targets), (src, targets)
    assert any(t.startswith("lla.ops.common") for t in edges["lla.ops.parallax.api"])


def test_the_checker_catches_a_cycle_an_upward_import_and_a_cross_mechanism_import(tmp_path):
    pkg = tmp_path / "lla"
    for d in ("ops/common", "ops/lla", "ops/parallax", "nn"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "common" / "a.py").write_text("from ...nn import layer\n")  # upward
    (pkg / "nn" / "layer.py").write_text("from ..ops.common import a\n")  # closes a cycle
    (pkg / "ops" / "parallax" / "api.py").write_text("def f():\n    from ..lla import api\n")  # across
    (pkg / "ops" / "lla" / "api.py").write_text("")
    edges = import_edges(pkg)
    assert cycles(edges) == [["lla.nn.layer", "lla.ops.common.a"]]
    found = violations(edges)
    assert any(v.startswith("upward: lla.ops.common.a") for v in found), found
    assert any(v.startswith("between mechanisms: lla.ops.parallax.api") for v in found), found
