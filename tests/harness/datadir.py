"""What a data dir holds, read from outside as an operator would (``sqlite3`` on
``pricehub.db``, read-only, while the server may still have it open)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import struct
from pathlib import Path
from typing import Any

__all__ = ["DB_NAME", "contents", "journaled_seq", "owner_meta", "owner_meta_text", "wal_frame"]

DB_NAME = "pricehub.db"


def _read(data_dir: Path, query: str, *params: object) -> list[tuple[Any, ...]]:
    path = data_dir / DB_NAME
    if not path.exists():
        raise FileNotFoundError(path)
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
        return conn.execute(query, params).fetchall()


def contents(data_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table: what the journal holds, whatever its files' bytes (a
    close checkpoints the WAL into the database: the bytes change, the rows do not)."""
    return {table: sorted(_read(data_dir, f"SELECT * FROM {table}"), key=repr)
            for table in ("meta", "zones", "runs")}  # fmt: skip


def journaled_seq(data_dir: Path, zone: str) -> int:
    """The last seq of ``zone`` on disk (0: none), as the journal reckons it: its newest
    run's last seq, or the ``zones`` seq when a rule set one higher."""
    (run,) = _read(data_dir, "SELECT max(last) FROM runs WHERE zone = ?", zone)
    (seq,) = _read(data_dir, "SELECT max(seq) FROM zones WHERE zone = ?", zone)
    return max(run[0] or 0, seq[0] or 0)


def owner_meta(data_dir: Path) -> dict[str, Any]:
    """The owner's meta (the failover's record of the feed it mirrors: ``feed_id``,
    ``peers``, ...); ``{}`` when there is none yet. Raises if there is no database."""
    rows = _read(data_dir, "SELECT value FROM meta WHERE key = 'owner'")
    meta: dict[str, Any] = json.loads(rows[0][0]) if rows else {}
    return meta


def owner_meta_text(data_dir: Path) -> str:
    """The owner's meta as stored (to check what it does not contain)."""
    return json.dumps(owner_meta(data_dir))


def wal_frame(wal: Path, *, commit: bool) -> bytes:
    """A frame of ``wal``'s current generation (its salts) whose checksum fails: what
    the transaction in flight at a crash leaves, torn."""
    header = wal.read_bytes()[:32]
    page_size, salt1, salt2 = struct.unpack(">I", header[8:12])[0], header[16:20], header[20:24]
    size = struct.pack(">I", 9 if commit else 0)
    return struct.pack(">I", 2) + size + salt1 + salt2 + b"\0" * 8 + os.urandom(page_size)
