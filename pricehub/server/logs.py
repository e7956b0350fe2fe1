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
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from pricehub.wire import paths

__all__ = [
    "QUIET_PATHS", "REDACTED", "AccessLogger", "BadRequestFilter", "bad_request_reason",
    "configure_logging", "redact_secrets", "redact_text", "safe_path",
]

REDACTED = "[redacted]"
SECRET_KEYS = frozenset(
    {"token", "authorization", "publish_key", "jwt_secret", "password", "api_key", "secret"}
)
# Scraped every few seconds: logged at debug so they do not drown the INFO stream.
QUIET_PATHS = frozenset({paths.METRICS, paths.HEALTH})
# Query parameters whose value is a credential, wherever a URL is printed.
SECRET_QUERY = r"[\w.-]*(?:token|key|secret|password|passwd|pwd|auth)"
SECRET_PATTERNS = (
    (re.compile(rf"([?&;]{SECRET_QUERY}=)[^&;#\s'\"]+", re.IGNORECASE), rf"\1{REDACTED}"),
    # A whole credential header, however malformed (aiohttp's parse errors quote the
    # raw line: b'Authorization: Bearer\\x01 key').
    (
        re.compile(
            r"((?:proxy-)?authorization|cookie|x-api-key)(\s*[:=]\s*(?:bearer |basic )?)[^\n'\"]+",
            re.IGNORECASE,
        ),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"(bearer\s+)[^\s'\",;]+", re.IGNORECASE), rf"\1{REDACTED}"),
    # header.payload.signature of a JWT; the header always starts with '{"' = 'eyJ'.
    (re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*"), REDACTED),
    # The password of a URL's userinfo (redis://user:password@host), up to the last '@'
    # of the URL (a password may hold an unescaped '@').
    (re.compile(r"(://[^:/@\s'\"]*:)[^\s'\"]*@"), rf"\1{REDACTED}@"),
    # Userinfo without a ':' (redis://password@host: a password in the user slot).
    (re.compile(r"(://)[^:/@\s'\"]+@"), rf"\1{REDACTED}@"),
    # A mistyped URL (redis//:pw@host, redis:/:pw@host): anything between a ':' (not
    # a scheme's '://') and an '@' in one word is taken for a password.
    (re.compile(r":(?!//)[^\s'\"@]*@"), rf":{REDACTED}@"),
)


def redact_text(text: str) -> str:
    """``text`` with every credential replaced: subscriber tokens and keys in query
    strings, credential headers, bearer values, JWTs and URL passwords (mistyped URLs
    included). Used for every log line, and for whatever pricehub prints itself."""
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
    server_logger = logging.getLogger("aiohttp.server")
    for old in [f for f in server_logger.filters if isinstance(f, BadRequestFilter)]:
        server_logger.removeFilter(old)
    server_logger.addFilter(BadRequestFilter())


_SECRET_NAME = re.compile(SECRET_QUERY, re.IGNORECASE)


def safe_path(request: web.BaseRequest) -> str:
    """The request path and query, with credential query values (``token``, ``key``,
    ``api_key``, ...) redacted."""
    if not any(_SECRET_NAME.fullmatch(name) for name in request.query):
        return request.path_qs
    query = [
        (name, REDACTED if _SECRET_NAME.fullmatch(name) else value)
        for name, value in request.query.items()
    ]
    return str(request.rel_url.with_query(query))


class BadRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (malformed HTTP, a corrupt gzip body) at
    error level with a traceback, through ``aiohttp.server``. Anyone can send one, so
    that is log flooding and false alerts: it becomes one ``bad_http_request`` warning
    line (remote, reason; no traceback, no raw bytes). Real handler crashes pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        reason = bad_request_reason(record.exc_info[1] if record.exc_info else None)
        if reason is None:
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        structlog.get_logger("pricehub.http").warning(
            "bad_http_request", remote=remote, reason=reason
        )
        return False


def bad_request_reason(exc: BaseException | None) -> str | None:
    """The first line of the parse error behind ``exc`` (or its causes), else None."""
    for _ in range(8):  # a cause chain is short; the bound rules out a cycle
        if exc is None:
            return None
        if isinstance(exc, HttpProcessingError):
            return (exc.message.strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, RequestPayloadError):
            reason = bad_request_reason(exc.__cause__)
            return reason or type(exc).__name__
        exc = exc.__cause__ or exc.__context__
    return None


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
