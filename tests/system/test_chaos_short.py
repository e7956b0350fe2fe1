"""The short chaos soak (issues 13, 23) as tests: ``python -m bench.chaos --short --seed 1``.

Each soak starts its own processes on free ports (see bench/chaos.py), injects each fault kind
of its topology once and checks what 60 resuming clients saw: about 50 s each. This file runs
the ``single`` topology (one Redis, two instances) and holds what the other topologies'
files (``tests/test_chaos_<topology>.py``) share: ``run_short_soak``, ``assert_contract``.
Below them, the checks themselves are shown to fail on made-up observations.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.chaos_analysis import analyse
from bench.chaos_clients import Body, Recorder, ResumingClient, Span
from bench.chaos_faults import KINDS, Fault, FaultPlan
from bench.chaos_publisher import Accepted, PublishLog
from bench.chaos_stream import STREAM_NONCE_BASE, StreamLog, stream_checks
from tests.harness.serverproc import REPO
from tests.harness.support import missing_tool

SOAK_TIMEOUT = 150.0
# The contract's promises, all 0 on every topology (bench/README.md, "Chaos soak").
CONTRACT = (
    "undeclared_gaps", "duplicates", "conflicting_keys", "lost_accepted", "double_acks",
    "undue_resets", "stream_duplicates", "stream_reorders", "stream_backlog", "stream_lost",
)  # fmt: skip


def require(*tools: str) -> None:
    """Skip (fail under ``CI=true``) without the tools a topology runs."""
    for tool in tools:
        if shutil.which(tool) is None:
            missing_tool(f"{tool} not installed (apt-get install redis-server redis-tools)")


def run_short_soak(out: Path, topology: str) -> dict[str, Any]:
    # --out: the soak's logs and report go to the test's tmp dir, never bench/out/.
    command = [sys.executable, "-m", "bench.chaos", "--short", "--seed", "1", "--json"]
    command += ["--topology", topology, "--out", str(out)]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=SOAK_TIMEOUT, check=False
    )
    assert result.returncode == 0, f"harness failed ({result.returncode}):\n{result.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["config"]["topology"] == topology
    return report


def faults_of(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [fault for fault in report["faults"] if fault["kind"] == kind]


def assert_exercised(report: dict[str, Any], kinds: set[str], *, stream: bool) -> None:
    """The harness really saw every fault and traffic, so the zeros mean something."""
    faults = report["faults"]
    assert {fault["kind"] for fault in faults} == kinds
    assert all(fault["end"] is not None for fault in faults)
    assert all(f["clients_on_target"] > 0 for f in faults if "clients_on_target" in f)
    for fault in faults:
        if KINDS[fault["kind"]].burst:  # the fault met the burst half-answered
            assert fault["burst_sent_before_fault"] > 0, fault
            assert fault["burst_answered_before_fault"] < fault["burst_sent_before_fault"], fault
    assert report["publish"]["accepted"] > 400, report["publish"]
    assert report["clients"]["live_deliveries"] > 5000
    assert report["clients"]["connects"] > report["config"]["clients"]  # faults made them reconnect
    assert report["counts"]["harness_exceptions"] == 0, report["clients"]["harness_exceptions"]
    if stream:
        assert report["stream"]["delivered"] > 300, report["stream"]


def assert_contract(report: dict[str, Any]) -> None:
    """Every promise of the contract held: each counter 0, its examples in the message."""
    counts, examples = report["counts"], report["examples"]
    broken = {name: examples.get(name, report.get("stream")) for name in CONTRACT if counts[name]}
    assert not broken, json.dumps({"counts": counts, "examples": broken}, indent=1)[:6000]
    # The two declared-loss counters are context: a declaration is allowed, never silence.
    assert {"declared_replication_loss", "declared_loss_other"} <= set(counts)


@pytest.mark.timeout(SOAK_TIMEOUT + 30)  # the suite's default (120 s) is shorter than the soak
def test_short_chaos_soak_has_no_gap_and_no_duplicate(tmp_path: Path) -> None:
    require("redis-server")
    report = run_short_soak(tmp_path, "single")
    kinds = {"redis_kill", "redis_kill_burst", "redis_pause_short", "redis_pause_long",
             "outage_restarts", "instance_term", "instance_kill"}  # fmt: skip
    assert_exercised(report, kinds, stream=True)
    (restarts,) = faults_of(report, "outage_restarts")
    assert restarts["exit_codes"] == [-9, -9], restarts  # both instances, while Redis was down
    assert restarts["restarted_after"] < restarts["outage"], restarts
    # A Redis outage shorter than the hold window costs clients nothing but latency.
    assert all(f["no_reset"] for f in report["faults"] if f["kind"].startswith("redis"))
    assert_contract(report)


# --- the checks can fail --------------------------------------------------------------


def test_the_stream_checks_see_a_duplicate_a_reorder_and_a_loss() -> None:
    """(e), (f) and (h) can fail: entry 2 appended twice, entries 3 and 4 numbered
    against their stream order (the same zone in another epoch is checked apart), entry
    5 never delivered; entry 6 never delivered either, but added just before a Redis
    SIGKILL (its loss is Redis's); entry 7, added just before it too, appended twice: a
    duplicate like any other (issue 23: the write-back settles a lost replication's entry,
    so that edge no longer excuses a repeat)."""
    log = StreamLog()
    stamps = [(10, 0), (10, 1), (11, 0), (12, 0), (13, 0), (60_000, 0), (60_500, 0)]
    for tick, entry_id in enumerate(stamps, start=1):
        log.zones[STREAM_NONCE_BASE + tick] = "pjm"
        log.ids[STREAM_NONCE_BASE + tick] = entry_id
    log.backlog = 0

    def seen(seq: int, tick: int, epoch: str = "e1") -> tuple[tuple[str, str, int], Counter[Body]]:
        body: Body = (1.0, float(STREAM_NONCE_BASE + tick), "2026-12-02T00:00:00.000Z")
        return ("pjm", epoch, seq), Counter([body])

    keys = dict([
        seen(1, 1), seen(2, 2), seen(3, 2), seen(4, 4), seen(5, 3), seen(1, 4, "e2"),
        seen(6, 7), seen(7, 7),
    ])  # fmt: skip
    checked = stream_checks(keys, log, redis_kills=[61.0])
    assert checked["counts"] == {
        "stream_duplicates": 2, "stream_reorders": 1, "stream_backlog": 0, "stream_lost": 1,
    }  # fmt: skip
    assert [d["seqs"] for d in checked["examples"]["stream_duplicates"]] == [[2, 3], [6, 7]]
    assert [lost["nonce"] for lost in checked["examples"]["stream_lost"]] == [
        STREAM_NONCE_BASE + 5
    ]
    assert checked["examples"]["stream_reorders"][0]["seqs"] == [4, 5]
    assert checked["stream"]["delivered"] == 5


T0 = 1_000.0  # made-up observations start here (seconds)


def body(nonce: int) -> Body:
    return (1.0, float(nonce), f"ts-{nonce}")


def accept(log: PublishLog, nonce: int, seq: int, at: float, *, zone: str = "pjm") -> None:
    log.sent_at[nonce] = at - 0.01
    log.accepted.append(Accepted(nonce, zone, seq, 0, body(nonce), at - 0.01, at))


def fault(kind: str, start: float, end: float, *, no_reset: bool = True) -> Fault:
    return Fault(FaultPlan(kind, 0, 0.0, 1.0), start=start, end=end, no_reset=no_reset)


def analysed(recorder: Recorder, log: PublishLog, faults: list[Fault]) -> dict[str, Any]:
    return analyse(recorder, log, faults, origin=T0, servers={}, stream=None)


def test_two_202s_for_one_seq_are_counted_and_a_declared_loss_is_not_a_silent_one() -> None:
    """(i) double_acks and (d) against declared losses, in epoch E then F (changed at 7 s):
    nonces 2 and 3 were both told pjm seq 2 in E (2 received, 3 not: the race of issue 23);
    nonce 8 (seq 3) was lost with a client following the zone and nothing said (silent);
    nonce 4 (seq 4) was lost during a master failover whose recovery ended epoch E
    (declared); nonce 6 (seq 1 of F) was lost during a Redis kill and a ``gap`` named it
    (declared)."""
    recorder, log = Recorder(), PublishLog()
    recorder.epoch_events[0] = [(T0, "E"), (T0 + 7.0, "F")]
    for nonce, seq in ((1, 1), (2, 2)):
        recorder.observe("pjm", "E", {"seq": seq, "price": 1.0, "volume": nonce,
                                      "timestamp": f"ts-{nonce}"})  # fmt: skip
    for nonce, seq, at in ((1, 1, 1), (2, 2, 2), (3, 2, 2.5), (8, 3, 3), (4, 4, 5.2),
                           (6, 1, 12.1)):  # fmt: skip
        accept(log, nonce, seq, T0 + at)
    recorder.declared_gaps.append({"zone": "pjm", "epoch": "F", "from_seq": 1, "to_seq": 1})
    recorder.spans.append(Span(client=1, zone="pjm", epoch="E", start=T0, end=T0 + 7))
    recorder.spans.append(Span(client=1, zone="pjm", epoch="F", start=T0 + 7, end=T0 + 30))
    faults = [fault("master_kill", T0 + 5, T0 + 6), fault("redis_kill", T0 + 12, T0 + 13)]
    report = analysed(recorder, log, faults)
    counts = report["counts"]
    assert counts["double_acks"] == 1
    (doubled,) = report["examples"]["double_acks"]
    assert (doubled["zone"], doubled["epoch"], doubled["seq"]) == ("pjm", "E", 2)
    assert [a["nonce"] for a in doubled["answers"]] == [2, 3]
    assert counts["conflicting_keys"] == 1
    assert counts["declared_replication_loss"] == 1  # nonce 4, declared by the epoch change
    assert counts["declared_loss_other"] == 1  # nonce 6, declared by the gap
    by_nonce = {loss["nonce"]: loss["declared_by"] for loss in report["examples"]["declared_loss"]}
    assert by_nonce == {4: "epoch_change", 6: "gap"}
    assert [loss["nonce"] for loss in report["examples"]["lost_accepted"]] == [3, 8]


def test_an_epoch_change_only_declares_a_loss_of_its_own_fault() -> None:
    """An epoch that ends long after the fault a 202 was answered in (outside its window
    and the 5 s after it) does not excuse that loss: it stays lost_accepted."""
    recorder, log = Recorder(), PublishLog()
    recorder.epoch_events[0] = [(T0, "E"), (T0 + 30.0, "F")]
    accept(log, 1, 1, T0 + 5.5)
    recorder.spans.append(Span(client=1, zone="pjm", epoch="E", start=T0, end=T0 + 29))
    report = analysed(recorder, log, [fault("master_kill", T0 + 5, T0 + 6)])
    assert report["counts"]["lost_accepted"] == 1
    assert report["counts"]["declared_replication_loss"] == 0


def test_resets_in_a_short_outage_are_undue_unless_a_failover_declared_a_loss() -> None:
    """(j): resets charged to a fault that promises none are counted (a Redis pause, a
    Redis kill that also lost a price and declared it: a lone instance's declaration is no
    excuse for an outage shorter than the hold); a master failover that declared a loss may
    reset; a fault that stops instances promises nothing."""
    recorder, log = Recorder(), PublishLog()
    recorder.epoch_events[0] = [(T0, "E"), (T0 + 23.0, "F"), (T0 + 43.0, "G")]
    recorder.not_recovered += [(T0 + 2.0, 0, "pjm"), (T0 + 2.1, 0, "ercot")]  # the pause
    recorder.not_recovered.append((T0 + 23.5, 0, "pjm"))  # the kill, which declared a loss
    recorder.closes.append((T0 + 43.5, 0, 1001))  # the failover, which declared a loss
    recorder.not_recovered.append((T0 + 61.0, 0, "pjm"))  # the instance kill
    accept(log, 1, 1, T0 + 21.0)
    accept(log, 2, 2, T0 + 41.0)
    faults = [
        fault("redis_pause_short", T0 + 1, T0 + 2),
        fault("redis_kill", T0 + 20, T0 + 22),
        fault("master_kill", T0 + 40, T0 + 42),
        fault("instance_kill", T0 + 60, T0 + 61, no_reset=False),
    ]
    report = analysed(recorder, log, faults)
    assert report["counts"]["undue_resets"] == 3
    assert [f["kind"] for f in report["examples"]["undue_resets"]] == [
        "redis_pause_short", "redis_kill"
    ]  # fmt: skip


async def test_a_gap_message_declares_the_jump_it_names() -> None:
    """A client told ``gap`` 3..4 takes the jump from 2 to 5 as declared; the jump from 5
    to 8 that no ``gap`` named is an undeclared gap (a). The gap's own ``epoch`` (the
    client's old one) does not become the socket's epoch."""
    recorder = Recorder()
    client = ResumingClient(0, ("pjm",), multi=False, instances=["ws://x"], recorder=recorder,
                            rng=random.Random(0))  # fmt: skip
    client.conn_epoch = "E"

    async def send(message: dict[str, Any]) -> None:
        await client._handle(None, message)  # type: ignore[arg-type]  # no socket needed

    def price(seq: int) -> dict[str, Any]:
        return {"type": "price_update", "market_zone": "pjm", "seq": seq, "price": 1.0,
                "volume": seq, "timestamp": "t"}  # fmt: skip

    for seq in (1, 2):
        await send(price(seq))
    await send({"type": "gap", "market_zone": "pjm", "from_seq": 3, "to_seq": 4,
                "reason": "lost", "epoch": "OLD"})  # fmt: skip
    assert client.conn_epoch == "E"
    await send(price(5))
    assert recorder.gaps == []
    await send(price(8))
    assert [gap["missing"] for gap in recorder.gaps] == [2]
    assert recorder.declared_gaps[0]["epoch"] == "OLD"
