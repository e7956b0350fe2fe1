"""The audience write loop alone (issue 28, item 2): ``Broadcaster.flush`` over N real
TCP sockets on 127.0.0.1, with nothing else running (no HTTP, no aiohttp, no clients'
own CPU on this process).

Run it from the repository root::

    python bench/profile_write.py            # 2,000 members, 1 zone: wall and CPU per write
    python bench/profile_write.py --zones 7 --ticks 400
    python bench/profile_write.py --cprofile # where the flush's Python time goes
    # instructions per member write, user space only (repeatable on a noisy machine):
    python bench/profile_write.py --callgrind  # runs itself twice under valgrind

Each tick publishes one price per zone to every member (one audience: everyone is on the
same zones) and calls ``flush`` directly, so the measured time is the shared writes and
their slow-consumer checks only; the peers are drained between ticks, outside the timing.
``--callgrind`` runs ``valgrind --tool=callgrind`` with ``--ticks`` and with twice as many
and divides the difference in instructions by the extra member writes, so the set-up
(imports, connecting) cancels out.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pricehub.server.fanout import broadcaster as broadcaster_module
from pricehub.server.fanout import connection as connection_module
from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.fanout.connection import SendLimits
from pricehub.server.policy.resume import ZoneStream
from pricehub.server.socket.connection import WsEncodings
from pricehub.storage import StoredPrice
from tests.harness.fanout import LineConnection

__all__ = ["main"]

ZONES = ("pjm", "ercot", "caiso", "miso", "nyiso", "isone", "spp")
# pricehub's defaults (``--send-high-water``, ``--send-hard-limit``, ``--slow-consumer-timeout``).
LIMITS = SendLimits(high_water=256 * 1024, hard_limit=1024 * 1024, lag_timeout=10.0)


class TickClock:
    """The fan-out's monotonic clock, moved on by ``1 / rate`` per tick: lag checks fall
    due every ``max_lag / 2`` of *simulated* time, as often per write as in a real run at
    ``rate`` ticks/s however slowly this runs (callgrind is ~50 times slower)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.now = time.monotonic()

    def advance(self) -> None:
        self.now += 1 / self.rate

    def install(self) -> None:
        clock = types.SimpleNamespace(monotonic=lambda: self.now, time=time.time)
        setattr(broadcaster_module, "time", clock)  # noqa: B010 (not a public name)
        setattr(connection_module, "time", clock)  # noqa: B010


Member = LineConnection  # a subscriber that only receives: what the write loop sees


async def connect(count: int) -> tuple[list[asyncio.Transport], list[socket.socket]]:
    """``count`` TCP connections over loopback: the server ends as asyncio transports."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=count)
    port = listener.getsockname()[1]
    transports, peers = [], []
    for _ in range(count):
        peer = socket.create_connection(("127.0.0.1", port))
        peer.setblocking(False)
        ours, _address = listener.accept()
        transport, _protocol = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        transports.append(transport)
        peers.append(peer)
    listener.close()
    await asyncio.sleep(0)  # connection_made and add_reader run
    return transports, peers


def drain(peers: list[socket.socket]) -> None:
    for peer in peers:
        try:
            while peer.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def build(transports: list[asyncio.Transport], zones: tuple[str, ...]) -> Broadcaster:
    broadcaster = Broadcaster(zones=zones)
    encodings = WsEncodings()
    broadcaster.register(*encodings.all())
    for transport in transports:
        member = Member(
            encoding=encodings.plain, transport=transport, scheduler=broadcaster, limits=LIMITS
        )
        broadcaster.add(member)
        for zone in zones:
            member.streams[zone] = ZoneStream(zone)
            member.streams[zone].finish(delivered_up_to=0)
            broadcaster.subscribe(zone, member)
    broadcaster.flush()  # everyone joins the one audience
    assert len(broadcaster._audiences) == 1
    return broadcaster


def payload(zone: str, seq: int) -> bytes:
    """A price's payload as the storage hands it over (~120 bytes framed, as the bench)."""
    return (
        b'{"market_zone":"%s","price":%d.25,"volume":%d,"seq":%d,'
        b'"timestamp":"2026-12-08T00:00:00Z"}' % (zone.encode(), 40 + seq % 7, seq * 1000, seq)
    )


def tick(broadcaster: Broadcaster, zones: tuple[str, ...], seq: int) -> None:
    for zone in zones:
        broadcaster.on_price(StoredPrice(zone, seq, payload(zone, seq)))
    broadcaster.flush()


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> None:
    zones = ZONES[: args.zones]
    clock = TickClock(args.rate)
    clock.install()
    transports, peers = await connect(args.clients)
    broadcaster = build(transports, zones)
    profile = cProfile.Profile() if args.cprofile else None
    wall = spent = 0.0
    for seq in range(1, args.ticks + 1):
        clock.advance()
        started, before = time.perf_counter(), cpu()
        if profile is not None:
            profile.enable()
        tick(broadcaster, zones, seq)
        if profile is not None:
            profile.disable()
        wall += time.perf_counter() - started
        spent += cpu() - before
        if args.drain and seq % 16 == 0:
            drain(peers)
        await asyncio.sleep(0)  # the flush call_soon scheduled (now a no-op) runs here
    writes = args.ticks * args.clients
    print(
        f"{args.clients} members x {args.ticks} ticks, {len(zones)} zone(s): "
        f"{wall / writes * 1e6:.3f} us wall, {spent / writes * 1e6:.3f} us CPU per member write"
    )
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    for transport in transports:
        transport.close()
    for peer in peers:
        peer.close()


def instructions(args: argparse.Namespace, ticks: int) -> int:
    """User-space instructions of one whole run of this script under callgrind."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "callgrind.out")
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, __file__, "--clients", str(args.clients), "--zones",
            str(args.zones), "--ticks", str(ticks), "--rate", str(args.rate), "--no-drain",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", done.stderr)
        assert found is not None, done.stderr[-2000:]
        return int(found.group(1))


def callgrind(args: argparse.Namespace) -> None:
    base, doubled = instructions(args, args.ticks), instructions(args, 2 * args.ticks)
    per_write = (doubled - base) / (args.ticks * args.clients)
    print(
        f"callgrind: {args.clients} members, {len(ZONES[: args.zones])} zone(s): "
        f"{per_write:.0f} instructions per member write (user space)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--zones", type=int, default=1, choices=range(1, len(ZONES) + 1))
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="simulated ticks/s (20)")
    parser.add_argument("--cprofile", action="store_true")
    # A few hundred ticks of ~130 bytes fit the loopback buffers: callgrind's runs need
    # no draining (whose recv exceptions would be counted as the loop's instructions).
    parser.add_argument("--no-drain", dest="drain", action="store_false")
    parser.add_argument("--callgrind", action="store_true")
    args = parser.parse_args()
    if args.callgrind:
        callgrind(args)
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
