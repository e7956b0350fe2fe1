"""The short chaos soak on Redis Sentinel (issue 23): ``python -m bench.chaos --short
--topology sentinel``. A master, a replica and three sentinels; two instances on a
``redis+sentinel://`` URL; the master SIGKILLed right after a burst (promotion), the master
SIGSTOPped past ``down-after``, a sentinel killed, an instance SIGTERMed and one SIGKILLed.
About 50 s. Shared helpers: tests/system/test_chaos_short.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.test_chaos_short import (
    SOAK_TIMEOUT,
    assert_contract,
    assert_exercised,
    faults_of,
    require,
    run_short_soak,
)


@pytest.mark.timeout(SOAK_TIMEOUT + 30)
def test_short_sentinel_soak_keeps_the_contract(tmp_path: Path) -> None:
    require("redis-server")
    report = run_short_soak(tmp_path, "sentinel")
    kinds = {"master_kill", "master_pause", "sentinel_kill", "instance_term", "instance_kill"}
    assert_exercised(report, kinds, stream=True)
    (kill,) = faults_of(report, "master_kill")
    assert kill["master_after"] != kill["node"], kill  # the replica was promoted
    assert kill["no_reset"], kill  # the promotion took less than the hold
    # Asynchronous replication may lose what the dead master acknowledged: then declared
    # (declared_replication_loss), never silent (lost_accepted, double_acks: 0 below).
    assert_contract(report)
