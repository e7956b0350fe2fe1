"""pricehub.server.runner: process-level settings of a serving instance."""

from __future__ import annotations

import subprocess
import sys

from pricehub.server.runner import GC_YOUNG_THRESHOLD

# Run in a child: freezing the collector's view is process-wide and must not leak into
# the rest of the suite.
_PROBE = """
import gc
from pricehub.server.runner import settle_heap
survivor = [object() for _ in range(1000)]
before = gc.get_freeze_count()
settle_heap()
print(before, gc.get_freeze_count(), gc.get_threshold()[0])
"""


def test_settle_heap_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True, timeout=60
    ).stdout.split()
    before, after, young = (int(value) for value in out)
    assert before == 0
    assert after >= 1000  # at least the survivors made before it
    assert young == GC_YOUNG_THRESHOLD > 700
