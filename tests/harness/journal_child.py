"""A process the journal crash tests SIGKILL: ``python -m tests.harness.journal_child DIR MODE``.

``loop``: three zones append concurrently, forever; after each append returns it prints
``ACK <zone> <seq>`` (so the parent knows exactly what was acknowledged). Snapshots are
frequent (small history, low compaction factor).

``before-rename`` / ``after-rename``: the same, but the first snapshot stops for good at
that step (its thread blocks) after printing ``SNAPSHOT <step>``, while appends go on:
the parent kills the process in the middle of a compaction.

``hold``: open the journal, print ``LOCKED``, and wait until stdin closes.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

from pricehub.storage.base import StoredPrice
from pricehub.storage.legacy.journal import Journal

HISTORY_SIZE = 40
ZONES = ("pjm", "caiso", "ercot")


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: no interleaving


def payload(zone: str, seq: int) -> bytes:
    return f'{{"zone":"{zone}","seq":{seq},"price":{seq * 1.5}}}'.encode()


class StallingJournal(Journal):
    """Blocks the first snapshot's thread at ``stall`` (never returns)."""

    stall = ""

    def _publish_snapshot(self, temp: Path, final: Path) -> None:
        if self.stall == "before-rename":
            self._block("before-rename")
        super()._publish_snapshot(temp, final)

    def _drop_obsolete(self, number: int) -> list[str]:
        if self.stall == "after-rename":
            self._block("after-rename")
        return super()._drop_obsolete(number)

    def _block(self, step: str) -> None:
        say(f"SNAPSHOT {step}")
        threading.Event().wait()


async def append_forever(journal: Journal, zone: str, seq: int) -> None:
    while True:
        seq += 1
        await journal.append([StoredPrice(zone, seq, payload(zone, seq))])
        say(f"ACK {zone} {seq}")


async def main(directory: str, mode: str) -> None:
    StallingJournal.stall = mode
    journal, recovered = StallingJournal.open(
        directory, history_size=HISTORY_SIZE, compact_factor=2.0, compact_min_records=0
    )
    if mode == "hold":
        say("LOCKED")
        await asyncio.to_thread(sys.stdin.read)
        await journal.close()
        return
    say(f"OPEN {recovered.epoch}")
    starts = {zone: recovered.zones[zone].seq if zone in recovered.zones else 0 for zone in ZONES}
    await asyncio.gather(*(append_forever(journal, zone, starts[zone]) for zone in ZONES))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
