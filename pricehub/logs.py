"""Logging, configured once at start: structlog for pricehub and aiohttp alike.

JSON lines off a TTY (for log shippers), a console renderer on one (for people). Secrets
never reach the output: keys named like credentials are redacted by a processor, and
the access log strips the ``token`` query parameter from paths.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

__all__ = ["AccessLogger", "configure_logging", "redact_secrets", "safe_path"]

SECRET_KEYS = frozenset(
    {"token", "authorization", "publish_key", "jwt_secret", "password", "api_key", "secret"}
)


def redact_secrets(
    _logger: Any, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    for key in event_dict.keys() & SECRET_KEYS:
        event_dict[key] = "[redacted]"
    return event_dict


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(
    *, log_format: str | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging (aiohttp's) through one renderer."""
    stream = stream or sys.stderr
    use_json = (log_format or ("console" if stream.isatty() else "json")) == "json"
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
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
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.processors.format_exc_info],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())


def safe_path(request: web.BaseRequest) -> str:
    """The request path with any ``token`` query value removed."""
    if "token" not in request.query:
        return request.path_qs
    query = [(k, "[redacted]" if k == "token" else v) for k, v in request.query.items()]
    return request.path + "?" + "&".join(f"{k}={v}" for k, v in query)


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log as structured events, through the same pipeline."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        structlog.get_logger("pricehub.access").info(
            "http_request",
            method=request.method,
            path=safe_path(request),
            status=response.status,
            bytes=response.body_length,
            duration_s=round(time, 4),
            remote=request.remote,
        )
