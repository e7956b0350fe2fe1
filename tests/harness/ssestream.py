"""A minimal, strict ``text/event-stream`` reader for tests (no SSE client library: the
tests check the exact lines pricehub writes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

__all__ = ["Event", "EventStream"]


@dataclass(slots=True)
class Event:
    """One dispatched event: its type, decoded JSON data, ``id:`` (None without one)."""

    type: str
    data: Any
    id: str | None


@dataclass(slots=True)
class EventStream:
    """Reads events (and counts comments) from an SSE response, with deadlines."""

    response: aiohttp.ClientResponse
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    last_id: str | None = None

    async def next(self, *, timeout: float = 10.0) -> Event:
        """The next event; raises ``EOFError`` at the end of the stream."""
        kind, data, event_id = "message", "", None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("event stream ended")
                line = raw.decode().rstrip("\n")
                if line == "":
                    if data:
                        if event_id is not None:
                            self.last_id = event_id
                        return Event(kind, orjson.loads(data), event_id)
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    self.comments.append(value)
                elif name == "event":
                    kind = value
                elif name == "data":
                    data = value if not data else data + "\n" + value
                elif name == "id":
                    event_id = value
                elif name == "retry":
                    self.retry = int(value)

    async def comment(self, *, timeout: float = 10.0) -> str:
        """Read up to the next comment line (``: ping``) and return its text."""
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("event stream ended")
                if raw.startswith(b":"):
                    text = raw.decode().rstrip("\n")[1:].removeprefix(" ")
                    self.comments.append(text)
                    return text

    async def until(self, predicate: Any, *, timeout: float = 10.0) -> list[Event]:
        """Every event up to and including the first one matching ``predicate``."""
        seen: list[Event] = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next(timeout=timeout)
                seen.append(event)
                if predicate(event):
                    return seen
