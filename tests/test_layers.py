"""The project's import layering: no import cycles, lower layers never import upper ones.

The graph is read from the source with :mod:`ast` (nothing is imported): every ``import`` and
``from ... import`` of a project module (``currsearch``, ``estimators``, ``search_spaces``) at
module level *and* inside functions or classes counts, relative imports are resolved, and
``from pkg import name`` points at ``pkg.name`` when that is a module (else at ``pkg``).
Imports under ``if TYPE_CHECKING:`` never run and are not counted. Importing ``a.b`` is an edge
to ``a.b`` only (not to its parent package ``a``), as in import-linter.

Layers (issue 15; docs/architecture.md): L0 errors, settings, results, ledger, config, manifest,
orders, projection; L1 corpus, data, plan, model, adam, adjoint, gradients, warmup, train; L2 record, store;
L3 estimators, search_spaces; L4 backends, study, search, baselines, polish, guided, verify, trust_region,
fidelity, positions, regime, ablate, export; L5 pipeline; L6 reports; L7 cli.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("currsearch", "estimators", "search_spaces")

LOWER = [f"currsearch.{m}" for m in (
    "config", "errors", "manifest", "orders", "projection", "corpus", "data", "plan", "model", "adam",
    "adjoint", "gradients", "warmup", "train", "record", "store",
)]
UPPER = ["estimators", "search_spaces"] + [f"currsearch.{m}" for m in (
    "search", "study", "baselines", "polish", "guided", "backends", "verify", "trust_region", "fidelity", "positions", "regime", "ablate",
    "reports",
    "pipeline", "cli",
)]
#: the full target order (COMMON.md / docs/architecture.md): a module may import its own layer and lower ones
LAYERS = [
    [f"currsearch.{m}" for m in ("errors", "settings", "results", "ledger", "config", "manifest", "orders", "projection")],
    [f"currsearch.{m}" for m in ("corpus", "data", "plan", "model", "adam", "adjoint", "gradients", "warmup", "train")],
    ["currsearch.record", "currsearch.store"],
    ["estimators", "search_spaces"],
    [f"currsearch.{m}" for m in ("backends", "study", "search", "baselines", "polish", "guided", "verify", "trust_region", "fidelity",
                                 "positions", "regime", "ablate", "export")],
    ["currsearch.pipeline"],
    ["currsearch.reports"],
    ["currsearch.cli"],
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every project module (dotted name -> file), packages under their package name."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[_module_name(path)] = path
    return mods


def _in(name: str, prefixes) -> bool:
    """``name`` is one of ``prefixes`` or a submodule of one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """All import nodes outside ``if TYPE_CHECKING:`` blocks, with their nesting (module/function)."""
    stack = [(tree, False)]
    while stack:
        node, nested = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend((c, nested) for c in child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, nested
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            stack.append((child, inner))


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target(name: str, mods: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` is or lies in (``None``: not a project module)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def import_graph() -> dict[str, dict[str, list[str]]]:
    """``{importer: {imported: ["file:line (module-level|function-level)", ...]}}`` over project modules."""
    mods = project_modules()
    graph: dict[str, dict[str, list[str]]] = {m: {} for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node, nested in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = _resolve(mod, is_pkg, node)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            where = f"{path.relative_to(ROOT)}:{node.lineno} ({'function' if nested else 'module'}-level)"
            for name in names:
                tgt = _target(name, mods)
                if tgt is not None and tgt != mod and where not in graph[mod].get(tgt, []):
                    graph[mod].setdefault(tgt, []).append(where)
    return graph


def strongly_connected_components(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); returns the components with more than one module."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def _one_cycle(graph, comp: list[str]) -> list[str]:
    """A shortest cycle through the first module of a component (breadth-first, inside it)."""
    start, members = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def layer_violations(graph) -> list[str]:
    return [
        f"{a} -> {b}  [{'; '.join(where)}]"
        for a in sorted(graph)
        for b, where in sorted(graph[a].items())
        if _in(a, LOWER) and _in(b, UPPER)
    ]


def layer_of(mod: str) -> int | None:
    """Index into ``LAYERS`` of a module (``None``: unassigned, e.g. the ``currsearch`` package)."""
    hits = [i for i, layer in enumerate(LAYERS) if _in(mod, layer)]
    return hits[-1] if hits else None


def rank_violations(graph) -> list[str]:
    out = []
    for a in sorted(graph):
        for b, where in sorted(graph[a].items()):
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and lb > la:
                out.append(f"{a} (L{la}) -> {b} (L{lb})  [{'; '.join(where)}]")
    return out


def cycle_report(graph) -> list[str]:
    lines = []
    for comp in strongly_connected_components(graph):
        cyc = _one_cycle(graph, comp)
        edges = [f"    {a} -> {b}  [{'; '.join(graph[a][b])}]" for a, b in zip(cyc, cyc[1:])]
        inside = [f"    {a} -> {b}  [{'; '.join(graph[a][b])}]" for a in comp for b in sorted(graph[a]) if b in comp]
        lines.append(f"cycle among {comp}; shortest through {comp[0]}:\n" + "\n".join(edges)
                     + "\n  all imports inside this cycle:\n" + "\n".join(inside))
    return lines


def test_the_graph_reader_sees_known_edges():
    """The reader itself: relative, absolute, module- and function-level imports are found."""
    g = import_graph()
    assert "estimators.base" in g["estimators"]  # from .base import ...
    assert "estimators.fut" in g["estimators"]  # from . import fut
    assert "currsearch.store" in g["currsearch.record"]  # from .store import ...
    assert "currsearch.adam" in g["estimators.common"]  # from currsearch.adam import ...
    assert all(b in g for a in g for b in g[a])
    assert layer_of("currsearch.store") == 2 and layer_of("currsearch.ablate.models") == 4
    assert layer_of("currsearch.cli.run") == 7 and layer_of("estimators.fut") == 3


def test_scc_finds_a_cycle_and_its_edges():
    g = {"a": {"b": ["x"]}, "b": {"c": ["y"]}, "c": {"a": ["z"]}, "d": {"a": ["w"]}}
    assert strongly_connected_components(g) == [["a", "b", "c"]]
    assert _one_cycle(g, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert strongly_connected_components({"a": {"b": []}, "b": {}}) == []


def test_imports_are_acyclic_and_layered():
    graph = import_graph()
    cycles, violations = cycle_report(graph), layer_violations(graph)
    msg = []
    if cycles:
        msg += [f"{len(cycles)} import cycle(s) (module granularity, function-level imports included):"] + cycles
    if violations:
        msg += [f"{len(violations)} lower-layer module(s) import upper layers (lower -> upper):"] + ["    " + v for v in violations]
    assert not msg, "\n".join(msg)


def test_every_layer_imports_only_its_own_and_lower_layers():
    """The full order L0..L7 (stricter than the lower/upper split above: e.g. manifest (L0)
    must not import train (L1), compute (L4) must not import reports (L6)), and every
    project module has a layer."""
    graph = import_graph()
    unassigned = sorted(m for m in graph if layer_of(m) is None and m not in PACKAGES)
    assert not unassigned, f"modules without a layer (add them to LAYERS and docs/architecture.md): {unassigned}"
    bad = rank_violations(graph)
    assert not bad, f"{len(bad)} import(s) of a higher layer:\n" + "\n".join("    " + v for v in bad)
