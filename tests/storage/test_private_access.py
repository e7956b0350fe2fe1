"""No class in ``storage/`` reads another module's private state (issue 27).

Checked from the source with ``ast``, for every module under ``pricehub/storage/``:

* no ``from m import _name`` of another module;
* no ``x._name`` (``self._name`` included) whose ``_name`` the module itself does not
  define (a function, class, assignment or attribute store of its own): reading it means
  reaching into another module's object, or into a base class of another module;
* no class overriding a private method of a base class defined in another storage module:
  a variant composes its parts or implements a Protocol, it does not patch a class's
  insides (renaming a private method there would change it with no type error).

Dunder names are public by Python's rules and not checked.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pricehub"
STORAGE = PACKAGE / "storage"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(STORAGE.rglob("*.py"))}


@functools.cache
def _tree(name: str) -> ast.Module:
    path = _modules()[name]
    return ast.parse(path.read_text(), str(path))


def _own_names(tree: ast.Module) -> frozenset[str]:
    """Every name a module defines: functions, classes, arguments, assigned names and
    attributes."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
    return frozenset(own)


def _private_methods(module: str, cls: str) -> frozenset[str]:
    for node in _tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return frozenset(
                item.name for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                and _private(item.name)
            )  # fmt: skip
    return frozenset()


def _imported_classes(tree: ast.Module) -> dict[str, tuple[str, str]]:
    """Local name -> (storage module, class name) for ``from pricehub.storage.m import C``."""
    found: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in _modules() and not node.level:
            for alias in node.names:
                found[alias.asname or alias.name] = (node.module, alias.name)
    return found


def violations(name: str, tree: ast.Module) -> Iterator[str]:
    """What module ``name`` (parsed as ``tree``) reaches of other modules' private state."""
    own = _own_names(tree)
    imported = _imported_classes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != name:
            for alias in node.names:
                if _private(alias.name):
                    yield f"{name}:{node.lineno} imports {alias.name} from {node.module}"
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            yield f"{name}:{node.lineno} reads {ast.unparse(node)}, not its own"
        elif isinstance(node, ast.ClassDef):
            yield from _overrides(name, node, imported)


def _overrides(
    name: str, node: ast.ClassDef, imported: dict[str, tuple[str, str]]
) -> Iterator[str]:
    mine = {item.name for item in node.body
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}  # fmt: skip
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in imported:
            module, cls = imported[base.id]
            for method in sorted(mine & _private_methods(module, cls)):
                yield f"{name}:{node.lineno} {node.name} overrides {cls}.{method} ({module})"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_reads_another_modules_private_state(name: str) -> None:
    found = list(violations(name, _tree(name)))
    assert not found, "\n".join(found)


def test_the_checker_sees_each_kind_of_reach() -> None:
    """The three rules on a probe module (so a checker that finds nothing cannot pass),
    its base a real storage class with a private method."""
    module, cls, method = next(
        (module, node.name, item.name)
        for module in _modules() for node in _tree(module).body if isinstance(node, ast.ClassDef)
        for item in node.body
        if isinstance(item, ast.FunctionDef) and _private(item.name) and item.name != "_"
    )  # fmt: skip
    probe = ast.parse(
        f"from {module} import {cls}, _hidden\n"
        f"class Mine({cls}):\n"
        "    def __init__(self, other):\n"
        "        self._mine = 1\n"
        "        other._theirs\n"
        "        self._mine\n"
        f"    def {method}(self):\n"
        "        pass\n"
    )
    found = list(violations("probe", probe))
    assert any("imports _hidden" in line for line in found), found
    assert any("reads other._theirs" in line for line in found), found
    assert any(f"overrides {cls}.{method}" in line for line in found), found
    assert not any("self._mine" in line for line in found), found
