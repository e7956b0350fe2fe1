"""The short chaos soak on Redis Cluster (issue 23): ``python -m bench.chaos --short
--topology cluster``. Three masters and three replicas; two instances on a
``redis+cluster://`` URL (no ``wait_replicas``); a zone's master SIGKILLed right after a burst
(its replica promoted), a master SIGSTOPped, a busy zone's slot migrated under load
(SETSLOT/MIGRATE), an instance SIGKILLed. About 50 s. Shared helpers:
tests/system/test_chaos_short.py.
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
def test_short_cluster_soak_keeps_the_contract(tmp_path: Path) -> None:
    require("redis-server", "redis-cli")
    report = run_short_soak(tmp_path, "cluster")
    assert_exercised(
        report, {"master_kill", "master_pause", "slot_migration", "instance_kill"}, stream=True
    )
    (migration,) = faults_of(report, "slot_migration")
    assert migration["keys_moved"] > 0 and migration["to"] != migration["node"], migration
    (kill,) = faults_of(report, "master_kill")
    assert kill["no_reset"], kill  # the replica took over within the hold
    # Without wait_replicas a failover may lose what the dead master acknowledged: then
    # declared (declared_replication_loss), never silent (lost_accepted, double_acks: 0).
    assert_contract(report)
