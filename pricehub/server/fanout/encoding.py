"""Encodings: how one kind of connection frames what the fan-out sends it.

The broadcaster never learns a transport's name or framing (as centrifuge's hub keys its
prepared data by an encoding key, not by transport). Each transport registers its
encodings (``Broadcaster.register``): the WebSocket a plain and a deflated text frame,
SSE an event. The broadcaster counts subscribers per (zone, encoding), builds a price's
bytes once per encoding present among the zone's subscribers, and groups connections in
audiences per (zones, encoding). An encoding says three things:

* ``frame``: a whole message for many connections at once (``send_all``, ``send_zone``);
* ``price``: a live price's shared bytes (SSE: the event without its ``id:`` line, which
  each stream or audience adds from its own cursor);
* ``audience_framer``: the per-audience state that turns a tick's shared prices into the
  audience's frames (SSE: the ``id:`` cursor), and ``wrap``, what one transport write of
  joined frames becomes (SSE: an HTTP/1.1 chunk).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

__all__ = ["AudienceFramer", "Encoding", "FramedEncoding", "JoinedFrames", "TickFrame"]

# One accepted price of the current tick as an audience holds it: zone, seq, and the
# price's bytes in the audience's encoding (built once per encoding, for every audience).
TickFrame = tuple[str, int, bytes]


class AudienceFramer(Protocol):
    """An audience's framing state for its encoding."""

    def share(self, pending: list[TickFrame]) -> list[bytes]:
        """The audience's frames for ``pending``, in order; pure (``commit`` moves on)."""
        ...

    def commit(self, last_seq: Mapping[str, int]) -> None:
        """After the tick's shared write: every zone is at its last broadcast seq."""
        ...


class Encoding(Protocol):
    """One way of framing messages; connections that share it can share bytes.

    :ivar name: the audience key (``ws``, ``ws+deflate``, ``sse``).
    :ivar transport: the label of its transport (``fanout.lag.TRANSPORTS``): the delivery
        lag histogram and the open connections are counted per transport.
    """

    name: str
    transport: str

    def frame(self, payload: bytes) -> bytes:
        """One server message (not a price) framed for every connection of this encoding."""
        ...

    def price(self, payload: bytes) -> bytes:
        """A live ``price_update``'s shared bytes."""
        ...

    def wrap(self, data: bytes) -> bytes:
        """What one transport write of joined frames is."""
        ...

    def audience_framer(
        self, zones: frozenset[str], *, last_seq: Mapping[str, int], epoch: str
    ) -> AudienceFramer:
        """The framing state of a new audience on ``zones``, in step at ``last_seq``."""
        ...


class JoinedFrames:
    """The framer of encodings whose price bytes are complete frames: an audience's share
    is its prices' bytes as they are (stateless: one instance serves every audience)."""

    __slots__ = ()

    def share(self, pending: list[TickFrame]) -> list[bytes]:
        return [frame for _zone, _seq, frame in pending]

    def commit(self, last_seq: Mapping[str, int]) -> None:
        return None


_JOINED = JoinedFrames()


class FramedEncoding:
    """The common case, for a transport to subclass with its ``frame`` and ``price``:
    a price's bytes are a complete frame, shared by an audience as they are
    (``JoinedFrames``), and a write needs no framing of its own."""

    __slots__ = ("name", "transport")

    def __init__(self, name: str, *, transport: str) -> None:
        self.name = name
        self.transport = transport

    def frame(self, payload: bytes) -> bytes:
        raise NotImplementedError

    def price(self, payload: bytes) -> bytes:
        return self.frame(payload)

    def wrap(self, data: bytes) -> bytes:
        return data

    def audience_framer(
        self, zones: frozenset[str], *, last_seq: Mapping[str, int], epoch: str
    ) -> AudienceFramer:
        return _JOINED

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
