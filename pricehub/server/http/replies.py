"""JSON replies shared by every HTTP endpoint: ``{"error", "message", ...}`` bodies."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from pricehub.wire.codes import HttpErrorCode

__all__ = ["json_error", "json_response"]


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def json_error(
    status: int, code: HttpErrorCode, message: str, *, headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    return json_response(
        {"error": code, "message": message, **extra}, status=status, headers=headers
    )
