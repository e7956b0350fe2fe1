"""``max_rate`` (PROTOCOL.md, "A rate the client chooses: max_rate"): pure.

A client may ask for at most ``max_rate`` ``price_update``s per second of a zone, on a
WebSocket or SSE URL (``?max_rate=4``) or in a ``subscribe`` (``"max_rate": 4``). The
contract allows ``0 < max_rate <= 1000``; pricehub also bounds the precision to
``DECIMALS`` decimals, so the slowest rate is ``MIN_RATE`` (one update per 1000 s):
``max_rate=1e-9`` would hold a zone's newest price back for 31 years, and every distinct
rate is an audience of its own, so a client must not be able to invent unbounded ones.

A bad URL rate is refused as ``wire.refusals.RefusalReason.INVALID_MAX_RATE`` (HTTP 400,
``HttpErrorCode.INVALID_MAX_RATE``); a bad ``subscribe`` rate is refused by
``messages.decode_client_message`` (``invalid_message``). What a rate-limited (or
conflated) delivery says about the updates it replaces, ``skipped``, is spliced into the
frame by ``messages.price_update``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

__all__ = ["DECIMALS", "FIELD", "MAX_RATE", "MIN_RATE", "RateError", "parse_json", "parse_url"]

FIELD: Final = "max_rate"  # the URL query parameter and the ``subscribe`` field
MAX_RATE: Final = 1000.0
DECIMALS: Final = 3
MIN_RATE: Final = 10.0**-DECIMALS
# A URL value: plain decimal digits only (no sign, exponent, "nan", "inf", spaces or
# non-ASCII digits), at most 4 before the point (1000) and DECIMALS after it.
_URL_FORM = re.compile(rf"[0-9]{{1,4}}(?:\.[0-9]{{1,{DECIMALS}}})?")
_TEXT = (
    f"'{FIELD}' must be a number from {MIN_RATE:g} to {MAX_RATE:g} (updates per second) "
    f"with at most {DECIMALS} decimals"
)


class RateError(ValueError):
    """A ``max_rate`` the contract refuses; ``str(error)`` says what is allowed."""


def _in_range(rate: float) -> float:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise RateError(_TEXT)
    return rate


def parse_url(raw: str) -> float:
    """A URL query's ``max_rate``; raises ``RateError``."""
    if not _URL_FORM.fullmatch(raw):
        raise RateError(_TEXT)
    return _in_range(float(raw))


def parse_json(value: Any) -> float:
    """A ``subscribe``'s ``max_rate`` as decoded JSON: a number (not a bool or a string);
    raises ``RateError``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RateError(_TEXT)
    if isinstance(value, int):
        if not 0 < value <= MAX_RATE:  # before float(): a 400-digit int overflows it
            raise RateError(_TEXT)
        return float(value)
    if not math.isfinite(value) or round(value, DECIMALS) != value:
        raise RateError(_TEXT)
    return _in_range(value)
