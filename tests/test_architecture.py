"""Architecture rules, checked statically with ``ast``: import cycles in core, the facade, private
names, what plugins may import. Only the matplotlib check imports mmfw (in a subprocess).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACADE = "mmfw"  # the top-level __init__: the public API, which imports from everywhere
# Core modules that are documented public API: plugins may import them besides mmfw.spi.
PUBLIC_FOR_PLUGINS = {"mmfw.eval", "mmfw.data", "mmfw.diagnostics", "mmfw.tools"}
TYPE_CHECKING = {"TYPE_CHECKING", "typing.TYPE_CHECKING"}
Graph = dict[str, dict[str, dict[str, str]]]  # module -> {imported module: {where: code}}


class Module(NamedTuple):
    name: str  # dotted; a package is named by its __init__.py
    path: Path
    is_pkg: bool
    core: bool  # under core/, else a plugin (plugins/, contrib/*/src)


class Import(NamedTuple):
    where: str  # "path:line" from the repository root
    code: str  # the statement as written
    source: str  # the absolute module the statement names
    target: str  # what it reaches: source, or source.name when that is a submodule
    name: str | None  # the name taken; None for ``import x``


@functools.cache
def modules() -> dict[str, Module]:
    roots = [(ROOT / "core", True), (ROOT / "plugins", False)]
    roots += [(src, False) for src in sorted(ROOT.glob("contrib/*/src"))]
    found = {}
    for root, core in roots:
        for path in sorted(root.glob("*/**/*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_pkg = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_pkg else parts)
            found[name] = Module(name, path, is_pkg, core)
    return found


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def import_nodes(node: ast.AST, type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements at any depth; those under ``if TYPE_CHECKING:`` only if asked."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    children = list(ast.iter_child_nodes(node))
    if isinstance(node, ast.If) and ast.unparse(node.test) in TYPE_CHECKING and not type_checking:
        children = node.orelse
    for child in children:
        yield from import_nodes(child, type_checking)


def absolute(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = mod.name.split(".")[: None if mod.is_pkg else -1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def submodule_or(base: str, name: str) -> str:
    return f"{base}.{name}" if f"{base}.{name}" in modules() else base


def imports(mod: Module, type_checking: bool = False) -> list[Import]:
    found = []
    for node in import_nodes(parse(mod.path), type_checking):
        where, code = f"{mod.path.relative_to(ROOT)}:{node.lineno}", ast.unparse(node)
        for a in node.names:
            if isinstance(node, ast.Import):
                found.append(Import(where, code, a.name, a.name, None))
            else:
                base = absolute(mod, node)
                found.append(Import(where, code, base, submodule_or(base, a.name), a.name))
    return found


def core_graph() -> Graph:
    graph: Graph = {}
    for mod in (m for m in modules().values() if m.core):
        edges = graph.setdefault(mod.name, {})
        for imp in imports(mod):
            if imp.target != mod.name and getattr(modules().get(imp.target), "core", False):
                edges.setdefault(imp.target, {})[imp.where] = imp.code
    return graph


def fail_if(lines: list[str], title: str) -> None:
    if lines:
        pytest.fail(f"{title}:\n" + "\n".join(dict.fromkeys(lines)), pytrace=False)


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            components.append(stack[stack.index(node) :])
            del stack[stack.index(node) :]

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def shortest_path(graph: Graph, start: str, goal: str) -> list[str]:
    parents: dict[str, str] = {}
    queue = deque([start])
    while goal not in parents:
        node = queue.popleft()
        for nxt in sorted(set(graph[node]) - set(parents)):
            parents[nxt] = node
            queue.append(nxt)
    path = [goal]
    while path[-1] != start:
        path.append(parents[path[-1]])
    return path[::-1]


def cycles(graph: Graph) -> list[list[str]]:
    """A shortest cycle through each edge of each strongly connected component, ``[a, b, a]``."""
    found = set()
    for scc in strongly_connected(graph):
        sub = {n: {m: i for m, i in graph[n].items() if m in scc} for n in scc}
        for node, nxt in ((n, m) for n in scc for m in sub[n]):
            ring = [node, *shortest_path(sub, nxt, node)][:-1]
            first = ring.index(min(ring))
            found.add(tuple(ring[first:] + ring[:first]))
    return [[*ring, ring[0]] for ring in sorted(found)]


def test_no_import_cycles() -> None:
    graph = {n: {m: i for m, i in e.items() if m != FACADE} for n, e in core_graph().items()}
    graph.pop(FACADE, None)
    report = []
    for ring in cycles(graph):
        hops = [f"    {w}  {code}" for a, b in pairwise(ring) for w, code in graph[a][b].items()]
        report.append("\n".join([" -> ".join(ring), *hops]))
    fail_if(report, "import cycles among core modules")


def test_core_does_not_import_facade() -> None:
    graph = core_graph()
    bad = [
        f"{w}  {code}"
        for n, e in graph.items()
        if n != FACADE
        for w, code in e.get(FACADE, {}).items()
    ]
    fail_if(bad, "core modules import the mmfw facade (import the defining module instead)")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(mod: Module) -> Iterator[str]:
    """``from x import _y``; a private module ``pkg._m`` imported from outside ``pkg``."""
    for imp in imports(mod, type_checking=True):
        if imp.target.split(".")[0] not in {name.split(".")[0] for name in modules()}:
            continue  # stdlib or third party
        parts = imp.target.split(".")
        owners = [".".join(parts[:i]) for i, part in enumerate(parts) if is_private(part)]
        if any(mod.name != o and not mod.name.startswith(o + ".") for o in owners):
            yield f"{imp.where}  {imp.code}  [private module {imp.target}]"
        elif imp.name and is_private(imp.name) and imp.target == imp.source:
            yield f"{imp.where}  {imp.code}  [private name {imp.name}]"


def module_aliases(mod: Module) -> dict[str, str]:
    """Local name -> the project module an import binds it to."""
    aliases = {}
    for node in import_nodes(parse(mod.path), type_checking=True):
        for a in node.names:
            if isinstance(node, ast.Import):
                bound = a.name if a.asname else a.name.split(".")[0]  # import a.b binds a
                aliases[a.asname or bound] = bound
            elif (base := absolute(mod, node)) != (target := submodule_or(base, a.name)):
                aliases[a.asname or a.name] = target
    return {local: target for local, target in aliases.items() if target in modules()}


def private_attributes(mod: Module) -> Iterator[str]:
    """``alias._name`` where alias (or ``alias.sub``) is an imported project module."""
    aliases = module_aliases(mod)
    for node in ast.walk(parse(mod.path)):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            head, _, rest = ast.unparse(node.value).partition(".")
            if head in aliases and ".".join(filter(None, [aliases[head], rest])) in modules():
                yield f"{mod.path.relative_to(ROOT)}:{node.lineno}  {ast.unparse(node)}"


def test_no_private_names_across_modules() -> None:
    bad = [b for m in modules().values() for b in [*private_imports(m), *private_attributes(m)]]
    fail_if(bad, "private names reached from another module")


def plugin_may_import(target: str) -> bool:
    if target.split(".")[0] != FACADE:
        return True  # stdlib, third party, or a plugin package (its own modules included)
    public = {"mmfw.spi", *PUBLIC_FOR_PLUGINS}
    return target == FACADE or any(target == p or target.startswith(p + ".") for p in public)


def test_plugins_import_only_the_spi() -> None:
    bad = [
        f"{imp.where}  {imp.code}  [reaches {imp.target}]"
        for mod in modules().values()
        if not mod.core
        for imp in imports(mod, type_checking=True)
        if not plugin_may_import(imp.target)
    ]
    fail_if(bad, "plugins import core modules outside mmfw, mmfw.spi and PUBLIC_FOR_PLUGINS")


@pytest.mark.parametrize("module", ["mmfw", "mmfw.spi"])
def test_import_mmfw_does_not_touch_matplotlib(module: str) -> None:
    if module != FACADE and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    code = (
        f"import {module}, sys; assert 'matplotlib' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('matplotlib'))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    last = run.stderr.strip().splitlines()[-1:]  # AssertionError: [the matplotlib modules]
    fail_if([line[:800] for line in last if run.returncode], f"import {module} imports matplotlib")
