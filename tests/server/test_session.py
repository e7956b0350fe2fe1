"""The socket session as a pure state machine: client messages in, effects out.

No socket, no event loop, no storage backend: each test feeds decoded messages (or raw
frames) and plain storage answers into ``Session`` and checks the frames and actions it
produces. The handler/driver that performs these effects on real sockets is covered by
tests/server/test_ws.py and tests/server/test_flood.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from pricehub.server.subscriber.session import (
    Attach,
    Close,
    Detach,
    Drain,
    Effect,
    Job,
    Pong,
    ReadHistory,
    ReadLatest,
    ReadSince,
    Retained,
    Send,
    SendError,
    Session,
    SessionPolicy,
    fit_history,
)
from pricehub.storage import StoredPrice
from pricehub.wire import messages

NOW = "2026-12-01T12:00:00.000Z"
ZONES = frozenset({"pjm", "ercot", "caiso"})


def price(zone: str, seq: int) -> StoredPrice:
    body = b'{"market_zone":"%s","price":%d.5,"volume":null,"timestamp":"%s"}' % (
        zone.encode(), seq, NOW.encode()
    )
    return StoredPrice(zone, seq, messages.with_seq(body, seq, b"2026-12-01T12:00:00.000001Z"))


class Store:
    """Storage answers as plain values: each zone's retained prices, oldest first."""

    def __init__(self, *, epoch: str = "e1") -> None:
        self.epoch = epoch
        self.zones: dict[str, list[StoredPrice]] = {}

    def fill(self, zone: str, first: int, last: int) -> None:
        self.zones[zone] = [price(zone, seq) for seq in range(first, last + 1)]

    def answer(self, effect: Effect) -> Any:
        match effect:
            case ReadLatest(zone):
                prices = self.zones.get(zone, [])
                return prices[-1] if prices else None
            case ReadHistory(zone, limit):
                return self.zones.get(zone, [])[-limit:]
            case ReadSince(zone, seq):
                return Retained(self.epoch, self.since(zone, seq))
        return None

    def since(self, zone: str, seq: int) -> list[StoredPrice] | None:
        """As the storage Protocol: None when the history no longer reaches seq + 1."""
        prices = self.zones.get(zone, [])
        last = prices[-1].seq if prices else 0
        if seq > last:
            return None
        if seq == last:
            return []
        if prices[0].seq > seq + 1:
            return None
        return [p for p in prices if p.seq > seq]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_session(clock: Clock | None = None, **policy: Any) -> Session:
    return Session(SessionPolicy(zones=ZONES, **policy), clock=clock or Clock(), now=lambda: NOW)


def run(
    job: Job, store: Store | None = None, *, each: Callable[[Effect], None] | None = None
) -> list[Effect]:
    """Drive ``job`` to its end: answer reads from ``store``, call ``each`` per effect."""
    store = store or Store()
    effects: list[Effect] = []
    answer: Any = None
    while True:
        try:
            effect = job.send(answer)
        except StopIteration:
            return effects
        effects.append(effect)
        answer = store.answer(effect)
        if each is not None:
            each(effect)


def sent(effects: list[Effect]) -> list[dict[str, Any]]:
    """The messages the effects queue for the client, decoded."""
    return [
        orjson.loads(effect.payload) for effect in effects if isinstance(effect, Send | SendError)
    ]


def kinds(effects: list[Effect]) -> list[str]:
    """Each effect in short: a message's type (and seq), or the action's class name."""
    out = []
    for effect in effects:
        if isinstance(effect, Send | SendError):
            message = orjson.loads(effect.payload)
            out.append(f"{message['type']}:{message['seq']}" if "seq" in message
                       else message["type"])
        else:
            out.append(type(effect).__name__)
    return out


# --- simple answers and bad input -----------------------------------------------------------


def test_ping_and_heartbeat_are_answered_with_the_server_time() -> None:
    session = make_session()
    assert sent(run(session.handle(messages.Ping()))) == [{"type": "pong", "timestamp": NOW}]
    assert sent(run(session.text('{"type":"heartbeat"}'))) == [
        {"type": "heartbeat_ack", "timestamp": NOW}
    ]
    assert run(session.ping(b"x")) == [Pong(b"x")]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1]", "invalid_message"),
        ('{"type":"nope"}', "unknown_type"),
        ('{"type":"subscribe","zones":["nowhere"]}', "unknown_zone"),
        ('{"type":"request_price_history","limit":5}', "invalid_message"),  # no zone
    ],
)
def test_bad_input_is_an_error_effect_counted_by_code(frame: str, code: str) -> None:
    effects = run(make_session().text(frame))
    assert len(effects) == 1 and isinstance(effects[0], SendError)
    assert effects[0].code == code and sent(effects)[0]["code"] == code


def test_binary_frames_are_refused_politely() -> None:
    assert [m["code"] for m in sent(run(make_session().binary()))] == ["invalid_message"]


# --- the rate limit, control frames included ------------------------------------------------


@pytest.mark.parametrize("frame", ["text", "ping", "pong"])
def test_every_frame_kind_counts_then_a_sustained_flood_closes_4029(frame: str) -> None:
    clock = Clock()
    session = make_session(clock, rate=5)  # burst 10; 5 rejections in a row close

    def one() -> list[Effect]:
        if frame == "text":
            return run(session.text('{"type":"ping"}'))
        return run(session.ping(b"") if frame == "ping" else session.pong())

    for _ in range(10):
        assert not any(isinstance(e, SendError | Close) for e in one())
    for _ in range(4):
        assert [e.code for e in one() if isinstance(e, SendError)] == ["rate_limited"]
    assert one() == [Close(4029, "message rate over limit", "rate_limit")]
    assert session.closed and one() == []  # nothing after the close
    clock.now += 60  # even with tokens again
    assert one() == []


def test_the_rate_recovers_with_time() -> None:
    clock = Clock()
    session = make_session(clock, rate=2)  # burst 4; 2 rejections in a row close
    assert [kinds(run(session.pong())) for _ in range(5)] == [[], [], [], [], ["error"]]
    clock.now += 1.0
    assert kinds(run(session.pong())) == []


# --- opening zones: initial data, resume, replay --------------------------------------------


def test_connect_without_since_sends_initial_data_then_releases_newer_held_updates() -> None:
    store = Store()
    store.fill("pjm", 1, 5)
    session = make_session(single_zone="pjm")

    def live(effect: Effect) -> None:  # updates published while storage is read
        if isinstance(effect, ReadLatest):
            stream = session.streams["pjm"]
            stream.held.extend([price("pjm", 5), price("pjm", 6)])

    effects = run(session.start(["pjm"], since=None, epoch=None, bad_since=False), store,
                  each=live)
    assert kinds(effects) == ["Drain", "Attach", "ReadLatest", "initial_data", "price_update:6"]
    attach = effects[1]
    assert isinstance(attach, Attach) and attach.stream is session.streams["pjm"]
    assert not attach.stream.syncing and attach.stream.last_seq == 6


def test_bad_since_is_reported_before_the_zone_opens() -> None:
    effects = run(make_session().start(["pjm"], since=None, epoch=None, bad_since=True))
    assert kinds(effects) == ["error", "Drain", "Attach", "ReadLatest"]  # no price yet


def test_resume_replays_flagged_then_completes_then_releases_live() -> None:
    store = Store()
    store.fill("pjm", 1, 5)
    session = make_session()

    def live(effect: Effect) -> None:
        if isinstance(effect, ReadSince):
            session.streams["pjm"].held.extend([price("pjm", 5), price("pjm", 6)])

    effects = run(
        session.handle(messages.Subscribe(zones=("pjm",), since={"pjm": 2}, epoch="e1")), store,
        each=live,
    )
    assert kinds(effects) == [
        "subscribed", "Drain", "Attach", "ReadSince", "price_update:3", "price_update:4",
        "price_update:5", "resume_complete", "price_update:6",
    ]
    replayed = [m for m in sent(effects) if m["type"] == "price_update"]
    assert [m.get("replay") for m in replayed] == [True, True, True, None]
    complete = next(m for m in sent(effects) if m["type"] == "resume_complete")
    assert (complete["recovered"], complete["from_seq"], complete["to_seq"]) == (True, 3, 5)


@pytest.mark.parametrize(("since", "epoch", "told"), [
    (0, "another-lineage", ["gap"]),  # epoch_changed: no read needed to say it
    (99, "e1", []),  # ahead of the zone: nothing it lacks, no gap
])
def test_a_resume_that_cannot_be_filled_sends_current_state_not_recovered(
    since: int, epoch: str, told: list[str]
) -> None:
    store = Store()
    store.fill("pjm", 1, 5)
    effects = run(make_session(single_zone="pjm").start(
        ["pjm"], since=since, epoch=epoch, bad_since=False
    ), store)
    # One ReadLatest serves the gap and initial_data: the gap ends right before its seq.
    assert kinds(effects) == ["Drain", "Attach", "ReadSince", "ReadLatest", *told,
                              "initial_data", "resume_complete"]
    assert sent(effects)[-1]["recovered"] is False and sent(effects)[-1]["to_seq"] == 5


def test_a_replay_is_produced_in_chunks_with_a_drain_before_each() -> None:
    store = Store()
    store.fill("pjm", 1, 100)
    one = len(messages.price_update(price("pjm", 1).payload, replay=True))
    session = make_session(single_zone="pjm", chunk_bytes=10 * one)
    effects = run(session.start(["pjm"], since=0, epoch=None, bad_since=False), store)
    replay = kinds(effects)[3:-1]  # after Drain, Attach, ReadSince; before resume_complete
    assert replay.count("Drain") == 9  # 100 prices, 10 per chunk: a drain between chunks
    chunks = " ".join(replay).split("Drain")
    assert all(len(chunk.split()) == 10 for chunk in chunks)


def test_a_hold_that_overflows_is_read_on_from_storage_so_nothing_is_missed() -> None:
    """While the replay waits for the client, 50 live updates arrive and the hold keeps
    only the newest 8: the replay reads on from storage up to them, then goes live."""
    store = Store()
    store.fill("pjm", 1, 20)
    session = make_session(single_zone="pjm", held_limit=8, chunk_bytes=1)

    reads: list[Effect] = []

    def live(effect: Effect) -> None:
        if isinstance(effect, ReadSince):
            reads.append(effect)
        elif isinstance(effect, Drain) and len(reads) == 1 and len(store.zones["pjm"]) == 20:
            # The first wait inside the replay: 50 prices are published meanwhile.
            new = [price("pjm", seq) for seq in range(21, 71)]
            store.zones["pjm"].extend(new)
            session.streams["pjm"].held.extend(new)

    effects = run(session.start(["pjm"], since=0, epoch=None, bad_since=False), store,
                  each=live)
    assert reads == [ReadSince("pjm", 0), ReadSince("pjm", 20)]
    assert len(session.streams["pjm"].held) == 0  # released (all of it already replayed)
    seqs = [m["seq"] for m in sent(effects) if m["type"] == "price_update"]
    assert seqs == list(range(1, 71))
    assert sent(effects)[-1]["type"] == "resume_complete" and sent(effects)[-1]["to_seq"] == 70


def test_a_replay_that_falls_behind_the_retained_history_closes_4008() -> None:
    store = Store()
    store.fill("pjm", 1, 20)
    session = make_session(single_zone="pjm", held_limit=8, chunk_bytes=1)

    reads: list[Effect] = []

    def live(effect: Effect) -> None:
        if isinstance(effect, ReadSince):
            reads.append(effect)
        elif isinstance(effect, Drain) and len(reads) == 1 and store.zones["pjm"][0].seq == 1:
            store.fill("pjm", 31, 70)  # published meanwhile: the history rolled past 21
            session.streams["pjm"].held.extend(store.zones["pjm"])

    effects = run(session.start(["pjm"], since=0, epoch=None, bad_since=False), store,
                  each=live)
    assert isinstance(effects[-1], Close) and effects[-1].code == 4008
    assert effects[-1].reason == "slow_consumer" and session.closed
    assert "resume_complete" not in kinds(effects)


# --- subscribe, unsubscribe, zones and tokens -----------------------------------------------


def test_subscribe_to_a_zone_the_token_does_not_allow_closes_4003() -> None:
    session = make_session(allowed_zones=frozenset({"pjm"}))
    effects = run(session.handle(messages.Subscribe(zones=("pjm", "ercot"), since={},
                                                    epoch=None)))
    assert effects == [Close(4003, "token does not allow zone ercot", "auth")]


def test_history_of_a_zone_the_token_does_not_allow_is_an_error() -> None:
    session = make_session(allowed_zones=frozenset({"pjm"}))
    effects = run(session.text('{"type":"request_price_history","market_zone":"ercot"}'))
    assert [m["code"] for m in sent(effects)] == ["forbidden_zone"]


def test_zones_per_socket_limit_and_unsubscribe() -> None:
    session = make_session(max_zones=2)
    run(session.handle(messages.Subscribe(zones=("pjm", "ercot"), since={}, epoch=None)))
    effects = run(session.handle(messages.Subscribe(zones=("caiso",), since={}, epoch=None)))
    assert [m["code"] for m in sent(effects)] == ["invalid_message"]
    effects = run(session.handle(messages.Unsubscribe(zones=("ercot",))))
    assert effects[0] == Detach("ercot") and sent(effects)[0]["type"] == "unsubscribed"
    assert set(session.streams) == {"pjm"}
    effects = run(session.handle(messages.Subscribe(zones=("caiso",), since={}, epoch=None)))
    assert kinds(effects)[:3] == ["subscribed", "Drain", "Attach"]


def test_zones_already_open_do_not_count_twice_against_the_limit() -> None:
    """The limit counts the zones the socket would have: re-subscribing open ones (to
    resume them) is no new zone (counted per zone asked, not by re-building sets)."""
    session = make_session(max_zones=2)
    run(session.handle(messages.Subscribe(zones=("pjm",), since={}, epoch=None)))
    again = messages.Subscribe(zones=("pjm", "ercot"), since={"pjm": 0}, epoch=None)
    assert sent(run(session.handle(again)))[0]["type"] == "subscribed"
    one_more = messages.Subscribe(zones=("ercot", "caiso"), since={}, epoch=None)
    assert [m["code"] for m in sent(run(session.handle(one_more)))] == ["invalid_message"]


# --- history and the reply budget -----------------------------------------------------------


def test_history_waits_for_the_socket_to_drain_then_answers() -> None:
    store = Store()
    store.fill("pjm", 1, 50)
    session = make_session(single_zone="pjm")
    effects = run(session.handle(messages.RequestHistory(limit=10, hours=None,
                                                         market_zone=None)), store)
    assert kinds(effects) == ["Drain", "ReadHistory", "price_history"]
    answer = sent(effects)[0]
    assert [p["seq"] for p in answer["data"]] == list(range(41, 51)) and answer["limit"] == 10


def test_a_history_over_the_reply_budget_is_cut_to_the_newest_with_an_error() -> None:
    store = Store()
    store.fill("pjm", 1, 500)
    budget = 8 * 1024
    session = make_session(single_zone="pjm", history_size=500, reply_budget=budget)
    effects = run(session.handle(messages.RequestHistory(limit=500, hours=None,
                                                         market_zone=None)), store)
    assert kinds(effects) == ["Drain", "ReadHistory", "error", "price_history"]
    error, answer = sent(effects)
    assert error["code"] == "invalid_message" and "cut to the newest" in error["message"]
    seqs = [p["seq"] for p in answer["data"]]
    assert seqs == list(range(501 - len(seqs), 501)) and len(seqs) > 50
    payload = effects[-1]
    assert isinstance(payload, Send) and len(payload.payload) <= budget


def test_fit_history_keeps_the_newest_that_fit() -> None:
    prices = [price("pjm", seq) for seq in range(11, 21)]  # payloads of one length
    size = len(prices[0].payload) + 1
    assert fit_history(prices, 256 + 3 * size) == prices[-3:]
    assert fit_history(prices, 10**6) == prices
    assert fit_history(prices, 10) == []


def test_policy_from_settings_derives_the_budgets_from_the_send_limits() -> None:
    from pricehub.server.settings import Settings

    settings = Settings(redis_url=None, send_high_water=32 * 1024, send_hard_limit=256 * 1024)
    policy = SessionPolicy.from_settings(settings, allowed_zones=None, single_zone="pjm")
    assert (policy.chunk_bytes, policy.reply_budget) == (8 * 1024, 224 * 1024)
    assert policy.zones == frozenset(settings.zones) and policy.single_zone == "pjm"
    policy = SessionPolicy.from_settings(Settings(redis_url=None), allowed_zones=None,
                                         single_zone=None)
    assert (policy.chunk_bytes, policy.reply_budget) == (16 * 1024, 768 * 1024)


# --- the handler's one exception table -------------------------------------------------------


def test_every_exception_maps_to_one_reason_and_close_code() -> None:
    import asyncio

    from pricehub.server.subscriber.lifecycle import failure

    assert failure(ConnectionResetError()) == ("client_close", None)
    assert failure(asyncio.CancelledError()) == ("shutdown", None)
    assert failure(ValueError("bug")) == ("error", 1011)
    assert failure(KeyboardInterrupt()) is None  # not the handler's to swallow


# --- effects carry what they are beside their bytes -----------------------------------------


def test_every_send_says_its_type_zone_and_seq_without_parsing() -> None:
    """What an SSE stream's cursor needs (zone and seq of a price or initial_data) rides
    on the effect, so no transport parses the bytes back; the rest say their type."""
    store = Store()
    store.fill("pjm", 1, 5)
    store.fill("ercot", 1, 2)
    session = make_session()
    effects = run(session.resume(["pjm", "ercot"], since={"pjm": 2}, epoch=None), store)
    effects += run(session.text(b'{"type":"ping"}'), store)
    effects += run(session.text(b'{"type":"request_price_history","market_zone":"pjm"}'), store)
    sends = [effect for effect in effects if isinstance(effect, Send)]
    assert {send.kind for send in sends} >= {
        "price_update", "resume_complete", "initial_data", "pong", "price_history"
    }
    for send in sends:
        message = orjson.loads(send.payload)
        assert send.kind == message["type"]
        if send.kind == "price_update":
            assert (send.zone, send.seq) == (message["market_zone"], message["seq"])
        elif send.kind == "initial_data":
            latest = message["latest_price"]
            assert (send.zone, send.seq) == (latest["market_zone"], latest["seq"])
        else:
            assert send.seq is None
            assert send.zone == message.get("market_zone")
