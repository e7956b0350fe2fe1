"""The wire contract (``PROTOCOL.md``) as pure code: messages, codes, paths, errors.

No I/O and no aiohttp here: the server, the clients and the tests all import it, and
it is the only place a close code, an error code, a path or a message name is spelled.
"""

from pricehub.wire import codes, errors, messages, paths
from pricehub.wire.codes import NO_RETRY_CLOSE_CODES, CloseCode, DisconnectReason, ErrorCode

__all__ = [
    "NO_RETRY_CLOSE_CODES", "CloseCode", "DisconnectReason", "ErrorCode", "codes", "errors",
    "messages", "paths",
]
