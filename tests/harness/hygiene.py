"""What a test run may not leave behind (checked once per session by tests/conftest.py).

The suite writes only under pytest's tmp dirs. Two places it used to write to are
checked after every run:

* ``data/`` in the checkout: the default ``--data-dir`` of a server started there. A
  journal left in it is replayed into whatever Redis a later real start is given.
* ``pricehub-*`` entries in the system temp dir: server logs and redis-server
  directories the process harnesses made there before they moved to ``scratch_dir``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Footprint"]

TEMP_PREFIX = "pricehub-"


def _tree(directory: Path) -> dict[str, tuple[int, int]] | None:
    """Every entry under ``directory`` with its (size, mtime in ns); None if absent."""
    if not directory.exists():
        return None
    return {
        str(path.relative_to(directory)): (path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in directory.rglob("*")
    }


def _ours(temp_dir: Path) -> set[str]:
    return {path.name for path in temp_dir.glob(TEMP_PREFIX + "*")}


@dataclass(frozen=True)
class Footprint:
    """The state of both places at one moment; ``changes_since`` says what a run did."""

    data_dir: Path
    temp_dir: Path
    data: dict[str, tuple[int, int]] | None
    temp_entries: frozenset[str]

    @classmethod
    def take(cls, data_dir: Path, temp_dir: Path | None = None) -> Footprint:
        temp = Path(tempfile.gettempdir()) if temp_dir is None else temp_dir
        return cls(data_dir, temp, _tree(data_dir), frozenset(_ours(temp)))

    def changes_since(self, before: Footprint) -> list[str]:
        """One sentence per thing the run left behind (empty: nothing)."""
        problems = []
        if before.data is None and self.data is not None:
            problems.append(f"{self.data_dir} was created: {sorted(self.data)[:10]}")
        elif before.data is not None and self.data != before.data:
            changed = sorted(
                name for name in {*before.data, *(self.data or {})}
                if before.data.get(name) != (self.data or {}).get(name)
            )  # fmt: skip
            problems.append(f"{self.data_dir} was changed: {changed[:10] or ['(removed)']}")
        left = sorted(self.temp_entries - before.temp_entries)
        if left:
            problems.append(f"left in {self.temp_dir}: {left[:10]} ({len(left)} in all)")
        return problems
