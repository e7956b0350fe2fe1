"""``pricehub tail``: watch zones live, as a refreshing terminal table or as JSON lines.

``pricehub tail [--server http://127.0.0.1:8080] [--json] [--transport auto|ws|sse]
[--max-rate N] ZONE...``

``--server`` is a base URL; a bare ``host:port`` means ``http://host:port``.

Zone names are case-insensitive here (``PJM`` as the dashboard shows it is ``pjm`` on the
wire). Only the zones named are opened, whatever the number of zones the server has.

It starts from one consistent picture: a snapshot of every zone named (``GET
/api/ws/ws/snapshot``, one instant), then the stream resumed from the snapshot's cursor, so
every update after it comes once and none is missing. ``--max-rate N`` asks the server for
at most N updates per second per zone (the newest wins); a row then says how many updates
its prices replaced (``skipped``), and ``--json`` prints a price's ``skipped`` when not 0.

The table (plain ANSI escapes, redrawn every ``--refresh`` seconds) shows per zone the
last price, its change from the previous one, volume, seq, update rate, age and gaps, under
a line with the connection state; a zone the server says is stale (``--stale-after``) is
marked ``STALE since 14:05:00Z``. ``--json`` prints one price object per line on stdout,
for ``jq``, and each ``gap`` and ``zone_status`` as a JSON object with its ``type``;
connection states (and gaps, in words) go to stderr. Ctrl-C exits 0; giving up on the
server (attempts exhausted, or a terminal close such as an unknown zone) exits 1, its reason
printed once on stderr; a usage error exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TextIO

from yarl import URL

from pricehub.client.backoff import Backoff
from pricehub.client.client import (
    ClientError,
    Gap,
    PriceClient,
    PriceUpdate,
    Snapshot,
    Status,
    TradingEvent,
    ZoneState,
)
from pricehub.wire import rate
from pricehub.wire.codes import GapReason
from pricehub.wire.decode import gap_object

__all__ = ["TableView", "build_parser", "main"]

RATE_WINDOW = 10.0  # seconds of arrivals behind the UPD/S column
_RESET, _RED, _GREEN, _YELLOW, _BOLD = "\x1b[0m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[1m"
_STATE_COLOURS = {"connected": _GREEN, "failed": _RED, "closed": _RED}
_HOME, _CLEAR_LINE, _CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
_HIDE_CURSOR, _SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit 2: argparse's usage dump above the message buries
    the one thing that is wrong (``--help`` still prints the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, _usage_line(message))


def _usage_line(message: str) -> str:
    return f"pricehub tail: error: {message} (see pricehub tail --help)\n"


def _server_url(text: str) -> str:
    """``--server``: a bare ``host:port`` is ``http://host:port``, as curl reads it. Which
    schemes the client takes, ``PriceClient`` decides (one check, not two); yarl's words for
    a URL without a host (about "relative URLs") would not tell a user what to type."""
    url = text if "://" in text else f"http://{text}"
    try:
        host = URL(url).host
    except ValueError as exc:  # e.g. a port out of range
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL: {exc}") from None
    if not host:
        raise argparse.ArgumentTypeError(f"no host in {text!r}: give host:port or http://host:port")
    return url


def _positive(kind: Callable[[str], int | float]) -> Callable[[str], int | float]:
    """An argparse ``type`` taking numbers > 0: ``--max-attempts 0`` is a ``ValueError`` deep
    in ``Backoff``, ``--refresh 0`` a redraw loop that never sleeps."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _max_rate(text: str) -> float:
    """``--max-rate``: what the server takes on a URL (``0 < N <= 1000``, 3 decimals)."""
    try:
        return rate.parse_url(text)
    except rate.RateError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pricehub tail", description="Watch pricehub zones live.")
    parser.add_argument(
        "zones", nargs="+", metavar="ZONE", type=str.lower,
        help="zone names, any case, e.g. pjm ERCOT",
    )  # fmt: skip
    parser.add_argument(
        "--server",
        type=_server_url,
        default="http://127.0.0.1:8080",
        help="base URL, or host:port for http:// (default: %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON price object per line on stdout"
    )
    parser.add_argument("--token", help="subscriber token, when the server requires one")
    parser.add_argument(
        "--max-attempts",
        type=_positive(int),
        default=5,
        help="reconnect attempts before giving up (default: %(default)s)",
    )
    parser.add_argument(
        "--transport",
        choices=("auto", "ws", "sse"),
        default="auto",
        help="auto: WebSocket, or Server-Sent Events where the upgrade is refused "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-rate",
        type=_max_rate,
        metavar="N",
        help="at most N updates per second per zone, the newest winning (default: every one)",
    )
    parser.add_argument(
        "--refresh",
        type=_positive(float),
        default=0.5,
        help="table redraw period in s (default: %(default)s)",
    )
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``pricehub tail``; ``argv`` are the arguments after ``tail``."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_tail(args))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: a normal end for a filter. Point stdout at
        # /dev/null so the interpreter's final flush does not report the same error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def _tail(args: argparse.Namespace) -> int:
    output: _JsonOutput | _TableOutput
    if args.json:
        output = _JsonOutput(sys.stdout, sys.stderr)
    else:
        output = _TableOutput(args, sys.stdout, sys.stderr)
    try:
        reader = PriceClient(args.server, args.zones, token=args.token)
    except ValueError as exc:  # e.g. --server ftp://host: the client's own check of the URL
        sys.stderr.write(_usage_line(f"argument --server: {exc}"))
        return 2
    snapshot = await _snapshot(reader)
    client = PriceClient(
        args.server,
        args.zones,
        token=args.token,
        backoff=Backoff(max_attempts=args.max_attempts),
        on_status=output.status,
        transport=args.transport,
        max_rate=args.max_rate,
        since=None if snapshot is None else snapshot.cursor,
        epoch=None if snapshot is None else snapshot.epoch,
    )
    if snapshot is not None:
        output.snapshot(snapshot)
    async with client, output:
        try:
            async for event in client.events():
                output.event(event)
        except ClientError:
            # The output already reported why, from the ``failed`` status: printing the
            # exception as well said every reason twice.
            return 1
    return 0


async def _snapshot(reader: PriceClient) -> Snapshot | None:
    """The zones at one instant, to start from; None when the server cannot say (down, an
    older server, an unknown zone): the stream then starts from each zone's current price,
    and the client says why it cannot connect, if it cannot."""
    try:
        return await reader.snapshot(via="http")
    except ClientError:
        return None
    finally:
        await reader.close()


def _describe(status: Status) -> str:
    if status.state == "reconnecting":
        why = f"close {status.code}: {status.error}" if status.code else status.error
        return f"reconnecting in {status.delay:.1f} s (attempt {status.attempt}) after {why}"
    if status.state == "connecting" and status.attempt:
        return f"connecting (attempt {status.attempt})"
    if status.state == "connected" and status.transport == "sse":
        return "connected (SSE)"
    return status.error if status.state == "failed" and status.error else status.state


def _describe_gap(gap: Gap) -> str:
    if gap.reason == GapReason.LOST:
        cause = "lost on the way"
    else:
        cause = "server history lost" if gap.epoch != gap.previous_epoch else "too far behind"
    return f"gap in {gap.zone} after seq {gap.last_seq} ({cause})"


def _stale_mark(state: ZoneState) -> str:
    """``STALE since 14:05:00Z``: the time of day of the zone's last accepted price (the
    date is today's on any desk watching a zone go quiet)."""
    since = state.since or ""
    return f"STALE since {since[11:19]}Z" if len(since) >= 19 else "STALE"


def _gap_object(gap: Gap) -> dict[str, object]:
    """A ``Gap`` as the wire's ``gap`` object (``epoch``: the one the missing seqs had)."""
    return gap_object(
        gap.zone, from_seq=gap.from_seq, to_seq=gap.to_seq, reason=gap.reason,
        epoch=gap.previous_epoch if gap.epoch != gap.previous_epoch else None,
    )  # fmt: skip


class _JsonOutput:
    """Price objects on ``out``, everything else on ``err``."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self._out = out
        self._err = err
        self._failed = False

    def status(self, status: Status) -> None:
        # After ``failed`` the client's closing is not news: the reason stays the last line.
        if not (self._failed and status.state == "closed"):
            print(f"pricehub tail: {_describe(status)}", file=self._err, flush=True)
        self._failed = self._failed or status.state == "failed"

    def snapshot(self, snapshot: Snapshot) -> None:
        for price in snapshot.prices.values():
            if price is not None:
                self.event(price)

    def event(self, event: TradingEvent) -> None:
        if isinstance(event, Gap):
            print(f"pricehub tail: {_describe_gap(event)}", file=self._err, flush=True)
            obj = _gap_object(event)
        elif isinstance(event, ZoneState):
            obj = event.as_json()
        else:
            obj = event.as_price_object()
        self._out.write(json.dumps(obj) + "\n")
        self._out.flush()

    async def __aenter__(self) -> _JsonOutput:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


@dataclass
class _Row:
    last: PriceUpdate | None = None
    change: float | None = None
    gaps: int = 0
    skipped: int = 0
    stale: ZoneState | None = None
    arrivals: deque[float] = field(default_factory=deque)


class TableView:
    """What the table shows, and its rendering; pure apart from the injected clock."""

    def __init__(
        self,
        zones: Sequence[str],
        *,
        server: str,
        clock: Callable[[], float] = time.monotonic,
        width: Callable[[], int] = lambda: _terminal_width(sys.stdout),
    ) -> None:
        self._clock = clock
        self._width = width
        self._started = clock()
        self.server = server
        self.status = Status("connecting")
        self.note = ""
        self.rows = {zone: _Row() for zone in zones}

    def record(self, event: TradingEvent) -> None:
        row = self.rows.setdefault(event.zone, _Row())
        if isinstance(event, Gap):
            row.gaps += 1
            self.note = _describe_gap(event)
            return
        if isinstance(event, ZoneState):
            row.stale = event if event.stale else None
            return
        if row.last is not None:
            row.change = event.price - row.last.price
        row.last = event
        row.skipped += event.skipped
        if not (event.replay or event.initial):  # bursts would inflate the live rate
            row.arrivals.append(self._clock())

    def rate(self, row: _Row) -> float:
        now = self._clock()
        while row.arrivals and row.arrivals[0] < now - RATE_WINDOW:
            row.arrivals.popleft()
        return len(row.arrivals) / max(min(now - self._started, RATE_WINDOW), 1.0)

    def render(self) -> str:
        """One frame: home the cursor, draw every line, clear what is left below."""
        colour = _STATE_COLOURS.get(self.status.state, _YELLOW)
        # A line wider than the terminal wraps, and the next frame, drawn from the cursor's
        # home, no longer overwrites the extra line: the status would scroll the table away.
        width = max(self._width(), 20)
        head = f"pricehub tail {self.server}  "
        state = _clip(self._state_text(), width - 1 - len(head))
        lines = [
            f"{_BOLD}{_clip(head, width - 1)}{_RESET}{colour}{state}{_RESET}",
            _clip(self.note, width - 1),
            f"{_BOLD}{'ZONE':<12}{'PRICE':>12}{'CHANGE':>10}{'VOLUME':>10}{'SEQ':>9}"
            f"{'UPD/S':>7}{'AGE':>8}{'GAPS':>6}  TIME{_RESET}",
        ]
        lines += [self._line(zone, row) for zone, row in self.rows.items()]
        lines = [_clip_styled(line, width - 1) for line in lines]
        return _HOME + "".join(line + _CLEAR_LINE + "\n" for line in lines) + _CLEAR_BELOW

    def _state_text(self) -> str:
        # Why the client gave up is often wider than a terminal: ``_TableOutput`` prints it
        # whole on stderr below the final frame, so the frame only says that it did.
        return "failed" if self.status.state == "failed" else _describe(self.status)

    def _line(self, zone: str, row: _Row) -> str:
        rate = f"{self.rate(row):>7.1f}"
        if row.last is None:
            return f"{zone:<12}{'-':>12}{'':>10}{'':>10}{'':>9}{rate}{'':>8}{row.gaps:>6}"
        change = "" if row.change is None else f"{row.change:+.2f}"
        tint = _GREEN if (row.change or 0) > 0 else _RED if (row.change or 0) < 0 else ""
        volume = "-" if row.last.volume is None else f"{row.last.volume:g}"
        age = f"{self._clock() - row.arrivals[-1]:.1f}s" if row.arrivals else "-"
        stale = "" if row.stale is None else f"  {_RED}{_BOLD}{_stale_mark(row.stale)}{_RESET}"
        # max_rate: how many updates the prices shown replaced (told, not lost: no gap).
        skipped = f"  skipped {row.skipped}" if row.skipped else ""
        return (
            f"{zone:<12}{row.last.price:>12.2f}{tint}{change:>10}{_RESET}{volume:>10}"
            f"{row.last.seq:>9}{rate}{age:>8}{row.gaps:>6}  {row.last.timestamp}{skipped}{stale}"
        )


def _clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, an ellipsis marking the cut."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _terminal_width(out: TextIO) -> int:
    """Columns of the terminal ``out`` writes to (``COLUMNS`` wins, as for ``shutil``);
    unlimited when ``out`` is a pipe or file, where nothing wraps."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(out.fileno()).columns if out.isatty() else _UNLIMITED
    except (OSError, ValueError):  # e.g. a closed stream or one without a file descriptor
        return _UNLIMITED


_UNLIMITED = 10_000
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _clip_styled(line: str, width: int) -> str:
    """Like ``_clip`` for a line with ANSI escapes: only visible characters count, and a
    reset follows a cut so no colour leaks into the next line."""
    if len(_ESCAPE.sub("", line)) <= width:
        return line
    out: list[str] = []
    visible = 0
    for part in re.split(f"({_ESCAPE.pattern})", line):
        if _ESCAPE.fullmatch(part):
            out.append(part)
        else:
            take = part[: max(width - 1 - visible, 0)]
            out.append(take)
            visible += len(take)
    return "".join(out) + "…" + _RESET


class _TableOutput:
    """Keeps a ``TableView`` current and redraws it periodically on ``out``; why the client
    gave up goes to ``err`` once, after the final frame (a frame drawn later would clear it)."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.view = TableView(args.zones, server=args.server)
        self._out = out
        self._err = err
        self._period = args.refresh
        self._task: asyncio.Task[None] | None = None

    def status(self, status: Status) -> None:
        self.view.status = status

    def snapshot(self, snapshot: Snapshot) -> None:
        for price in snapshot.prices.values():
            if price is not None:
                self.view.record(price)

    def event(self, event: TradingEvent) -> None:
        self.view.record(event)

    async def _redraw(self) -> None:
        while True:
            self._draw()
            await asyncio.sleep(self._period)

    def _draw(self) -> None:
        self._out.write(self.view.render())
        self._out.flush()

    async def __aenter__(self) -> _TableOutput:
        self._out.write(_HIDE_CURSOR)
        self._task = asyncio.create_task(self._redraw())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._draw()  # the final state, e.g. that the client gave up
        self._out.write(_SHOW_CURSOR)
        self._out.flush()
        if self.view.status.state == "failed":
            print(f"pricehub tail: {_describe(self.view.status)}", file=self._err, flush=True)
