"""The data dir a journal lives in, whichever engine writes it: its lock, a durable
directory update, and what a journal's recovery and its records are (issue 27).

``LOCK`` is flock'd by the one process using the directory and holds its PID and host, so
a second one gets the one-line "in use by pid ... on ..." error (``JournalLocked``); the
lock file is never followed through a symlink and must be a regular file. The SQLite
journal (``sqlite_journal``) and the old journal it migrates from (``legacy``) share it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from pricehub.storage.base import StoredPrice
from pricehub.storage.errors import JournalLocked, JournalUnavailable

__all__ = [
    "LOCK_NAME",
    "EpochRecord",
    "Recovered",
    "RecoveredZone",
    "ResetRecord",
    "acquire_lock",
    "fsync_dir",
]

LOCK_NAME = "LOCK"


@dataclass(frozen=True, slots=True)
class RecoveredZone:
    """One zone as the journal holds it: its last seq and retained prices, oldest first."""

    seq: int
    prices: tuple[StoredPrice, ...]


@dataclass(frozen=True, slots=True)
class Recovered:
    """What a journal's ``open`` found.

    ``epoch`` is the epoch to use: the recovered one, or the caller's ``new_epoch`` when
    ``fresh_reason`` is set (``"new data dir"``, or where the damage was and what was
    moved aside). ``zones`` is what to serve, damage or not: after damage, what came
    before it. ``torn_bytes`` is how much torn tail was cut off.
    """

    epoch: str
    zones: dict[str, RecoveredZone]
    fresh_reason: str | None
    torn_bytes: int = 0

    @property
    def recovered(self) -> bool:
        return self.fresh_reason is None


# --- what a journal records besides prices -------------------------------------------------


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """The data's lineage changes to ``epoch``."""

    epoch: str


@dataclass(frozen=True, slots=True)
class ResetRecord:
    """Zone ``zone`` restarts at ``seq`` holding ``prices`` (a resync, a new lineage)."""

    zone: str
    seq: int
    prices: tuple[StoredPrice, ...]


# --- the directory --------------------------------------------------------------------------


def fsync_dir(directory: Path) -> None:
    """Make renames, creations and deletions in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _holder(fd: int) -> tuple[int | None, str | None]:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace")
    except OSError:
        return None, None
    fields: dict[str, str] = {}
    for part in text.split():
        key, _, value = part.partition("=")
        fields[key] = value
    pid = fields.get("pid", "")
    return (int(pid) if pid.isdigit() else None), fields.get("host")


def _open_lock_file(directory: Path) -> int:
    """The lock file, created if missing. Never through a symlink (the lock is
    truncated and written: a ``LOCK`` pointing elsewhere would overwrite its target),
    and only a regular file (a FIFO or device there is refused, not written to)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, flags, 0o644)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ELOOP:
            reason = f"{LOCK_NAME} is a symbolic link (refusing to follow it)"
        raise JournalUnavailable(f"data dir {directory} cannot be used: {reason}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise JournalUnavailable(
            f"data dir {directory} cannot be used: {LOCK_NAME} is not a regular file"
        )
    return fd


def acquire_lock(directory: Path) -> int:
    """Lock ``directory`` (created if missing) for this process; the lock's fd, to keep
    open as long as the directory is used (closing it releases the lock).

    :raises JournalLocked: another process holds it.
    :raises JournalUnavailable: it cannot be created, locked or written.
    """
    fd = _open_lock_file(directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, host = _holder(fd)
        os.close(fd)
        raise JournalLocked(directory, pid, host) from None
    except OSError as exc:
        os.close(fd)
        raise JournalUnavailable(f"data dir {directory} cannot be locked: {exc}") from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise JournalUnavailable(
            f"data dir {directory} is not writable: {exc.strerror or exc}"
        ) from exc
    return fd
