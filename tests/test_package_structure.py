"""The package's structure: no import cycles between modules, the library never imports the CLI, and no module
changes process-wide interpreter settings.

Imports inside functions count: a lazy import is still a dependency, and a cycle through one is a design tie
whether or not Python meets it at import time. A package ``__init__`` re-exporting its own submodules is not a
cycle. Python's ``ast`` is the parser, so the check needs nothing installed.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the dotted package it installs as
SOURCES = {ROOT / "moe_export": "moe_export"}
CLI = ("moe_export.commands", "moe_export.cli", "moe_export.__main__")

# Cycles still waiting for their cut. Each entry must be a cycle the graph has now: once a cut lands, this test
# fails until its entry is deleted, so the list can only shrink to empty.
EXPECTED_CYCLES: set[tuple[str, ...]] = set()


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for base, prefix in SOURCES.items():
        for f in base.rglob("*.py"):
            parts = [p for p in f.relative_to(base).with_suffix("").parts if p != "__init__"]
            mods[".".join([prefix, *parts])] = (f, f.name == "__init__.py")
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at top level or inside functions)."""
    mods = _modules()

    def resolve(name):  # the longest known module prefix of a dotted name
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: set() for m in mods}
    for m, (f, is_pkg) in mods.items():
        pkg = m if is_pkg else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
            else:
                continue
            for t in targets:
                r = resolve(t)
                if r is None or r == m:
                    continue
                if is_pkg and r.startswith(m + "."):
                    continue  # an __init__ re-exporting its own submodule
                if mods[r][1] and m.startswith(r + "."):
                    continue  # a submodule importing its own package's __init__
                edges[m].add(r)
    return edges


def cycles(edges: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan, iterative), each as a sorted tuple."""
    index, low, on, stack, out = {}, {}, set(), [], set()
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.add(tuple(sorted(comp)))
    return out


def test_cycle_finder_sees_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == {("a", "b", "c")}
    assert cycles({"a": {"b"}, "b": set()}) == set()


def test_no_import_cycles_in_the_package():
    found = cycles(import_graph())
    new = found - EXPECTED_CYCLES
    assert not new, f"new import cycles: {sorted(new)}"
    gone = EXPECTED_CYCLES - found
    assert not gone, f"these cycles are gone: delete them from EXPECTED_CYCLES: {sorted(gone)}"


def test_the_library_never_imports_the_cli():
    edges = import_graph()
    importers = {m for m, deps in edges.items() if not m.startswith(CLI)
                 and any(d.startswith("moe_export.commands") for d in deps)}
    assert not importers, f"library modules importing moe_export.commands: {sorted(importers)}"


def test_no_module_changes_the_recursion_limit():
    # the limit is process-wide: a library that raises it for its own recursion changes every caller's
    calls = []
    for m, (f, _) in _modules().items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Attribute) and node.attr == "setrecursionlimit":
                calls.append(f"{m}:{node.lineno}")
    assert not calls, f"sys.setrecursionlimit in {calls}"


def test_no_top_level_kernels_module_from_the_repository_root():
    """`python -m pytest` / `python -c` from the repository root put it on sys.path: a kernels/ folder there would
    be importable as `kernels` and shadow the hub package of that name, which transformers imports."""
    import subprocess
    import sys

    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    origin = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert not origin.stdout.strip().startswith(str(ROOT)), origin.stdout
