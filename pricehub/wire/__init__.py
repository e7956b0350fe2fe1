"""The wire contract (``PROTOCOL.md``) as pure code: messages, codes, paths, errors.

No I/O and no aiohttp here: the server, the clients and the tests all import it, and
it is the only place a close code, an error code, a path or a message name is spelled.
Both directions: ``messages`` builds what the server sends and reads what clients send,
``decode`` reads what the server sends (the Python client's side).
"""

from pricehub.wire import codes, decode, errors, messages, paths
from pricehub.wire.codes import (
    NO_RETRY_CLOSE_CODES,
    Backend,
    CloseCode,
    DisconnectReason,
    ErrorCode,
    MessageType,
)

__all__ = [
    "NO_RETRY_CLOSE_CODES", "Backend", "CloseCode", "DisconnectReason", "ErrorCode",
    "MessageType", "codes", "decode", "errors", "messages", "paths",
]
