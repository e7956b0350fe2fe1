"""The client's pure half of PROTOCOL.md "Trading-grade subscriptions": the ``max_rate``
option, and the paging of a history by market time. No I/O: ``PriceClient`` does that.

``Rates`` is what a client asked for: one rate for every zone (``max_rate=4``) or one per
zone (``max_rate={"pjm": 4, "ercot": 1}``, the zones not named unlimited). A WebSocket
carries the common rate on its URL and each zone's own in the ``subscribe`` naming it; an
SSE stream (it cannot be sent anything) has one rate, on its URL.

``HistoryPager`` walks ``GET /api/ws/ws/history`` over a range that is bigger than one
answer (``truncated``). The answer is ordered by (``timestamp``, zone, ``seq``), so the next
page starts at the last page's last ``timestamp`` (``from`` is inclusive) and drops what it
already gave: prices sharing that timestamp may sit on both sides of the cut, and none may
be lost or given twice. A page that gives nothing new (more prices at one timestamp than a
page holds) is asked again at the largest limit the contract allows before giving up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from pricehub.wire import rate
from pricehub.wire.decode import PriceHistory, PriceObject
from pricehub.wire.messages import MAX_RANGE_LIMIT

__all__ = ["HistoryPager", "HistoryStalled", "RateOption", "Rates", "format_rate", "time_text"]

RateOption = float | Mapping[str, float] | None
_Key = tuple[str, str, int]  # (timestamp, zone, seq): the order of a history by time


def _checked(value: object, what: str) -> float:
    try:
        return rate.parse_json(value)
    except rate.RateError as exc:
        raise ValueError(f"max_rate {what}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Rates:
    """``default``: every zone's rate (None: every update); ``zones``: per-zone rates."""

    default: float | None = None
    zones: Mapping[str, float] | None = None

    @classmethod
    def parse(cls, option: RateOption, zones: Iterable[str]) -> Rates:
        """The ``max_rate`` option checked as the server would (``0 < rate <= 1000``, at
        most ``rate.DECIMALS`` decimals): ``ValueError`` now, not an HTTP 400 later."""
        if option is None:
            return cls()
        if not isinstance(option, Mapping):
            return cls(default=_checked(option, "for every zone"))
        known = set(zones)
        strays = sorted(set(option) - known)
        if strays:
            raise ValueError(f"max_rate names zones the client does not watch: {strays}")
        return cls(zones={zone: _checked(value, f"of {zone!r}") for zone, value in option.items()})

    def of(self, zone: str) -> float | None:
        """The rate ``zone`` is delivered at (None: every update)."""
        if self.zones is not None:
            return self.zones.get(zone)
        return self.default

    def url_rate(self, zones: tuple[str, ...], *, sse: bool) -> float | None:
        """The rate written on the socket's or stream's URL. A WebSocket of several zones
        sets per-zone rates with ``subscribe``; a stream cannot, so its one rate is the
        lowest asked (no zone gets more than it asked for; the rest get the newest price
        at that pace)."""
        if self.zones is None:
            return self.default
        if len(zones) == 1:
            return self.zones.get(zones[0])
        if sse and self.zones:
            return min(self.zones.values())
        return None

    def needs_subscribe(self, zone: str) -> bool:
        """Must a multi-zone WebSocket subscribe ``zone`` again to set its own rate?"""
        return self.zones is not None and zone in self.zones


def format_rate(value: float) -> str:
    """A rate as the URL form the server takes (plain decimals, no exponent)."""
    return f"{value:.{rate.DECIMALS}f}".rstrip("0").rstrip(".")


def time_text(moment: datetime | str) -> str:
    """A range bound for the wire: an aware ``datetime`` as ISO-8601, a string as given
    (the server checks it). A naive ``datetime`` is refused: the contract never guesses a
    time zone, and neither does the client."""
    if isinstance(moment, str):
        return moment
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"a time without a UTC offset: {moment!r} (use tzinfo=timezone.utc)")
    return moment.isoformat()


class HistoryStalled(Exception):
    """More prices share one timestamp than the largest page holds: paging by time cannot
    get past them without losing some."""


def _key(price: PriceObject) -> _Key:
    return (price.timestamp, price.zone, price.seq)


class HistoryPager:
    """The requests and de-duplication of one history by market time over several pages.

    ``query()`` is the next request's query; ``take(page)`` the prices of its answer not
    given before, and whether another request is needed. ``cursor`` is each zone's
    highest seq given so far (the hand-over to the live stream); ``end`` is fixed by the
    first answer when not given, so every page covers the same range.
    """

    def __init__(
        self, zones: tuple[str, ...], start: str, end: str | None, limit: int | None
    ) -> None:
        if limit is not None and not 1 <= limit <= MAX_RANGE_LIMIT:
            raise ValueError(f"limit must be from 1 to {MAX_RANGE_LIMIT}, got {limit}")
        self.zones = zones
        self.start = start
        self.end = end
        self._limit = limit
        self._page_limit = limit
        self._from = start
        self._last: _Key | None = None
        self.cursor: dict[str, int] = {}
        self.pages = 0

    def query(self) -> dict[str, str]:
        query = {"zones": ",".join(self.zones), "from": self._from}
        if self.end is not None:
            query["to"] = self.end
        if self._page_limit is not None:
            query["limit"] = str(self._page_limit)
        return query

    def take(self, page: PriceHistory) -> tuple[list[PriceObject], bool]:
        """The new prices of ``page``, and whether more remain to be asked for."""
        self.pages += 1
        if self.end is None:
            self.end = page.end
            self.start = page.start or self.start
        last = self._last
        fresh = [price for price in page.data if last is None or _key(price) > last]
        for price in fresh:
            if price.seq > self.cursor.get(price.zone, 0):
                self.cursor[price.zone] = price.seq
        if fresh:
            self._last = _key(fresh[-1])
            self._page_limit = self._limit  # a bigger page only for as long as it is needed
        if not page.truncated:
            return fresh, False
        if not page.data:
            raise HistoryStalled("the server said truncated but sent no price")
        if not fresh:
            if self._page_limit is not None and self._page_limit >= MAX_RANGE_LIMIT:
                raise HistoryStalled(
                    f"more than {MAX_RANGE_LIMIT} prices share the timestamp {self._from}"
                )
            self._page_limit = MAX_RANGE_LIMIT
        self._from = page.data[-1].timestamp
        return fresh, True
