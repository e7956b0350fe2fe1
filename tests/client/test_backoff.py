"""The reconnect policy of PROTOCOL.md, checked without sockets or real time."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricehub.client.backoff import Backoff, GiveUp, Retry
from pricehub.wire.codes import NO_RETRY_CLOSE_CODES as TERMINAL_CLOSE_CODES


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fixed_random(*values: float) -> Callable[[], float]:
    """A ``random()`` returning ``values`` in turn, forever."""
    cycle: Iterator[float] = itertools.cycle(values)
    return lambda: next(cycle)


def test_default_delays_are_the_contract_sequence() -> None:
    backoff = Backoff(random=fixed_random(0.0, 0.5, 0.25, 0.999, 0.1), clock=FakeClock())
    decisions = [backoff.closed(1006) for _ in range(5)]
    assert decisions == [
        Retry(1, 1.0),
        Retry(2, 2.5),
        Retry(3, 4.25),
        Retry(4, 8.999),
        Retry(5, 16.1),
    ]


def test_gives_up_after_max_attempts_and_keeps_giving_up() -> None:
    backoff = Backoff(max_attempts=3, random=fixed_random(0.0), clock=FakeClock())
    assert [backoff.closed(None) for _ in range(3)] == [
        Retry(1, 1.0),
        Retry(2, 2.0),
        Retry(3, 4.0),
    ]
    assert backoff.closed(None) == GiveUp("exhausted", None, 3)
    assert backoff.closed(1001) == GiveUp("exhausted", 1001, 3)


def test_custom_base_and_jitter() -> None:
    backoff = Backoff(base=0.5, jitter=2.0, random=fixed_random(0.5), clock=FakeClock())
    assert [backoff.closed(1011).delay for _ in range(3)] == [1.5, 2.0, 3.0]


def test_reset_allows_a_manual_reconnect_after_giving_up() -> None:
    backoff = Backoff(max_attempts=1, random=fixed_random(0.0), clock=FakeClock())
    assert backoff.closed(None) == Retry(1, 1.0)
    assert isinstance(backoff.closed(None), GiveUp)
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.closed(None) == Retry(1, 1.0)


def test_counter_resets_only_after_a_stable_connection() -> None:
    clock = FakeClock()
    backoff = Backoff(random=fixed_random(0.0), clock=clock)
    assert backoff.closed(1001) == Retry(1, 1.0)
    # The attempt succeeds but the connection drops after 9.99 s: not stable.
    backoff.opened()
    clock.advance(9.99)
    assert backoff.closed(1001) == Retry(2, 2.0)
    # This one stays open for 10 s exactly: counting starts again.
    backoff.opened()
    clock.advance(10.0)
    assert backoff.closed(1001) == Retry(1, 1.0)


def test_failed_attempts_do_not_reuse_an_old_open_time() -> None:
    clock = FakeClock()
    backoff = Backoff(random=fixed_random(0.0), clock=clock)
    backoff.opened()
    clock.advance(1.0)
    assert backoff.closed(1006) == Retry(1, 1.0)
    # Long after that open, a failed connect must not count as a stable connection.
    clock.advance(60.0)
    assert backoff.closed(None) == Retry(2, 2.0)


@pytest.mark.parametrize("code", sorted(TERMINAL_CLOSE_CODES))
def test_terminal_codes_never_retry(code: int) -> None:
    backoff = Backoff(random=fixed_random(0.0), clock=FakeClock())
    assert backoff.closed(code) == GiveUp("terminal", code, 0)
    assert backoff.closed(1006) == Retry(1, 1.0)
    assert backoff.closed(code) == GiveUp("terminal", code, 1)
    assert backoff.attempt == 1


def test_terminal_codes_are_the_contract_ones() -> None:
    assert frozenset({1008, 4001, 4003}) == TERMINAL_CLOSE_CODES


@pytest.mark.parametrize(
    "kwargs",
    [{"base": -1.0}, {"jitter": -0.1}, {"stable_after": -1.0}, {"max_attempts": 0}],
)
def test_rejects_nonsense_options(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        Backoff(**kwargs)  # type: ignore[arg-type]


# --- properties -------------------------------------------------------------------------

unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
close_codes = st.one_of(st.none(), st.sampled_from([1000, 1001, 1006, 1011, 1013, 4000, 4008]))


@given(
    base=st.floats(min_value=0.0, max_value=10.0),
    jitter=st.floats(min_value=0.0, max_value=10.0),
    attempt=st.integers(min_value=1, max_value=30),
    draw=unit,
)
def test_delay_is_within_the_contract_bounds(
    base: float, jitter: float, attempt: int, draw: float
) -> None:
    backoff = Backoff(base=base, jitter=jitter, random=lambda: draw)
    floor = base * 2 ** (attempt - 1)
    assert floor <= backoff.delay_for(attempt) <= floor + jitter


@given(
    max_attempts=st.integers(min_value=1, max_value=8),
    events=st.lists(
        st.tuples(st.booleans(), st.floats(min_value=0.0, max_value=30.0), close_codes),
        max_size=60,
    ),
)
def test_retries_count_up_and_never_pass_the_cap(
    max_attempts: int, events: list[tuple[bool, float, int | None]]
) -> None:
    """Any mix of opens, open durations and retryable closes: attempts go 1, 2, ...
    up to the cap, restart at 1 only after a stable connection, and the cap gives up."""
    clock = FakeClock()
    backoff = Backoff(max_attempts=max_attempts, clock=clock)
    expected = 0
    for opened, duration, code in events:
        stable = False
        if opened:
            backoff.opened()
            stable = duration >= backoff.stable_after
        clock.advance(duration)
        decision = backoff.closed(code)
        if stable:
            expected = 0
        if expected == max_attempts:
            assert decision == GiveUp("exhausted", code, max_attempts)
        else:
            expected += 1
            assert isinstance(decision, Retry)
            assert decision.attempt == expected
            assert decision.delay >= 2 ** (expected - 1)


@given(
    history=st.lists(close_codes, max_size=10),
    code=st.sampled_from(sorted(TERMINAL_CLOSE_CODES)),
)
def test_terminal_codes_give_up_whatever_happened_before(
    history: list[int | None], code: int
) -> None:
    backoff = Backoff(max_attempts=100, clock=FakeClock())
    for earlier in history:
        backoff.closed(earlier)
    decision = backoff.closed(code)
    assert decision == GiveUp("terminal", code, len(history))
