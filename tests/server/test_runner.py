"""pricehub.server.runner: process-level settings of a serving instance."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from pricehub.server.runner import GC_YOUNG_THRESHOLD
from tests.harness.serverproc import ServerProcess

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


# A cycle that outlived two young passes (in the oldest generation), then dropped: only
# a full collection frees it, and on a frozen heap the thresholds almost never run one.
_OLD_CYCLE_PROBE = """
import asyncio, gc, weakref
from pricehub.server.runner import collect_periodically, settle_heap
settle_heap()
class Node:
    pass
node = Node()
node.self = node
gone = weakref.ref(node)
gc.collect(1)
gc.collect(1)
del node
async def main():
    task = asyncio.create_task(collect_periodically(interval=0.05))
    async with asyncio.timeout(5):
        while gone() is not None:
            await asyncio.sleep(0.01)
    task.cancel()
asyncio.run(main())
print("freed")
"""


def test_old_cyclic_garbage_is_freed_by_the_periodic_full_collection() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _OLD_CYCLE_PROBE], capture_output=True, text=True, timeout=60
    )
    lines = result.stdout.splitlines()
    assert lines and lines[-1] == "freed", result.stdout + result.stderr
    logged = [line for line in lines if "gc_full_collection" in line]
    assert logged and "stall_ms=" in logged[0], lines  # each pass says what it cost


def unparsable_request(port: int) -> None:
    """256 KiB of NULs: aiohttp answers 400, and its parse error (the bytes read and
    their repr in a traceback's frame) is cyclic garbage, ~1.7 MB of it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    with sock, contextlib.suppress(OSError):
        sock.sendall(b"\0" * (256 << 10))
        while sock.recv(65536):
            pass


def test_garbage_of_requests_it_cannot_parse_is_collected() -> None:
    """With a young threshold of 50,000 the collector saw too few tracked objects to run
    and 800 such requests took the server 1.3 GB; collected, it stays a fraction."""
    with ServerProcess("--no-simulate") as server:
        baseline = server.memory_kib()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(unparsable_request, [server.port] * 800))
        grown = server.memory_kib("VmHWM") - baseline
        assert grown < 500 << 10, f"the server grew by {grown} KiB"
