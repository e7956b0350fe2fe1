"""Runs a session's jobs against the real socket, storage and fan-out.

``Session`` (``session.py``) decides; this module only performs its effects, one job at
a time per socket (the handler awaits each job before reading the next frame, so a
client's requests are answered in order and never concurrently).

``Drain`` is where pacing happens: the job waits until what the socket has not sent
(its outbox, pricehub's transport buffer and the kernel's send queue) is at most the
low-water mark, half of ``--send-high-water``. asyncio has no event for "the kernel's
queue shrank", so the wait polls, backing off from ``DRAIN_POLL_MIN`` to
``DRAIN_POLL_MAX`` while nothing moves: a socket that never reads costs a few wake-ups a
second and nothing else. Every ``Drain`` yields to the event loop at least once, so one
socket's replay never holds the loop for more than one chunk.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.fanout.connection import Connection
from pricehub.server.policy.resume import ZoneStream
from pricehub.server.stats import Stats
from pricehub.server.subscriber.session import (
    Attach,
    Close,
    Detach,
    Drain,
    Hold,
    Job,
    Pong,
    ReadHistory,
    ReadLatest,
    ReadRange,
    ReadSince,
    ReadSnapshot,
    Retained,
    Send,
    SendError,
)
from pricehub.storage import Storage

__all__ = ["DRAIN_POLL_MAX", "DRAIN_POLL_MIN", "Driver"]

DRAIN_POLL_MIN = 0.002  # seconds: a client that reads gets its next chunk this soon
DRAIN_POLL_MAX = 0.25  # seconds: a client that stopped reading is looked at this often


class Driver:
    """Performs the effects of one socket's session."""

    __slots__ = ("broadcaster", "connection", "low_water", "stats", "storage")

    def __init__(
        self,
        connection: Connection,
        *,
        storage: Storage,
        broadcaster: Broadcaster,
        stats: Stats,
    ) -> None:
        self.connection = connection
        self.storage = storage
        self.broadcaster = broadcaster
        self.stats = stats
        self.low_water = connection.limits.high_water // 2

    async def run(self, job: Job) -> None:
        """Perform every effect of ``job``; stop early when the socket closes.

        While it runs the connection is ``busy``: it joins no audience (opening N zones
        would otherwise make and unmake an audience of every zone opened so far, once
        per zone: O(N²)), and the reaper counts what it consumes as a sign of life."""
        connection = self.connection
        answer: Any = None
        connection.busy, connection.consumed_mark = True, None
        try:
            while True:
                try:
                    effect = job.send(answer)
                except StopIteration:
                    return
                answer = None
                if isinstance(effect, Send):  # by far the most frequent: first
                    connection.send(effect.payload, zone=effect.zone, seq=effect.seq)
                elif isinstance(effect, SendError):
                    self.stats.protocol_errors[effect.code] += 1
                    connection.send(effect.payload)
                elif isinstance(effect, Drain):
                    if not await self.drained():
                        return
                elif isinstance(effect, Close):
                    await self.broadcaster.close_now(
                        connection, effect.code, effect.message, reason=effect.reason
                    )
                    return
                else:
                    answer = await self.perform(effect)
                    if connection.closing:
                        return  # closed by someone else while we waited
        finally:
            job.close()
            connection.busy = False
            self.broadcaster.offer(connection)  # in step now, it may join its audience

    async def perform(
        self,
        effect: Pong | Attach | Detach | ReadLatest | ReadHistory | ReadSince | ReadSnapshot
        | ReadRange | Hold,
    ) -> Any:
        connection, broadcaster, storage = self.connection, self.broadcaster, self.storage
        match effect:
            case Pong(data):
                await connection.pong(data)
            case Attach(stream):
                broadcaster.unsubscribe(stream.zone, connection)
                connection.streams[stream.zone] = stream
                broadcaster.subscribe(stream.zone, connection)
            case Detach(zone):
                broadcaster.unsubscribe(zone, connection)
            case ReadLatest(zone):
                return await storage.latest(zone)
            case ReadHistory(zone, limit):
                return await storage.history(zone, limit=limit)
            case ReadSince(zone, seq):
                epoch = storage.epoch  # before the read: a change during it shows as a gap
                return Retained(epoch, await storage.since(zone, seq))
            case ReadSnapshot(zones):
                return await storage.snapshot(zones)
            case ReadRange(zones, start, end, limit):
                return await storage.history_between(zones, start, end, limit=limit)
            case Hold(streams):
                self.hold(streams)
        return None

    def hold(self, streams: tuple[ZoneStream, ...]) -> None:
        """``Hold``: out of its audience (whose shared writes would not stop for a syncing
        stream), then each stream syncing; all in one step, so no update slips between."""
        connection = self.connection
        self.broadcaster.detach(connection)
        conflated = connection.conflated
        for stream in streams:
            kept = None if conflated is None else conflated.pop(stream.zone, None)
            if kept is not None:
                # Kept for a slow reader and not sent: held like what comes next, and the
                # stream back at the seq the client was last sent.
                stream.last_seq = connection.conflated_from.pop(stream.zone, stream.last_seq)
                stream.held.append(kept)
            stream.syncing = True

    async def drained(self) -> bool:
        """Wait until the socket's unsent bytes are at most ``low_water``; False if it
        closes meanwhile. (That the client is alive meanwhile, its own frames unread
        behind the job, the heartbeat reaper learns from what it consumes: ``busy``.)"""
        connection = self.connection
        await asyncio.sleep(0)  # others run between two chunks, and the outbox is flushed
        delay = DRAIN_POLL_MIN
        received = connection.bytes_received()
        while not self.closed() and connection.unsent() > self.low_water:
            await asyncio.sleep(delay)
            now_received = connection.bytes_received()
            # Back off while nothing moves; a client that reads gets its next chunk soon.
            delay = DRAIN_POLL_MIN if now_received > received else min(2 * delay, DRAIN_POLL_MAX)
            received = now_received
        return not self.closed()

    def closed(self) -> bool:
        return self.connection.closing or self.connection.transport.is_closing()
