"""Incremental ``text/event-stream`` parser (the WHATWG rules pricehub's SSE feed uses).

Sans-I/O: feed it the lines of the response body (without their line ending) and it returns
an ``SseEvent`` on every blank line that ends an event. ``: ping`` comments and ``retry:``
lines produce no event; ``comments`` counts the former so a caller can treat them as signs of
life. ``last_event_id`` keeps the latest ``id:`` (it persists across events, as in browsers):
it is the cursor to send back as ``Last-Event-ID`` when reconnecting.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_EVENT_CHARS", "SseEvent", "SseParser"]

#: Largest event data kept, in characters. pricehub's events are single JSON messages of a
#: few hundred bytes; a bigger one is dropped (with its fields) instead of growing memory.
MAX_EVENT_CHARS = 1 << 20


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event: ``event`` (``"message"`` when absent), joined ``data`` and the
    ``id`` in force when it was dispatched (None before any ``id:`` line)."""

    event: str
    data: str
    id: str | None


class SseParser:
    """Turns lines into events; one instance per HTTP response."""

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self.comments = 0
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self._oversized = False

    def feed_line(self, line: str) -> SseEvent | None:
        """Process one line (its ``\\r``/``\\n`` ending removed); returns a finished event."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(value) + 1
            if self._size > MAX_EVENT_CHARS:
                self._oversized = True
                self._data.clear()
            elif not self._oversized:
                self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:  # the spec ignores such ids
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None  # unknown fields are ignored, as the spec says

    def _dispatch(self) -> SseEvent | None:
        data, event, oversized = self._data, self._event, self._oversized
        self._data, self._event, self._size, self._oversized = [], "", 0, False
        if oversized or not data:
            return None
        return SseEvent(event or "message", "\n".join(data), self.last_event_id)
