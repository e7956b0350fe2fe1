"""The Python client stands alone: everything ``pricehub.client`` imports, followed
module by module (``ast``, type-only imports included), stays out of ``pricehub.server``
and ``pricehub.storage``, and outside pricehub it needs only aiohttp, yarl and orjson.

``tests/system/test_architecture.py`` checks each client module's own imports; this follows them
through ``pricehub.wire`` (a wire module that imported the server would bring it to every
trading bot), and runs ``pricehub tail --help`` to see what is really loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pricehub"
FORBIDDEN = ("pricehub.server", "pricehub.storage")
# Outside pricehub: the standard library, and what the client's docs say it runs on.
THIRD_PARTY = {"aiohttp", "yarl", "orjson"}


def _path(module: str) -> Path | None:
    """The source of a pricehub module (a package's ``__init__``), None for a name that
    is not a module (``from pricehub.wire import paths`` also yields ``...wire.paths``
    either way; a class name yields nothing)."""
    base = PACKAGE.parent.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return found


def _closure(roots: list[str]) -> tuple[dict[str, str], set[str]]:
    """Every pricehub module reachable from ``roots`` (with the module that first
    imported it, for the message) and every top-level outside package they import."""
    reached: dict[str, str] = {root: "" for root in roots}
    outside: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        path = _path(module)
        assert path is not None, module
        for name in _imports(module, path):
            top = name.split(".")[0]
            if top != "pricehub":
                outside.add(top)
            elif name not in reached and _path(name) is not None:
                reached[name] = module
                todo.append(name)
    return reached, outside


def _client_modules() -> list[str]:
    client = PACKAGE / "client"
    modules = [f"pricehub.client.{path.stem}" for path in client.glob("*.py")]
    return [name if not name.endswith(".__init__") else "pricehub.client" for name in modules]


def test_nothing_the_client_reaches_is_server_or_storage() -> None:
    reached, _ = _closure(_client_modules())
    assert "pricehub.wire.decode" in reached, "the walk follows the client into wire/"
    bad = {name: via for name, via in reached.items() if name.startswith(FORBIDDEN)}
    assert not bad, f"reached from the client (module: imported by): {bad}"


def test_outside_pricehub_the_client_needs_only_aiohttp_yarl_and_orjson() -> None:
    _, outside = _closure(_client_modules())
    assert not outside - THIRD_PARTY - sys.stdlib_module_names, sorted(outside)


def test_pricehub_tail_loads_no_server_module() -> None:
    """The command line shares ``pricehub.cli`` with the server: ``tail`` must not pay for
    (or depend on) the server's imports."""
    probe = (
        "import sys\n"
        "from pricehub.cli import main\n"
        "try:\n"
        "    main(['tail', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=PACKAGE.parent, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    assert "usage: pricehub tail" in result.stdout
    assert result.stdout.strip().endswith("[]"), result.stdout[-2000:]
