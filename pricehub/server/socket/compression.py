"""permessage-deflate (RFC 7692) for broadcasts: each message compressed once, for everyone.

A stock permessage-deflate server keeps one compressor per connection (about 256 KiB of
zlib state each) and compresses every message once per client. pricehub instead:

* negotiates ``server_no_context_takeover`` with every client (RFC 7692 7.1.1.1 lets a
  server add it unasked), so no message may refer to an earlier one;
* compresses each message with ONE process-wide compressor, resetting its dictionary after
  every message (``Z_FULL_FLUSH``), so the compressed frame is independent of what any
  client saw before and the very same bytes can be written to every client that
  negotiated the extension;
* never lets aiohttp's own per-connection compressor run: pricehub writes its frames to
  the transport itself, and only control frames (never compressed) go through aiohttp.

Memory is therefore one compressor per process whatever the number of clients. The
receiving side (clients may compress what they send) is aiohttp's reader, which allocates
its inflate window lazily, only for clients that actually send compressed frames.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from aiohttp import hdrs, web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict

from pricehub.wire.messages import text_frame

__all__ = [
    "PER_CONNECTION_MIN",
    "WINDOW_BITS",
    "BroadcastWebSocketResponse",
    "Deflater",
    "negotiate",
]

# LZ77 window of the shared compressor. A client that asks for a smaller server window
# (server_max_window_bits < this) is served uncompressed frames instead.
WINDOW_BITS = 15
# Per-connection messages (history, errors, ...) are compressed only from this size:
# below it a deflate per client costs more CPU than the few bytes it saves.
PER_CONNECTION_MIN = 1024
DEFLATE_TRAILER = b"\x00\x00\xff\xff"  # RFC 7692 7.2.1: removed from every message
RSV1 = 0x40  # "this message is compressed"
EXTENSION = "permessage-deflate"
_FLAG_PARAMS = frozenset({"server_no_context_takeover", "client_no_context_takeover"})


class Deflater:
    """The process-wide permessage-deflate compressor (one per broadcaster).

    :param level: zlib level (default 1: messages are small JSON, speed matters more).
    :param mem_level: zlib memLevel (default 8); memory is about
        ``2**(WINDOW_BITS+2) + 2**(mem_level+9)`` bytes (256 KiB), once per process.
    :param per_connection_min: payload size from which ``Connection.send`` compresses.
    """

    def __init__(
        self,
        *,
        level: int = 1,
        mem_level: int = 8,
        per_connection_min: int = PER_CONNECTION_MIN,
    ) -> None:
        self.per_connection_min = per_connection_min
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, -WINDOW_BITS, mem_level)

    def frame(self, payload: bytes) -> bytes:
        """A complete text frame carrying ``payload``: compressed (RSV1 set), or plain when
        compressing does not make it smaller. Either is valid on a deflate connection."""
        compressor = self._compressor
        # Z_FULL_FLUSH ends the message on a byte boundary with the trailer AND resets
        # the dictionary, so the next message never refers back to this one.
        body = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
        body = body.removesuffix(DEFLATE_TRAILER)
        if len(body) >= len(payload):
            return text_frame(payload)
        plain = text_frame(body)
        return bytes((plain[0] | RSV1,)) + plain[1:]


def _parse_offer(offer: str) -> dict[str, str | None] | None:
    """The parameters of one ``permessage-deflate`` offer; None if it is another
    extension or malformed (a parameter repeated, or a value where none belongs)."""
    name, *raw_params = (part.strip() for part in offer.split(";"))
    if name.lower() != EXTENSION:
        return None
    params: dict[str, str | None] = {}
    for raw in raw_params:
        key, sep, value = raw.partition("=")
        key = key.strip().lower()
        if key in params:
            return None
        params[key] = value.strip().strip('"') if sep else None
    return params


def _window(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() and 8 <= int(value) <= 15 else None


def negotiate(header: str | None) -> str | None:
    """The ``Sec-WebSocket-Extensions`` answer to a client's offers, or None to decline.

    The first acceptable ``permessage-deflate`` offer wins. It is acceptable when every
    parameter is known and valid and any ``server_max_window_bits`` it asks for is at
    least ``WINDOW_BITS`` (the shared compressor serves everyone with one window).
    ``client_*`` parameters need no answer: aiohttp's reader inflates any client window.
    """
    for offer in (header or "").split(","):
        params = _parse_offer(offer)
        if params is None:
            continue
        answer = [EXTENSION, "server_no_context_takeover"]
        acceptable = True
        for key, value in params.items():
            if key in _FLAG_PARAMS:
                acceptable = value is None
            elif key == "client_max_window_bits":
                acceptable = value is None or _window(value) is not None
            elif key == "server_max_window_bits":
                asked = _window(value)
                acceptable = asked is not None and asked >= WINDOW_BITS
                answer.append(f"server_max_window_bits={WINDOW_BITS}")
            else:
                acceptable = False
            if not acceptable:
                break
        if acceptable:
            return "; ".join(answer)
    return None


class BroadcastWebSocketResponse(web.WebSocketResponse):
    """aiohttp's WebSocketResponse for sockets the broadcaster writes to directly: with
    pricehub's permessage-deflate negotiation, its close timeout readable, and a hook run
    before its close frame is sent (``before_close``: the connection stops taking frames
    and writes out what it has, so nothing can follow the close frame, whoever closes).

    With ``compress=True`` aiohttp would answer the offer itself (without
    ``server_no_context_takeover`` unless asked, and with whatever window the client
    wants); the answer is replaced by ``negotiate``'s. aiohttp still gets a non-zero
    ``compress`` when the extension is on, so its reader accepts and inflates the
    client's compressed frames.
    """

    deflate = False
    before_close: Callable[[int], None] | None = None
    # The code of the close frame pricehub sent first (None: the client closed first, or
    # not closed yet). aiohttp's ``close_code`` becomes the *client's* code once its
    # answer arrives (a client answers 1001 with 1000), so logs use this one.
    sent_close_code: int | None = None

    async def close(
        self, *, code: int = 1000, message: bytes = b"", drain: bool = True
    ) -> bool:
        hook, self.before_close = self.before_close, None
        if hook is not None:
            hook(code)
        if not self.closed and self.close_code is None and self.sent_close_code is None:
            self.sent_close_code = code
        return await super().close(code=code, message=message, drain=drain)

    @property
    def close_timeout(self) -> float:
        """The constructor's ``timeout`` (``--shutdown-grace``): how long a close may take."""
        # aiohttp keeps it private (``_timeout``); pinned by tests/test_ws.py's
        # aiohttp version guard, with ``_handshake`` below.
        return float(self._timeout)

    # PRIVATE aiohttp API: ``WebSocketResponse._handshake(request) -> (headers,
    # protocol, compress, notakeover)`` is not public, and no public hook lets a server
    # choose its own permessage-deflate answer. Written for setup.cfg's aiohttp range
    # (3.10+), verified on 3.14.5; a test
    # (tests/test_ws.py, test_aiohttp_private_api_is_what_compression_overrides) fails on
    # aiohttp 3.15+ or another signature, so an upgrade cannot silently break the handshake.
    def _handshake(self, request: BaseRequest) -> tuple[CIMultiDict[str], str | None, int, bool]:
        wanted = bool(self.compress)  # the constructor's ``compress`` until prepared
        headers, subprotocol, _compress, _notakeover = super()._handshake(request)
        headers.popall(hdrs.SEC_WEBSOCKET_EXTENSIONS, None)
        answer = negotiate(request.headers.get(hdrs.SEC_WEBSOCKET_EXTENSIONS)) if wanted else None
        self.deflate = answer is not None
        if answer is None:
            return headers, subprotocol, 0, False
        headers[hdrs.SEC_WEBSOCKET_EXTENSIONS] = answer
        return headers, subprotocol, WINDOW_BITS, True
