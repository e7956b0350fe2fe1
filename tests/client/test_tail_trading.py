"""``pricehub tail`` and PROTOCOL.md's trading-grade messages, as a user runs it: a
subprocess against a real server. With ``--stale-after`` the table marks a stale row and
unmarks it when the zone's next price arrives; ``--json`` prints ``gap`` and
``zone_status`` as JSON lines. It starts from a snapshot and resumes from its cursor, and
``--max-rate`` gets the newest price at that pace, saying how many it skipped."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from pricehub.wire import paths
from tests.client.test_tail import StartTail, Tail, run_tail
from tests.harness.serverproc import ServerProcess
from tests.harness.support import PUBLISH_KEY

__all__ = ["run_tail"]  # the fixture, imported for pytest

ZONE = "pjm"


@pytest.fixture
def staling() -> Iterator[ServerProcess]:
    with ServerProcess("--no-simulate", "--stale-after", "0.3", publish_key=PUBLISH_KEY) as p:
        yield p


async def json_until(tail: Tail, predicate: Callable[[dict[str, Any]], bool]) -> list[Any]:
    """JSON lines of stdout up to and including the first matching one."""
    lines: list[dict[str, Any]] = []
    while not lines or not predicate(lines[-1]):
        line = await tail.stdout_line()
        assert line, f"tail exited; lines so far: {lines}"
        lines.append(json.loads(line))
    return lines


def of_type(kind: str, **fields: object) -> Callable[[dict[str, Any]], bool]:
    return lambda line: line.get("type") == kind and fields.items() <= line.items()


async def test_json_mode_prints_zone_status_and_gap_objects(
    staling: ServerProcess, run_tail: StartTail
) -> None:
    [first] = await staling.publish({"market_zone": ZONE, "price": 40.0})
    tail = await run_tail("--json", "--server", staling.url, ZONE)
    seen = await json_until(tail, of_type("zone_status", status="stale"))
    assert seen[0]["seq"] == 1 and "type" not in seen[0]  # price objects as before
    stale = seen[-1]
    assert stale == {
        "type": "zone_status", "market_zone": ZONE, "status": "stale",
        "since": seen[0]["accepted_at"], "last_seq": 1,
    }  # fmt: skip
    assert first["seq"] == 1

    staling.kill()  # in memory: the restarted server numbers on a new epoch
    await staling.start_async()
    await staling.publish({"market_zone": ZONE, "price": 50.0})
    seen = await json_until(tail, lambda line: line.get("price") == 50.0)
    assert await tail.interrupt() == 0
    gaps = [line for line in seen if line.get("type") == "gap"]
    assert len(gaps) == 1, seen
    assert gaps[0]["reason"] == "epoch_changed" and gaps[0]["from_seq"] == 2
    assert gaps[0]["to_seq"] is None and isinstance(gaps[0]["epoch"], str)
    # The zone came back while tail was away: live before its price.
    assert of_type("zone_status", status="live")(seen[-2]), seen


async def test_table_marks_a_stale_row_until_the_next_price(
    staling: ServerProcess, run_tail: StartTail
) -> None:
    [first] = await staling.publish({"market_zone": ZONE, "price": 40.0})
    url = f"{staling.url}{paths.history(ZONE)}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        accepted_at = (await response.json())["data"][-1]["accepted_at"]
    tail = await run_tail("--server", staling.url, "--refresh", "0.05", ZONE, "ercot")
    frame = await tail.stdout_until("connected", "STALE since")
    row = next(line for line in frame.splitlines() if line.startswith(ZONE))
    assert re.search(r"STALE since \d\d:\d\d:\d\dZ$", row), row
    assert row.endswith(f"STALE since {accepted_at[11:19]}Z"), (row, accepted_at)
    ercot = next(line for line in frame.splitlines() if line.startswith("ercot"))
    assert "STALE" not in ercot  # no price at all: nothing to go stale
    assert first["seq"] == 1

    await staling.publish({"market_zone": ZONE, "price": 41.0})
    frame = await tail.stdout_until("41.00")
    assert await tail.interrupt() == 0
    row = next(line for line in frame.splitlines() if line.startswith(ZONE))
    assert "STALE" not in row, row


async def test_json_starts_from_one_snapshot_then_every_update_once(
    server: ServerProcess, run_tail: StartTail
) -> None:
    """The first lines are the zones at one instant (the snapshot endpoint's answer), and
    the stream resumed from its cursor repeats none of them."""
    await server.publish(
        {"market_zone": "pjm", "price": 1.0}, {"market_zone": "pjm", "price": 2.0},
        {"market_zone": "ercot", "price": 3.0},
    )  # fmt: skip
    url = f"{server.url}{paths.SNAPSHOT}?zones=pjm,ercot,caiso"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        snapshot = await response.json()
    tail = await run_tail("--json", "--server", server.url, "pjm", "ercot", "caiso")
    first = [json.loads(await tail.stdout_line()) for _ in range(2)]
    assert first == [snapshot["prices"]["pjm"], snapshot["prices"]["ercot"]]
    await tail.stderr_until("pricehub tail: connected")
    await server.publish({"market_zone": "pjm", "price": 4.0})
    after = await json_until(tail, lambda line: line.get("price") == 4.0)
    assert await tail.interrupt() == 0
    assert [(line["market_zone"], line["seq"]) for line in after] == [("pjm", 3)], after


async def test_max_rate_delivers_the_newest_and_says_what_it_skipped(
    server: ServerProcess, run_tail: StartTail
) -> None:
    tail = await run_tail("--json", "--max-rate", "2", "--server", server.url, ZONE)
    await tail.stderr_until("pricehub tail: connected")
    await server.publish(*({"market_zone": ZONE, "price": float(n)} for n in range(1, 21)))
    lines = await json_until(tail, lambda line: line.get("seq") == 20)
    assert await tail.interrupt() == 0
    assert len(lines) <= 3, lines  # the first at once, then at most 2 a second
    assert sum(line.get("skipped", 0) for line in lines) == 20 - len(lines)
    assert lines[-1]["skipped"] > 0 and lines[-1]["price"] == 20.0


async def test_table_shows_how_many_updates_were_skipped(
    server: ServerProcess, run_tail: StartTail
) -> None:
    tail = await run_tail(
        "--max-rate", "1", "--refresh", "0.05", "--server", server.url, ZONE, "ercot"
    )
    await tail.stdout_until("connected")
    await server.publish(*({"market_zone": ZONE, "price": float(n)} for n in range(1, 11)))
    frame = await tail.stdout_until("connected", "10.00")
    assert await tail.interrupt() == 0
    row = next(line for line in frame.splitlines() if line.startswith(ZONE))
    skipped = re.search(r"skipped (\d+)$", row)
    assert skipped is not None and 1 <= int(skipped.group(1)) <= 9, row
