"""The device code's module structure: layers, no cycles, public names only.

Parses the device sources (`mpy_blox/`, `main.py`, `mpypi_recover.py`) with `ast` and
builds their import graph from every import, at module level and inside functions, and
from every string that names a device module (`__import__("mpy_blox.x")`,
`sys.modules["mpy_blox.x"]`, the runtime's optional imports by name).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted((REPO / "mpy_blox").rglob("*.py")) + [REPO / "main.py", REPO / "mpypi_recover.py"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in SOURCES}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _resolve(name: str) -> str | None:
    # The device module `name` is, or lives in; None for built-ins.
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(tree: ast.Module) -> dict[str, str]:
    """{local name: device module} for every import in the tree, wherever it is."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name)
                if target is not None:
                    bound[a.asname or a.name.partition(".")[0]] = (
                        target if a.asname else _resolve(a.name.partition(".")[0]) or target
                    )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = node.module + "." + a.name
                target = full if full in MODULES else _resolve(node.module)
                if target is not None:
                    bound[a.asname or a.name] = target
    return bound


def _edges(name: str) -> set[str]:
    out = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out.update(_resolve(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = node.module + "." + a.name
                out.add(full if full in MODULES else _resolve(node.module))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in MODULES
            and "." in node.value
        ):
            out.add(node.value)  # a module imported or dropped by its name
    out.discard(None)
    out.discard(name)
    return out


GRAPH = {name: _edges(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == "open":
                found.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)
    return found


def _own_names(tree: ast.Module) -> set[str]:
    # Underscore names a module defines itself: functions, classes, attributes.
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
    return names


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def _reach_through(name: str) -> list[str]:
    tree = TREES[name]
    bound, own = _imports(tree), _own_names(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _resolve(node.module):
            bad += [f"from {node.module} import {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in bound and bound[base.id] != name:
                bad.append(f"{base.id}.{node.attr} (module {bound[base.id]})")
            elif node.attr not in own and not (isinstance(base, ast.Name) and base.id == "self"):
                # An object's private member that this module does not define:
                # another module's class reached through an instance.
                bad.append(f"{ast.unparse(base)}.{node.attr} (line {node.lineno})")
    return bad


def test_the_device_modules_form_no_import_cycle():
    assert _cycles() == []


def test_nothing_under_update_imports_the_app():
    offenders = {n: sorted(GRAPH[n]) for n in GRAPH if n.startswith("mpy_blox.update")}
    assert {n: e for n, e in offenders.items() if "mpy_blox.app" in e} == {}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_uses_only_public_names_of_the_others(name):
    assert _reach_through(name) == []


def test_the_graph_sees_function_level_and_by_name_imports():
    # The checks above are only as good as the graph: it must see an import
    # inside a function and a module loaded by its name.
    tree = ast.parse(
        "def f():\n    from mpy_blox.update import record\n    sys.modules['mpy_blox.app'].x\n"
    )
    TREES["probe"] = tree
    try:
        assert _edges("probe") >= {"mpy_blox.update.record", "mpy_blox.app"}
    finally:
        del TREES["probe"]
