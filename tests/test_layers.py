"""One-way layers (issue 19): imports only go down, or sideways one way, and never in a circle.

Every ``.py`` file under ``declip_fast/`` and ``kernels/`` (installed as ``declip_fast.kernels``) is
parsed with ``ast``; every import counts, module-level or inside a function (a lazy import is
still a dependency). Each file belongs to a package (``declip_fast.<name>``); the table below
puts each package in a layer. The test fails, naming file, line and import, on

* an import from a higher layer;
* two packages of one layer that import each other (one direction is fine);
* a circle of file imports inside a package. Imports under ``if TYPE_CHECKING:`` count for the
  layers but not for circles: they never run, so they cannot close an import circle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The layer table, bottom (0) to top. A package may import its own layer and those below.
# ``declip_fast.atomic`` (atomic file writes) and ``declip_fast`` itself (its ``__init__``) are
# leaf utilities at the bottom.
LAYERS: dict[str, int] = {
    "declip_fast": 0,
    "declip_fast.atomic": 0,
    "declip_fast.kernels": 0,
    "declip_fast.distributed": 0,
    "declip_fast.models": 1,
    "declip_fast.losses": 1,
    "declip_fast.data": 2,
    "declip_fast.train": 3,
    "declip_fast.eval": 3,
    "declip_fast.cli": 4,
    "declip_fast.integrations": 4,
}


def _files() -> dict[str, Path]:
    """module name -> file, for every module of the library."""
    found = {}
    for base, prefix in ((ROOT / "declip_fast", "declip_fast"), (ROOT / "kernels", "declip_fast.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def package_of(module: str) -> str:
    """The layer-table entry of a module: the longest one that is it or contains it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS in {__file__}")


def _resolve(module: str, name: str) -> str | None:
    """The library module ``name`` stands for (a dotted name, maybe ``package.attribute``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def _typing_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for stmt in node.body:
                out.update(id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return out


def imports(module: str) -> list[tuple[int, str, str, bool]]:
    """(line, imported library module, import text, typing only) for every import in ``module``'s
    file, once per line and module."""
    path = MODULES[module]
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    typing_only = _typing_only(tree)
    here = module if _is_package(module) else module.rpartition(".")[0]
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import submodule`` imports the submodule; ``from mod import name`` the module
            names = [f"{source}.{a.name}" for a in node.names]
        else:
            continue
        text = ast.unparse(node)
        for name in names:
            target = _resolve(module, name)
            if target is not None and target != module:
                found.setdefault((node.lineno, target), (node.lineno, target, text, id(node) in typing_only))
    return sorted(found.values())


EDGES = {m: imports(m) for m in MODULES}


def _where(module: str, line: int, text: str) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}: {text}"


def test_every_module_is_in_a_layer():
    for module in MODULES:
        package_of(module)


def test_no_import_from_a_higher_layer():
    bad = []
    for module, edges in EDGES.items():
        mine = LAYERS[package_of(module)]
        for line, target, text, _ in edges:
            theirs = LAYERS[package_of(target)]
            if theirs > mine:
                bad.append(
                    f"{_where(module, line, text)}  ({package_of(module)} is layer {mine}, "
                    f"{package_of(target)} layer {theirs})"
                )
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_two_way_dependency_within_a_layer():
    seen = defaultdict(list)  # (from package, to package) -> where
    for module, edges in EDGES.items():
        for line, target, text, _ in edges:
            a, b = package_of(module), package_of(target)
            if a != b and LAYERS[a] == LAYERS[b]:
                seen[a, b].append(_where(module, line, text))
    bad = []
    for (a, b), where in sorted(seen.items()):
        if a < b and (b, a) in seen:
            bad.append(f"{a} <-> {b}:\n  " + "\n  ".join(where + seen[b, a]))
    assert not bad, "packages of one layer that import each other:\n" + "\n".join(bad)


def _cycles() -> list[list[str]]:
    """Circles among the files of one package (Tarjan's strongly connected components).
    A package's ``__init__`` is left out: importing a submodule always runs it first."""
    graph = {
        m: sorted(
            {
                t
                for _, t, _, typing_only in EDGES[m]
                if not typing_only and package_of(t) == package_of(m) and not _is_package(t)
            }
        )
        for m in MODULES
        if not _is_package(m)
    }
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_circle_of_file_imports():
    bad = []
    for component in _cycles():
        members = set(component)
        lines = [
            _where(m, line, text)
            for m in component
            for line, t, text, typing_only in EDGES[m]
            if t in members and not typing_only
        ]
        bad.append(" <-> ".join(component) + ":\n  " + "\n  ".join(lines))
    assert not bad, "files that import each other in a circle:\n" + "\n".join(bad)
