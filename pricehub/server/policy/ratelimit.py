"""Token buckets (sans-I/O): per-connection message rate and per-key publish rate."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst`` (default ``2 * rate``).

    :param clock: monotonic seconds; injectable so tests need no real time.
    """

    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens", "rejected_in_row")

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = 2 * rate if burst is None else burst
        self._tokens = self._burst
        self._clock = clock
        self._stamp = clock()
        # Consecutive rejections: a client that keeps sending while limited for a whole
        # second's worth of messages is flooding, not bursting (close 4029).
        self.rejected_in_row = 0

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            self.rejected_in_row = 0
            return True
        self.rejected_in_row += 1
        return False

    def retry_after(self) -> float:
        """Seconds until one token is available again."""
        return max(0.0, (1 - self._tokens) / self._rate)

    @property
    def sustained_overflow(self) -> bool:
        return self.rejected_in_row >= max(1, int(self._rate))
