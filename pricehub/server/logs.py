"""Logging, configured once at start: structlog for pricehub and aiohttp alike.

JSON lines off a TTY (for log shippers), a console renderer on one (for people). Every
record, structlog's or the stdlib's (aiohttp's server errors, the access log, Python
warnings), goes through one processor chain, so every line has ``timestamp``,
``level``, ``logger`` and ``event`` and the same redaction.

Secrets never reach the output. Two layers, because a secret can hide in a field name
or inside a message: fields named like credentials are replaced outright, and every
string value (exception text included) is scrubbed of subscriber tokens in URLs
(``token=...``), bearer credentials, anything shaped like a JWT and URL passwords
(``redis://:password@host``).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import orjson
import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from pricehub.wire import paths

__all__ = [
    "QUIET_PATHS", "REDACTED", "AccessLogger", "configure_logging", "redact_secrets",
    "redact_text", "safe_path",
]

REDACTED = "[redacted]"
SECRET_KEYS = frozenset(
    {"token", "authorization", "publish_key", "jwt_secret", "password", "api_key", "secret"}
)
# Scraped every few seconds: logged at debug so they do not drown the INFO stream.
QUIET_PATHS = frozenset({paths.METRICS, paths.HEALTH})
SECRET_PATTERNS = (
    (re.compile(r"([?&;]token=)[^&;#\s'\"]+", re.IGNORECASE), rf"\1{REDACTED}"),
    (re.compile(r"(bearer\s+)[^\s'\",;]+", re.IGNORECASE), rf"\1{REDACTED}"),
    # header.payload.signature of a JWT; the header always starts with '{"' = 'eyJ'.
    (re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*"), REDACTED),
    # The password of a URL's userinfo (redis://user:password@host).
    (re.compile(r"(://[^:/@\s]*:)[^@/\s]+@"), rf"\1{REDACTED}@"),
)


def redact_text(text: str) -> str:
    """``text`` with subscriber tokens, bearer credentials and JWTs replaced."""
    for pattern, replacement in SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            key: REDACTED if str(key).lower() in SECRET_KEYS else _redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(item) for item in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """structlog processor: run last before rendering, after exceptions became text."""
    redacted: structlog.typing.EventDict = _redact(event_dict)
    return redacted


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(
    *, log_format: str | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging (aiohttp's) through one renderer.

    :param log_format: ``"json"``, ``"console"`` or None (default): console when
        ``stream`` is a TTY, JSON otherwise.
    :param level: minimum level, ``"info"`` by default.
    :param stream: where lines go; ``sys.stderr`` by default.
    """
    stream = stream or sys.stderr
    use_json = (log_format or ("console" if stream.isatty() else "json")) == "json"
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if use_json
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # Not cached: a module-level logger first used before this call (an import-time
        # log line, a test) would otherwise keep the old pipeline for good. Log volume
        # is per connection, not per message, so the lookup costs nothing that matters.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # Python warnings (a library's deprecation, PyJWT's short-key notice) would otherwise
    # be printed raw to stderr, breaking the one-JSON-object-per-line stream.
    logging.captureWarnings(True)


def safe_path(request: web.BaseRequest) -> str:
    """The request path and query, with any ``token`` query value redacted."""
    if "token" not in request.query:
        return request.path_qs
    query = [(key, REDACTED if key == "token" else value) for key, value in request.query.items()]
    return str(request.rel_url.with_query(query))


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log as structured events, through the same pipeline.

    A WebSocket's line is written when the socket ends, so its ``duration_s`` is the
    connection's lifetime and its ``status`` 101.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        quiet = request.path in QUIET_PATHS and response.status < 400
        structlog.get_logger("pricehub.access").log(
            logging.DEBUG if quiet else logging.INFO,
            "http_request",
            method=request.method,
            path=safe_path(request),
            status=response.status,
            bytes=response.body_length,
            duration_s=round(time, 4),
            remote=request.remote,
            user_agent=request.headers.get("User-Agent"),
        )
