"""One data set for the history-by-market-time tests (storage contract, HTTP, Redis).

Two zones whose prices arrive out of market-time order (a zone's seq order is not its
timestamp order), with timestamps equal within and across zones, on both sides of the
range ``[FROM, TO)``. ``EXPECTED`` is the contract's order, (timestamp, zone, seq).
"""

from __future__ import annotations

from pricehub.wire.messages import PriceBody

__all__ = ["EXPECTED", "FROM", "PRICES", "TO", "body"]

FROM = "2026-11-27T09:00:00.000Z"
TO = "2026-11-27T10:00:00.000Z"

# (zone, market time), in publishing order: pjm gets seqs 1..5, ercot 1..3, caiso 1.
PRICES: tuple[tuple[str, str], ...] = (
    ("pjm", "2026-11-27T09:00:00.000Z"),  # pjm 1: the first instant, kept
    ("ercot", "2026-11-27T09:30:00.000Z"),  # ercot 1
    ("pjm", "2026-11-27T09:30:00.000Z"),  # pjm 2
    ("ercot", "2026-11-27T09:00:00.000Z"),  # ercot 2: older than ercot 1
    ("pjm", "2026-11-27T08:59:59.999Z"),  # pjm 3: before the range
    ("caiso", "2026-11-27T09:15:00.000Z"),  # caiso 1: a zone not asked for
    ("pjm", "2026-11-27T10:00:00.000Z"),  # pjm 4: the end is excluded
    ("ercot", "2026-11-27T09:59:59.999Z"),  # ercot 3
    ("pjm", "2026-11-27T09:30:00.000Z"),  # pjm 5: equal to pjm 2
)

# (zone, seq) of [FROM, TO) for zones pjm and ercot, in (timestamp, zone, seq) order.
EXPECTED: tuple[tuple[str, int], ...] = (
    ("ercot", 2), ("pjm", 1), ("ercot", 1), ("pjm", 2), ("pjm", 5), ("ercot", 3),
)


def body(zone: str, timestamp: str, price: float = 1.0) -> bytes:
    """The body a storage appends for one of ``PRICES``."""
    return PriceBody(zone, price, None, timestamp).encode()
