"""One load-client process: many picows WebSocket subscribers, measured, driven over stdin/stdout.

Started by ``bench/run.py`` (several processes per run, so the client side is not what limits a
server). Talks JSON lines:

* stdout ``{"event": "ready"}`` once imported; stdin ``{"cmd": "connect"}`` then opens the
  connections (so that every process starts its handshakes at the same moment) and stdout
  ``{"event": "connected", ...}`` follows once every attempt has finished;
* stdin ``{"cmd": "report", "window": [t0, t1], "ranges": {"pjm": [lo, hi]}}`` answers
  ``{"event": "report", ...}``: deliveries received inside the CPU window, latency histogram and
  loss over the measured seq ranges;
* stdin ``{"cmd": "resume"}`` lets stalled (``--stall``) connections read again;
* stdin ``{"cmd": "exit"}`` or end of stdin closes everything and exits.

Publish-to-receive latency: the publisher writes its send time, in microseconds since the run's
``--t0`` (wall clock, shared by every process on the machine), into ``volume``; receive time
minus that is the latency, read in the frame callback before anything else is done.

``--protocol`` is how the price objects arrive (the counting is the same for all):

* ``plain`` (pricehub, the baselines, the ``ws`` and uWS peers): JSON text frames,
  ``{"type": "price_update", ...}``; the URL names the zones;
* ``socketio`` (Engine.IO v4 / Socket.IO 5): the server's OPEN ``0{...}``, the client's
  CONNECT ``40{"zones": [...]}`` (``--zones``), the server's CONNECT answer ``40{...}``, then
  events ``42["price", {...}]``; a ping ``2`` is answered with a pong ``3``;
* ``pusher`` (Pusher protocol 7, soketi): ``pusher:connection_established``, then one
  ``pusher:subscribe`` per zone (``--zones``, the channel is the zone) and its
  ``pusher_internal:subscription_succeeded``; events ``{"event": "price", "channel": ...,
  "data": "<the price object as a JSON string>"}``; ``pusher:ping`` gets ``pusher:pong``.

A connection counts as connected once it is subscribed: for ``plain`` when its WebSocket
handshake is done, for the others when the server has confirmed every zone.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
import struct
import sys
import time
from array import array
from collections import Counter
from datetime import datetime
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

__all__ = [
    "HISTOGRAM_STEPS",
    "PROTOCOLS",
    "PusherSubscriber",
    "Recorder",
    "SocketIOSubscriber",
    "Subscriber",
    "bucket_value",
]

# Latency histogram resolution: buckets of log(µs) * HISTOGRAM_STEPS, i.e. about 0.5 % wide.
HISTOGRAM_STEPS = 200
# A seq below (first seq seen - this) is not tracked for loss; only stale replays could be there.
SEQ_SLACK = 1024
# A stalled reader advertises a small receive buffer and MSS, as a client behind a slow link
# would. Over loopback (64 KiB MSS) the server's kernel send buffer would otherwise autotune to
# ~4 MiB and swallow minutes of updates before the server itself ever saw a backlog; with these
# it holds ~40 KiB, so the backlog reaches the server's own buffers within seconds.
STALL_RCVBUF = 1024
STALL_MSS = 536
NO_CLOSE_FRAME = 1006


def bucket_value(bucket: int) -> float:
    """Latency in µs at the middle of a histogram bucket."""
    return math.exp((bucket + 0.5) / HISTOGRAM_STEPS)


class Recorder:
    """Every price frame this process receives: flat arrays, appended in the frame callback."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.zone_names: list[str] = []
        self.zone_index: dict[str, int] = {}
        self.seq_base: list[int] = []
        self.zone = array("B")
        self.seq = array("q")
        self.received_at = array("d")
        self.latency_us = array("d")
        # pricehub's ``accepted_at`` of each (zone index, seq), parsed once per price per
        # process (every connection gets the same one): the accepted -> received lag.
        self.accepted_at: dict[tuple[int, int], float] = {}

    def zone_of(self, name: str, seq: int) -> int:
        """Index of a zone; registers it, and its seq base for the loss bitmaps, on first sight."""
        index = self.zone_index.get(name)
        if index is None:
            index = self.zone_index[name] = len(self.zone_names)
            self.zone_names.append(name)
            self.seq_base.append(max(0, seq - SEQ_SLACK))
        return index

    def add(self, zone: int, seq: int, now: float, sent_us: float) -> None:
        self.zone.append(zone)
        self.seq.append(seq)
        self.received_at.append(now)
        self.latency_us.append((now - self.t0) * 1e6 - sent_us)


class NotSubscribed(Exception):
    """The server refused the subscription, or the connection ended before it was confirmed."""


class Subscriber(WSListener):
    """One connection: which seqs of each zone arrived, in what order, and how it ended.

    This class speaks the plain protocol; the others override ``on_text`` (and ``on_open``)."""

    def __init__(self, recorder: Recorder, zones: list[str]) -> None:
        self.recorder = recorder
        self.zones = zones
        self.seen: dict[int, bytearray] = {}
        self.last_seq: dict[int, int] = {}
        self.out_of_order = 0
        self.duplicates = 0
        self.conflated = 0
        self.close_code: int | None = None
        self.transport: WSTransport | None = None
        # Set once the server has confirmed the subscription, or refused it (``refusal``).
        self.answered = asyncio.Event()
        self.refusal: str | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.on_open()

    def on_open(self) -> None:
        self.confirm()  # the URL named the zones: subscribed with the handshake

    def confirm(self) -> None:
        self.answered.set()

    def refuse(self, reason: str) -> None:
        if not self.answered.is_set():
            self.refusal = reason
            self.answered.set()

    async def wait_subscribed(self, within: float) -> None:
        await asyncio.wait_for(self.answered.wait(), within)
        if self.refusal is not None:
            raise NotSubscribed(self.refusal)

    def send_text(self, text: bytes) -> None:
        if self.transport is not None:
            self.transport.send(WSMsgType.TEXT, text)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            now = time.time()
            self.on_text(frame.get_payload_as_memoryview(), now)
        elif frame.msg_type is WSMsgType.CLOSE:
            payload = frame.get_payload_as_bytes()
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_text(self, payload: memoryview, now: float) -> None:
        message = orjson.loads(payload)
        if message.get("type") == "price_update":
            self._price(message, now)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.close_code is None:
            self.close_code = NO_CLOSE_FRAME
        self.refuse(f"closed ({self.close_code}) before the subscription was confirmed")

    def _price(self, message: dict[str, Any], now: float) -> None:
        recorder = self.recorder
        seq: int = message["seq"]
        zone = recorder.zone_of(message["market_zone"], seq)
        recorder.add(zone, seq, now, message["volume"])
        accepted = message.get("accepted_at")
        if accepted and (zone, seq) not in recorder.accepted_at:
            recorder.accepted_at[(zone, seq)] = datetime.fromisoformat(accepted).timestamp()
        if message.get("conflated"):
            self.conflated += 1
        if seq <= self.last_seq.get(zone, -1):
            self.out_of_order += 1
        self.last_seq[zone] = seq
        offset = seq - recorder.seq_base[zone]
        if offset < 0:
            return
        seen = self.seen.setdefault(zone, bytearray())
        if offset >= len(seen):
            seen.extend(bytes(offset + SEQ_SLACK - len(seen)))
        if seen[offset]:
            self.duplicates += 1
        seen[offset] = 1

    def expects(self, name: str) -> bool:
        """Whether this connection subscribed to zone ``name`` (a plain connection whose URL
        named its zones expects every zone the driver asks about)."""
        return not self.zones or name in self.zones

    def missing(self, zone: int, low: int, high: int) -> int:
        """How many seqs of ``[low, high]`` this connection never received."""
        base = self.recorder.seq_base[zone]
        seen = self.seen.get(zone, bytearray())
        return (high - low + 1) - seen[max(0, low - base) : high - base + 1].count(1)


class SocketIOSubscriber(Subscriber):
    """Engine.IO v4 / Socket.IO 5 on the WebSocket transport, the default namespace."""

    def on_open(self) -> None:
        pass  # the server speaks first (OPEN)

    def on_text(self, payload: memoryview, now: float) -> None:
        head = payload[:2].tobytes()  # packet type (and for MESSAGE, the socket.io type)
        if head == b"42":  # MESSAGE + EVENT: ["name", data]
            name, data = orjson.loads(payload[2:])
            if name == "price":
                self._price(data, now)
        elif head == b"2":  # PING
            self.send_text(b"3")
        elif head[:1] == b"0":  # OPEN {"sid", "pingInterval", ...}: join, naming the zones
            self.send_text(b"40" + orjson.dumps({"zones": self.zones}))
        elif head == b"40":  # CONNECT answer: in the zones' rooms
            self.confirm()
        elif head == b"44":  # CONNECT_ERROR
            self.refuse("socket.io connect error: " + payload[2:202].tobytes().decode())


class PusherSubscriber(Subscriber):
    """Pusher protocol 7: one public channel per zone."""

    def __init__(self, recorder: Recorder, zones: list[str]) -> None:
        super().__init__(recorder, zones)
        self.pending = set(zones)  # channels not confirmed yet

    def on_open(self) -> None:
        pass  # the server speaks first (connection_established)

    def on_text(self, payload: memoryview, now: float) -> None:
        message = orjson.loads(payload)
        event = message.get("event")
        if event == "price":  # data is the price object as a JSON string
            self._price(orjson.loads(message["data"]), now)
        elif event == "pusher:ping":
            self.send_text(b'{"event":"pusher:pong","data":{}}')
        elif event == "pusher:connection_established":
            for zone in self.zones:
                subscribe = {"event": "pusher:subscribe", "data": {"channel": zone}}
                self.send_text(orjson.dumps(subscribe))
        elif event in ("pusher_internal:subscription_succeeded", "pusher:subscription_succeeded"):
            self.pending.discard(message.get("channel"))
            if not self.pending:
                self.confirm()
        elif event == "pusher:error":
            self.refuse("pusher error: " + str(message.get("data"))[:200])


PROTOCOLS: dict[str, type[Subscriber]] = {
    "plain": Subscriber,
    "socketio": SocketIOSubscriber,
    "pusher": PusherSubscriber,
}


def report(
    recorder: Recorder, subscribers: list[Subscriber], window: list[float], ranges: dict[str, Any]
) -> dict[str, Any]:
    """What the driver asked for: deliveries in the CPU window, latency and loss over the ranges."""
    start, stop = window
    in_window = sum(1 for moment in recorder.received_at if start <= moment <= stop)
    wanted = {
        recorder.zone_index[name]: (low, high)
        for name, (low, high) in ranges.items()
        if name in recorder.zone_index
    }
    histogram: Counter[int] = Counter()
    accepted_histogram: Counter[int] = Counter()  # pricehub's accepted_at -> received
    worst = 0.0
    measured = 0
    accepted_at = recorder.accepted_at
    rows = zip(recorder.zone, recorder.seq, recorder.latency_us, recorder.received_at,
               strict=True)  # fmt: skip
    for zone, seq, latency, received in rows:
        bounds = wanted.get(zone)
        if bounds is None or not bounds[0] <= seq <= bounds[1]:
            continue
        measured += 1
        worst = max(worst, latency)
        histogram[int(math.log(max(latency, 1.0)) * HISTOGRAM_STEPS)] += 1
        accepted = accepted_at.get((zone, seq))
        if accepted is not None:
            lag_us = (received - accepted) * 1e6
            accepted_histogram[int(math.log(max(lag_us, 1.0)) * HISTOGRAM_STEPS)] += 1
    # A connection that never saw a zone still expected all of it.
    all_zones = {name: recorder.zone_of(name, low) for name, (low, _high) in ranges.items()}
    missing = [
        sum(
            sub.missing(all_zones[name], low, high)
            for name, (low, high) in ranges.items()
            if sub.expects(name)
        )
        for sub in subscribers
    ]
    return {
        "event": "report",
        "connections": len(subscribers),
        "deliveries_in_window": in_window,
        "measured_deliveries": measured,
        "histogram": {str(bucket): count for bucket, count in histogram.items()},
        "accepted_histogram": {str(b): count for b, count in accepted_histogram.items()},
        "max_latency_us": worst,
        "missing": sum(missing),
        "clients_with_loss": sum(1 for count in missing if count),
        "out_of_order": sum(sub.out_of_order for sub in subscribers),
        "duplicates": sum(sub.duplicates for sub in subscribers),
        "conflated": sum(sub.conflated for sub in subscribers),
        "frames": len(recorder.seq),
        "close_codes": dict(Counter(str(sub.close_code) for sub in subscribers if sub.close_code)),
    }


def emit(event: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(event) + b"\n")
    sys.stdout.flush()


def stalled_socket(_url: object) -> socket.socket:
    """The (unconnected) socket of a reader that will stop reading: see STALL_RCVBUF."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALL_RCVBUF)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, STALL_MSS)
    return sock


async def connect_all(
    args: argparse.Namespace, recorder: Recorder
) -> tuple[list[Subscriber], dict[str, Any]]:
    """Open ``--connections`` sockets, at most ``--concurrency`` handshakes in flight."""
    gate = asyncio.Semaphore(args.concurrency)
    kind = PROTOCOLS[args.protocol]
    zones = args.zones.split(",") if args.zones else []
    cycle = args.cycle_zones.split(",") if args.cycle_zones else []
    # Loopback has one ephemeral port range per (source, destination) pair: tens of thousands
    # of sockets need their own source address per process (127.0.0.0/8 is all loopback).
    local = {"local_addr": (args.source_address, 0)} if args.source_address else {}
    subscribers: list[Subscriber] = []
    errors: Counter[str] = Counter()
    started = time.time()

    async def one(index: int) -> None:
        async with gate:
            url, mine = args.url, zones
            if cycle:  # connection i opens zone i mod n: one process, many one-zone sockets
                mine = [cycle[index % len(cycle)]]
                url = args.url.replace("{zone}", mine[0])
            subscriber = kind(recorder, mine)
            try:
                transport, _listener = await ws_connect(
                    lambda: subscriber,
                    url,
                    websocket_handshake_timeout=args.handshake_timeout,
                    socket_factory=stalled_socket if args.stall else None,
                    **local,
                )
                await subscriber.wait_subscribed(args.handshake_timeout)
            except Exception as exc:  # any failure is counted, and shown by kind
                errors[type(exc).__name__ + ": " + str(exc)[:120]] += 1
                if subscriber.transport is not None:
                    subscriber.transport.disconnect(graceful=False)
                return
            # A stalled reader stops only once subscribed (for socketio and pusher, after
            # the exchange that subscribes it), so that it is a subscriber that stopped.
            if args.stall:
                transport.underlying_transport.pause_reading()
            subscribers.append(subscriber)

    await asyncio.gather(*(one(index) for index in range(args.connections)))
    return subscribers, {
        "event": "connected",
        "ok": len(subscribers),
        "failed": sum(errors.values()),
        "errors": dict(errors.most_common(3)),
        "started": started,
        "finished": time.time(),
    }


async def serve_commands(
    recorder: Recorder, subscribers: list[Subscriber], commands: asyncio.StreamReader
) -> None:
    while line := await commands.readline():
        command = orjson.loads(line)
        match command["cmd"]:
            case "report":
                emit(report(recorder, subscribers, command["window"], command["ranges"]))
            case "resume":
                for sub in subscribers:
                    if sub.transport is not None and not sub.transport.is_disconnected:
                        sub.transport.underlying_transport.resume_reading()
            case "exit":
                return


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    recorder = Recorder(args.t0)
    emit({"event": "ready"})
    if orjson.loads(await commands.readline() or b'{"cmd": "exit"}')["cmd"] != "connect":
        return
    subscribers, connected = await connect_all(args, recorder)
    emit(connected)
    await serve_commands(recorder, subscribers, commands)
    for sub in subscribers:
        if sub.transport is not None:
            sub.transport.disconnect(graceful=False)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", required=True, help="WebSocket URL every connection opens")
    parser.add_argument("--connections", type=int, required=True, help="sockets to open")
    parser.add_argument("--t0", type=float, required=True, help="wall-clock origin of `volume`")
    parser.add_argument("--concurrency", type=int, default=25, help="handshakes in flight (25)")
    parser.add_argument("--handshake-timeout", type=float, default=30.0, help="seconds (30)")
    parser.add_argument("--stall", action="store_true", help="stop reading right after connecting")
    parser.add_argument(
        "--protocol", choices=sorted(PROTOCOLS), default="plain", help="wire protocol (plain)"
    )
    parser.add_argument(
        "--zones", default="", help="zones to subscribe, comma-separated (socketio, pusher)"
    )
    parser.add_argument(
        "--cycle-zones",
        default="",
        help="comma list: connection i replaces {zone} in --url with zone i mod n (plain)",
    )
    parser.add_argument(
        "--source-address", default="", help="local address to connect from (127.0.0.x)"
    )
    args = parser.parse_args()
    if args.cycle_zones and "{zone}" not in args.url:
        parser.error("--cycle-zones needs {zone} in --url")
    if args.protocol != "plain" and not args.zones:
        parser.error(f"--protocol {args.protocol} needs --zones")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
