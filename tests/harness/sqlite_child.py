"""A process the SQLite journal's crash tests SIGKILL:
``python -m tests.harness.sqlite_child DIR MODE``.

``loop``: three zones append concurrently, forever; after each append returns it prints
``ACK <zone> <seq>`` (so the parent knows exactly what was acknowledged). Checkpoints are
frequent (a tiny ``checkpoint_bytes``), so a kill also lands in the middle of one.

``hold``: open the journal, print ``LOCKED``, and wait until stdin closes.

``full``: append to ``pjm`` until a write fails because the process may not grow a
file any further (``RLIMIT_FSIZE``: a full disk without a small file system to mount),
printing ``ACK`` for each success and ``FULL <seq> <error>`` for the failure, then the
failed seq again once the limit is lifted (as a store rolls back), ``HEALED``, and exit.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys

from pricehub.storage.base import StoredPrice
from pricehub.storage.sqlite_journal import DiskError, SqliteJournal
from tests.harness.journal_child import HISTORY_SIZE, ZONES, payload, say

FULL_LIMIT = 256 * 1024  # bytes a file may grow to in ``full`` mode


async def append_forever(journal: SqliteJournal, zone: str, seq: int) -> None:
    while True:
        seq += 1
        await journal.append([StoredPrice(zone, seq, payload(zone, seq))])
        say(f"ACK {zone} {seq}")


def padded(seq: int) -> StoredPrice:
    return StoredPrice("pjm", seq, payload("pjm", seq)[:-1] + b',"pad":"' + b"x" * 500 + b'"}')


async def until_full(journal: SqliteJournal) -> None:
    await journal.append([padded(1)])
    say("ACK pjm 1")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_LIMIT, hard))
    seq = 2
    try:
        while seq < 10_000:
            await journal.append([padded(seq)])
            say(f"ACK pjm {seq}")
            seq += 1
    except DiskError as error:
        say(f"FULL {seq} {str(error).replace(chr(10), ' ')}")
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    for again in range(seq, seq + 3):
        await journal.append([padded(again)])
        say(f"ACK pjm {again}")
    say(f"HEALED {journal.stats().last_error}")
    await journal.close()


async def main(directory: str, mode: str) -> None:
    journal, recovered = SqliteJournal.open(
        directory,
        history_size=1000 if mode == "full" else HISTORY_SIZE,
        checkpoint_bytes=10**9 if mode == "full" else 32 * 1024,
    )
    if mode == "hold":
        say("LOCKED")
        await asyncio.to_thread(sys.stdin.read)
        await journal.close()
        return
    if mode == "full":
        await until_full(journal)
        return
    say(f"OPEN {recovered.epoch} pid={os.getpid()}")
    starts = {zone: recovered.zones[zone].seq if zone in recovered.zones else 0 for zone in ZONES}
    await asyncio.gather(*(append_forever(journal, zone, starts[zone]) for zone in ZONES))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
