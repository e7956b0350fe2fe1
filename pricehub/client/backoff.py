"""Reconnect policy of pricehub clients, as a sans-I/O state machine.

PROTOCOL.md ("Reconnecting clients") fixes the policy every client shares:

* the delay before reconnect attempt ``n`` (``n = 1..max_attempts``) is
  ``base * 2**(n-1) + uniform(0, jitter)``, defaults ``base=1 s``, ``jitter=1 s``,
  ``max_attempts=5``; after the last attempt the client stops and waits for a manual
  reconnect;
* the attempt counter resets only once a connection has stayed open ``stable_after``
  (10 s) -- resetting on mere open would let a server that accepts and immediately drops
  connections be hammered forever at the 1 s delay;
* close codes 1008, 4001 and 4003 are terminal: retrying cannot succeed.

``Backoff`` only does the arithmetic. The caller reports what happened (``opened()``,
``closed(code)``) and gets back a ``Retry`` (sleep ``delay`` then connect) or a ``GiveUp``.
Randomness and the clock are injectable, so tests check exact delays without waiting.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pricehub.wire.codes import NO_RETRY_CLOSE_CODES

__all__ = ["Backoff", "Decision", "GiveUp", "Retry"]


@dataclass(frozen=True, slots=True)
class Retry:
    """Sleep ``delay`` seconds, then make reconnect attempt number ``attempt`` (1-based)."""

    attempt: int
    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop reconnecting.

    ``reason`` is ``"terminal"`` when the close code forbids a retry, ``"exhausted"`` when
    ``max_attempts`` attempts failed; ``code`` is the close code that ended it (``None`` when
    the last attempt did not even open a connection).
    """

    reason: Literal["terminal", "exhausted"]
    code: int | None
    attempts: int


Decision = Retry | GiveUp


class Backoff:
    """Exponential backoff with jitter, an attempt cap and a stability reset.

    Keyword-only options (defaults are the contract's):

    * ``base`` (1.0 s): delay of the first attempt, without jitter; doubles per attempt.
    * ``jitter`` (1.0 s): upper bound of the uniform random part added to every delay, so
      that clients dropped together by a restart do not reconnect in lock step.
    * ``max_attempts`` (5): attempts before giving up.
    * ``stable_after`` (10.0 s): how long a connection must have been open for the attempt
      counter to start again from 1.
    * ``random`` (``random.random``): returns a float in ``[0, 1)``.
    * ``clock`` (``time.monotonic``): seconds, only differences are used.
    """

    def __init__(
        self,
        *,
        base: float = 1.0,
        jitter: float = 1.0,
        max_attempts: int = 5,
        stable_after: float = 10.0,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if base < 0 or jitter < 0 or stable_after < 0:
            raise ValueError("base, jitter and stable_after must be >= 0")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.base = base
        self.jitter = jitter
        self.max_attempts = max_attempts
        self.stable_after = stable_after
        self._random = random
        self._clock = clock
        self._attempt = 0
        self._opened_at: float | None = None

    @property
    def attempt(self) -> int:
        """Reconnect attempts made since the last stable connection (0 = none)."""
        return self._attempt

    def delay_for(self, attempt: int) -> float:
        """The delay before attempt number ``attempt``; draws one random number."""
        if attempt < 1:
            raise ValueError("attempts are numbered from 1")
        return self.base * 2.0 ** (attempt - 1) + self._random() * self.jitter

    def opened(self) -> None:
        """A connection is established (the stability timer starts now)."""
        self._opened_at = self._clock()

    def closed(self, code: int | None) -> Decision:
        """The connection closed with ``code``, or an attempt failed (``code=None``).

        Returns what to do next and advances the attempt counter on ``Retry``.
        """
        if self._opened_at is not None:
            if self._clock() - self._opened_at >= self.stable_after:
                self._attempt = 0
            self._opened_at = None
        # Unknown zone, bad token, token not valid for the zone: retrying cannot succeed.
        # Every other close is followed by a resume.
        if code in NO_RETRY_CLOSE_CODES:
            return GiveUp("terminal", code, self._attempt)
        if self._attempt >= self.max_attempts:
            return GiveUp("exhausted", code, self._attempt)
        self._attempt += 1
        return Retry(self._attempt, self.delay_for(self._attempt))

    def reset(self) -> None:
        """Start counting from scratch (a manual reconnect after giving up)."""
        self._attempt = 0
        self._opened_at = None
