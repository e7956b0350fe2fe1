"""Migrating a data dir of the old journal (``legacy.journal``) to ``sqlite_journal``.

A data dir that holds the old journal's files and no database is read once with the old
journal's own recovery (``Journal.open``: torn tails cut, damage handled as it always
was), which gives a ``Recovered`` and the owner's meta; ``sqlite_journal`` writes that
into a new database in one transaction under the same epoch, and only then are the old
files moved into ``legacy-journal/`` (never deleted), with one log line. A crash before
the database is in place finds the old files again and migrates again; one after it
finds the database and only moves the old files that are still there.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pricehub.storage.datadir import Recovered, fsync_dir
from pricehub.storage.legacy.journal import META_NAME, Journal

__all__ = ["LEGACY_DIR", "Legacy", "move_leftovers", "needs_migration", "read"]

LEGACY_DIR = "legacy-journal"
# What the old journal writes (segments, snapshots and their temp files, files it kept
# aside, its meta file): what is moved. Anything else in the directory stays.
_LEGACY = re.compile(
    r"(?:wal-[0-9]{12,20}\.log|snap-[0-9]{12,20}\.snap(?:\.tmp)?)(?:\.corrupt-.+)?"
    rf"|{re.escape(META_NAME)}(?:\.tmp)?"
)


@dataclass(frozen=True, slots=True)
class Legacy:
    """What the old journal held: what its recovery gave, and the owner's meta."""

    recovered: Recovered
    meta: dict[str, Any] | None

    @property
    def prices(self) -> int:
        return sum(len(zone.prices) for zone in self.recovered.zones.values())


def _legacy_names(directory: Path) -> list[str]:
    """The old journal's files: its exact names, as regular files (a directory or a
    symlink named like a segment, or an empty snapshot, was never one of its files; it
    stays where it is, as the old journal left it)."""
    return sorted(name for name in os.listdir(directory)
                  if _LEGACY.fullmatch(name) and _is_journal_file(directory / name))  # fmt: skip


def _is_journal_file(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and (info.st_size > 0 or ".snap" not in path.name)


def needs_migration(directory: Path, db_name: str) -> bool:
    """Whether ``directory`` holds the old journal's files and no database yet."""
    try:
        return not (directory / db_name).exists() and bool(_legacy_names(directory))
    except OSError:  # no such directory (yet), or not one: the lock says why
        return False


def read(directory: Path, *, history_size: int, new_epoch: str, log: Any) -> Legacy:
    """The old journal's recovery of ``directory`` (it takes and drops the lock).

    Run on a thread of its own with its own event loop (``Journal.close`` is a
    coroutine), so that this works whether or not the caller runs a loop.

    :raises JournalLocked: another process holds the directory.
    :raises JournalUnavailable: the directory cannot be read or written.
    """

    async def recover() -> Legacy:
        journal, recovered = Journal.open(
            directory, history_size=history_size, new_epoch=new_epoch, log=log
        )
        meta = journal.meta
        await journal.close()
        return Legacy(recovered, meta)

    with ThreadPoolExecutor(1, thread_name_prefix="journal-migration") as pool:
        return pool.submit(lambda: asyncio.run(recover())).result()


def move_leftovers(directory: Path, log: Any, *, migrated: Legacy | None) -> None:
    """Move the old journal's files into ``legacy-journal/`` (a name already there is
    never overwritten), durably; one log line. Call once the database holds them."""
    names = _legacy_names(directory)
    if not names:
        return
    target = directory / LEGACY_DIR
    target.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for name in names:
        destination = target / name
        if destination.exists():
            destination = target / f"{name}.{stamp}"
        os.replace(directory / name, destination)
    fsync_dir(target)
    fsync_dir(directory)
    if migrated is None:  # a migration interrupted after the database was in place
        log.warning("journal_legacy_files_moved", data_dir=str(directory),
                    moved_to=str(target), files=len(names))  # fmt: skip
        return
    log.warning(
        "journal_migrated_to_sqlite",
        data_dir=str(directory),
        moved_to=str(target),
        files=len(names),
        epoch=migrated.recovered.epoch,
        zones=len(migrated.recovered.zones),
        prices=migrated.prices,
    )
