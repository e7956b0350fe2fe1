"""The short chaos soak (issue 13) as a test: ``python -m bench.chaos --short --seed 1 --json``.

It starts its own redis-server and two pricehub instances on free ports (see bench/chaos.py),
injects each fault kind once and checks what 60 resuming clients saw. About 40 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.chaos_clients import Body
from bench.chaos_faults import KINDS
from bench.chaos_stream import STREAM_NONCE_BASE, StreamLog, stream_checks
from tests.serverproc import REPO
from tests.support import missing_tool

SOAK_TIMEOUT = 150.0


def run_short_soak(out: Path) -> dict[str, Any]:
    # --out: the soak's logs and report go to the test's tmp dir, never bench/out/.
    command = [sys.executable, "-m", "bench.chaos", "--short", "--seed", "1", "--json"]
    command += ["--out", str(out)]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=SOAK_TIMEOUT, check=False
    )
    assert result.returncode == 0, f"harness failed ({result.returncode}):\n{result.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.mark.timeout(SOAK_TIMEOUT + 30)  # the suite's default (120 s) is shorter than the soak
def test_short_chaos_soak_has_no_gap_and_no_duplicate(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        missing_tool("redis-server not installed (apt-get install redis-server)")
    report = run_short_soak(tmp_path)
    counts = report["counts"]
    for name in ("undeclared_gaps", "duplicates", "conflicting_keys", "lost_accepted"):
        assert isinstance(counts[name], int), f"no count for {name}"

    # The harness really saw faults and traffic, so the zeros below mean something.
    faults = report["faults"]
    assert {fault["kind"] for fault in faults} == set(KINDS)
    assert all(fault["end"] is not None for fault in faults)
    assert all(f["clients_on_target"] > 0 for f in faults if f["kind"].startswith("instance"))
    assert report["publish"]["accepted"] > 500
    assert report["clients"]["live_deliveries"] > 5000
    assert report["clients"]["connects"] > report["config"]["clients"]  # faults made them reconnect

    assert counts["harness_exceptions"] == 0, report["clients"]["harness_exceptions"]

    examples = report["examples"]
    assert counts["undeclared_gaps"] == 0, examples["undeclared_gaps"]
    assert counts["duplicates"] == 0, examples["duplicates"]
    # Issue 13: one name per price, and acknowledged means kept.
    assert counts["conflicting_keys"] == 0, examples["conflicting_keys"]
    assert counts["lost_accepted"] == 0, examples["lost_accepted"]
    # The stream ingest under the same faults: each entry once, in stream order, none stuck.
    assert report["stream"]["delivered"] > 300, report["stream"]
    assert counts["stream_duplicates"] == 0, examples["stream_duplicates"]
    assert counts["stream_reorders"] == 0, examples["stream_reorders"]
    assert counts["stream_backlog"] == 0, report["stream"]
    assert counts["stream_lost"] == 0, examples["stream_lost"]
    # A Redis outage shorter than the hold window costs clients nothing but latency.
    for fault in faults:
        if fault["kind"].startswith("redis"):
            assert fault["mass_closes_1001"] == 0 and fault["recovered_false"] == 0, fault


def test_the_stream_checks_see_a_duplicate_a_reorder_and_a_loss() -> None:
    """(e), (f) and (h) can fail: entry 2 appended twice, entries 3 and 4 numbered
    against their stream order (the same zone in another epoch is checked apart), entry
    5 never delivered; entry 6 never delivered either, but added just before a Redis
    SIGKILL (its loss is Redis's)."""
    log = StreamLog()
    stamps = [(10, 0), (10, 1), (11, 0), (12, 0), (13, 0), (60_000, 0)]
    for tick, entry_id in enumerate(stamps, start=1):
        log.zones[STREAM_NONCE_BASE + tick] = "pjm"
        log.ids[STREAM_NONCE_BASE + tick] = entry_id
    log.backlog = 0

    def seen(seq: int, tick: int, epoch: str = "e1") -> tuple[tuple[str, str, int], Counter[Body]]:
        body: Body = (1.0, float(STREAM_NONCE_BASE + tick), "2026-12-02T00:00:00.000Z")
        return ("pjm", epoch, seq), Counter([body])

    keys = dict([seen(1, 1), seen(2, 2), seen(3, 2), seen(4, 4), seen(5, 3), seen(1, 4, "e2")])
    checked = stream_checks(keys, log, redis_kills=[61.0])
    assert checked["counts"] == {
        "stream_duplicates": 1, "stream_reorders": 1, "stream_backlog": 0, "stream_lost": 1,
    }  # fmt: skip
    assert [lost["nonce"] for lost in checked["examples"]["stream_lost"]] == [
        STREAM_NONCE_BASE + 5
    ]
    assert checked["examples"]["stream_reorders"][0]["seqs"] == [4, 5]
    assert checked["stream"]["delivered"] == 4
