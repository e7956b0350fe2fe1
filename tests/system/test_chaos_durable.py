"""The short chaos soak on the durable embedded store (issue 23): ``python -m bench.chaos
--short --topology durable``. No Redis: one instance (``--redis-url none``) on its data dir,
on a tmpfs the soak mounts; three rounds of a burst and a SIGKILL while its replies are in
flight, a SIGTERM, and the disk full for a few seconds. About 30 s. Shared helpers:
tests/system/test_chaos_short.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.support import missing_tool
from tests.system.test_chaos_short import (
    SOAK_TIMEOUT,
    assert_contract,
    assert_exercised,
    faults_of,
    run_short_soak,
)


@pytest.mark.timeout(SOAK_TIMEOUT + 30)
def test_short_durable_soak_keeps_the_contract(tmp_path: Path) -> None:
    report = run_short_soak(tmp_path, "durable")
    assert_exercised(report, {"restart_loop", "instance_term", "disk_full"}, stream=False)
    (loop,) = faults_of(report, "restart_loop")
    assert loop["exit_codes"] == [-9, -9, -9], loop
    # Every restart resumes every client (the journal keeps epoch, seqs and history):
    # any recovered: false is an undue reset, below.
    assert all(fault["no_reset"] for fault in report["faults"]), report["faults"]
    assert report["clients"]["recovered_true"] > 0
    assert_contract(report)
    (full,) = faults_of(report, "disk_full")
    assert not (tmp_path / "chaos-durable-1" / "tmpfs").is_mount()  # unmounted at the end
    if "skipped" in full:
        missing_tool(full["skipped"])  # the rest held; the disk-full part needs root
    assert full["filled_bytes"] > 0
    assert report["publish"]["statuses"].get("503", 0) > 0  # the full disk refused publishes
