"""The package's shape, checked from the source: every module's imports (type-only ones
under ``TYPE_CHECKING`` included) parsed with ``ast``.

* no import cycle anywhere under ``pricehub/``;
* ``wire/`` is pure: it imports nothing of pricehub outside ``wire/`` and no aiohttp;
* ``client/`` imports nothing from ``server/`` or ``storage/``;
* the storage boundary: ``storage/`` imports nothing of ``server/`` (not even for the
  type checker), and ``server/`` reaches the storage only through ``pricehub.storage``,
  ``storage.base`` and ``storage.errors``; the storage reports typed counters and a typed
  disk status, and the server reads no storage attribute by name and shapes the JSON.
"""

from __future__ import annotations

import ast
import functools
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pricehub"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
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


@functools.cache
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
    # server.keys imports the storage for the type checker only.
    assert "pricehub.storage" in edges["pricehub.server.keys"]
    assert "pricehub.storage" not in runtime_imports("pricehub.server.keys")


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
    Protocols) and spells its states with the wire's enums, not the fan-out's classes;
    ingest reaches storage by its Protocol."""
    assert not {m for m in runtime_imports("pricehub.server.keys") if m.startswith("pricehub")}
    assert not {m for m in graph()["pricehub.server.stats"] if not m.startswith("pricehub.wire")}
    assert "pricehub.storage.failover" not in graph()["pricehub.server.ingest"]


def test_the_fanout_knows_encodings_not_transports() -> None:
    """The broadcaster and its connections import no transport (socket/, sse/) and no
    subscriber lifecycle: each transport registers its encodings with it."""
    above = ("pricehub.server.socket", "pricehub.server.sse", "pricehub.server.subscriber")
    for name in modules_under("pricehub.server.fanout"):
        assert not {dep for dep in graph()[name] if dep.startswith(above)}, name


# --- the storage boundary ----------------------------------------------------------------

STORAGE_FRONT = frozenset({"pricehub.storage", "pricehub.storage.base", "pricehub.storage.errors"})


def modules_under(prefix: str) -> list[str]:
    return [name for name in all_modules() if name == prefix or name.startswith(prefix + ".")]


@pytest.mark.parametrize("name", modules_under("pricehub.storage"))
def test_storage_imports_nothing_of_the_server(name: str) -> None:
    """Not even for the type checker: the storage is built from its own ``StorageConfig``."""
    server = {dep for dep in graph()[name] if dep.startswith("pricehub.server")}
    assert not server, f"{name} imports {sorted(server)}"


@pytest.mark.parametrize("name", modules_under("pricehub.server"))
def test_server_reaches_the_storage_only_through_its_front(name: str) -> None:
    inner = {
        dep for dep in graph()[name]
        if dep.startswith("pricehub.storage") and dep not in STORAGE_FRONT
    }  # fmt: skip
    assert not inner, f"{name} imports {sorted(inner)}"


# The Redis ingest consumer is a Redis Streams client itself (XREADGROUP, leases).
DRIVER_USERS = frozenset({"pricehub.server.ingest"})


def test_the_server_needs_no_redis_driver_of_its_own() -> None:
    """Reaching Redis (the workers' start-up ping included) is the storage's business."""
    for name in sorted(set(modules_under("pricehub.server")) - DRIVER_USERS):
        driver = {dep for dep in runtime_imports(name) if dep.split(".")[0] == "redis"}
        assert not driver, f"{name} imports {sorted(driver)}"


# Every backend class, and the reports it owes: all count (the failover reads its Redis
# backend's counters); those an app can be given as its ``Storage`` report their disk.
BACKENDS = {
    "pricehub.storage.memory": ("MemoryStorage", True),
    "pricehub.storage.durable": ("DurableStorage", True),
    "pricehub.storage.redis": ("RedisStorage", False),
    "pricehub.storage.cluster": ("RedisClusterStorage", False),
    "pricehub.storage.failover": ("FailoverStorage", True),
}


def backend_class(module: str) -> type:
    found: type = getattr(importlib.import_module(module), BACKENDS[module][0])
    return found


@pytest.mark.parametrize("module", list(BACKENDS))
def test_every_backend_reports_typed_counters(module: str) -> None:
    """``counters()`` is a member of the Protocol: a backend defines it or inherits the
    Protocol's default (all zero) by subclassing it; the metrics read no counter by name."""
    backend = backend_class(module)
    assert callable(getattr(backend, "counters", None)), f"{backend.__name__}.counters"
    assert backend.counters.__annotations__["return"] == "StorageCounters"


@pytest.mark.parametrize("module", [m for m, (_, disk) in BACKENDS.items() if disk])
def test_every_backend_decides_a_typed_disk_state(module: str) -> None:
    """``disk_status()`` returns ``base.DiskStatus`` (its state a ``DiskState``), built by
    no module from strings: nothing of the old ``durable.DiskStatus`` way is imported."""
    backend = backend_class(module)
    assert callable(getattr(backend, "disk_status", None)), f"{backend.__name__}.disk_status"
    legacy = {
        f"pricehub.storage.durable.{name}"
        for name in ("DiskStatus", "DISK_DISABLED", "DISK_FOREIGN", "journal_disk_status")
    }
    used = set(imported_names(all_modules()[module], module)) & legacy
    assert not used, f"{module} imports {sorted(used)}"


def test_storage_shapes_no_document() -> None:
    from pricehub.server.http.api import durability_section
    from pricehub.storage import DiskState, DiskStatus

    assert not hasattr(DiskStatus, "as_json")  # the durability section is the server's
    assert durability_section(DiskStatus(DiskState.UNAVAILABLE, "closed")) == {
        "status": "unavailable: closed"
    }


@pytest.mark.parametrize(
    "name", ["pricehub.server.http.metrics", "pricehub.server.http.api", "pricehub.server.stats"]
)
def test_documents_read_the_storage_by_typed_members_not_by_name(name: str) -> None:
    """``getattr(storage, "failovers", 0)`` exported 0 forever after a rename."""
    path = all_modules()[name]
    by_name = [
        ast.unparse(node) for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr") and node.args
        and any(word in ast.unparse(node.args[0]) for word in ("storage", "ingest", "counters"))
    ]  # fmt: skip
    assert not by_name, f"{name}: {by_name}"
