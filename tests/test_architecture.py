"""The package's shape, checked from the source: every module's imports (type-only ones
under ``TYPE_CHECKING`` included) parsed with ``ast``.

* no import cycle anywhere under ``pricehub/``;
* ``wire/`` is pure: it imports nothing of pricehub outside ``wire/`` and no aiohttp;
* ``client/`` imports nothing from ``server/`` or ``storage/``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pricehub"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, name: str) -> Iterator[str]:
    """Every absolute module name ``path`` imports, at any depth of its tree (functions,
    ``if TYPE_CHECKING:`` blocks), ``from a import b`` giving both ``a`` and ``a.b``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {
        name: {dep for dep in imported_names(path, name) if dep in modules and dep != name}
        for name, path in modules.items()
    }


def external_imports(prefix: str) -> dict[str, set[str]]:
    modules = all_modules()
    return {
        name: set(imported_names(path, name))
        for name, path in modules.items()
        if name == prefix or name.startswith(prefix + ".")
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_parser_sees_type_only_imports() -> None:
    edges = graph()
    assert "pricehub.wire.codes" in edges["pricehub.wire"] | edges["pricehub.wire.messages"]
    assert edges["pricehub.storage"] >= {"pricehub.storage.base", "pricehub.server.settings"}


def test_no_import_cycle_not_even_through_type_only_imports() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_wire_is_pure() -> None:
    for name, imports in external_imports("pricehub.wire").items():
        outside = {
            dep for dep in imports
            if (dep.startswith("pricehub") and not dep.startswith("pricehub.wire"))
            or dep.split(".")[0] == "aiohttp"
        }  # fmt: skip
        assert not outside, f"{name} imports {sorted(outside)}"


def test_client_imports_neither_server_nor_storage() -> None:
    for name, imports in external_imports("pricehub.client").items():
        forbidden = {
            dep for dep in imports if dep.startswith(("pricehub.server", "pricehub.storage"))
        }
        assert not forbidden, f"{name} imports {sorted(forbidden)}"


def runtime_imports(name: str) -> set[str]:
    """What a module imports when it runs: ``if TYPE_CHECKING:`` blocks left out."""
    path = all_modules()[name]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_app_keys_and_stats_depend_on_no_component() -> None:
    """Using an app key does not load the whole server; stats reads plain numbers (and
    Protocols), not the fan-out's classes; ingest reaches storage by its Protocol."""
    assert not {m for m in runtime_imports("pricehub.server.keys") if m.startswith("pricehub")}
    assert not graph()["pricehub.server.stats"]
    assert "pricehub.storage.failover" not in graph()["pricehub.server.ingest"]
