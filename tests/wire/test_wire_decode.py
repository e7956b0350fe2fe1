"""``pricehub.wire.decode``, without sockets: every server message the builders of
``pricehub.wire.messages`` write decodes back to what was put in; malformed ones raise
``MalformedMessage`` naming the field; refusals carry the contract's close code."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import orjson
import pytest

from pricehub.client.sse import SseParser
from pricehub.wire import messages, paths
from pricehub.wire import sse as wire_sse
from pricehub.wire.codes import (
    Backend,
    CloseCode,
    ErrorCode,
    GapReason,
    HttpErrorCode,
    MessageType,
    ZoneStatus,
)
from pricehub.wire.decode import (
    ConnectionEstablished,
    ErrorMessage,
    GapNotice,
    HeartbeatAck,
    InitialData,
    Pong,
    PriceHistory,
    PriceObject,
    PriceUpdateMessage,
    ResumeComplete,
    ServerMessage,
    StorageBackendChanged,
    Subscribed,
    UnknownMessage,
    Unsubscribed,
    ZoneState,
    decode_refusal,
    decode_server_message,
    decode_server_object,
)
from pricehub.wire.errors import MalformedMessage

NOW = "2026-11-27T15:21:16.123Z"
ACCEPTED = "2026-11-27T15:21:16.123456Z"
WIRE = Path(messages.__file__).resolve().parent


def stored(seq: int, *, price: float = 41.5, volume: float | None = 120.0) -> bytes:
    """A price as a store keeps it (what the server's builders splice into messages)."""
    body = messages.PriceBody("pjm", price, volume, "2026-11-27T15:00:00.000Z").encode()
    return messages.with_seq(body, seq, ACCEPTED.encode())


def price(seq: int, *, accepted_at: str | None = ACCEPTED) -> PriceObject:
    return PriceObject("pjm", 41.5, 120.0, seq, "2026-11-27T15:00:00.000Z", accepted_at)


BUILT: list[tuple[bytes, ServerMessage]] = [
    (
        messages.connection_established(
            connection_id="c1", zones=["pjm"], single_zone=True, backend=Backend.REDIS,
            epoch="e1", heartbeat_interval=30.0, now=NOW,
        ),
        ConnectionEstablished(
            "c1", ("pjm",), True, Backend.REDIS, "e1", 30.0, "Connected to pjm market updates"
        ),
    ),
    (
        messages.connection_established(
            connection_id="c2", zones=["pjm", "ercot"], single_zone=False,
            backend="in-memory", epoch="e1", heartbeat_interval=5, now=NOW,
        ),
        ConnectionEstablished(
            "c2", ("pjm", "ercot"), False, Backend.IN_MEMORY, "e1", 5.0,
            "Connected to pjm, ercot market updates",
        ),
    ),
    (messages.initial_data("pjm", stored(7), now=NOW), InitialData("pjm", price(7))),
    (messages.price_update(stored(8)), PriceUpdateMessage(price(8))),
    (
        messages.price_update(stored(9), replay=True, conflated=True),
        PriceUpdateMessage(price(9), replay=True, conflated=True),
    ),
    (
        messages.resume_complete("pjm", recovered=False, from_seq=3, to_seq=9, now=NOW),
        ResumeComplete("pjm", False, 3, 9),
    ),
    (messages.simple(MessageType.PONG, now=NOW), Pong()),
    (messages.simple(MessageType.HEARTBEAT_ACK, now=NOW), HeartbeatAck()),
    (
        messages.price_history("pjm", [stored(1), stored(2)], hours=None, limit=2, now=NOW),
        PriceHistory("pjm", (price(1), price(2)), limit=2),
    ),
    (
        messages.price_history("pjm", [], hours=1.5, limit=None, now=NOW),
        PriceHistory("pjm", (), hours=1.5),
    ),
    (messages.zones_message(MessageType.SUBSCRIBED, ["pjm"], now=NOW), Subscribed(("pjm",))),
    (
        messages.zones_message(MessageType.UNSUBSCRIBED, ["pjm", "ercot"], now=NOW),
        Unsubscribed(("pjm", "ercot")),
    ),
    (
        messages.storage_backend_changed(Backend.IN_MEMORY, now=NOW),
        StorageBackendChanged(Backend.IN_MEMORY),
    ),
    (
        messages.gap("pjm", from_seq=4, to_seq=None, reason=GapReason.LOST, now=NOW),
        GapNotice("pjm", 4, None, GapReason.LOST),
    ),
    (
        messages.gap(
            "pjm", from_seq=1, to_seq=9, reason=GapReason.EPOCH_CHANGED, epoch="old", now=NOW
        ),
        GapNotice("pjm", 1, 9, GapReason.EPOCH_CHANGED, "old"),
    ),
    (
        messages.zone_status("pjm", ZoneStatus.STALE, since=ACCEPTED, last_seq=9, now=NOW),
        ZoneState("pjm", ZoneStatus.STALE, ACCEPTED, 9),
    ),
    (
        messages.error(ErrorCode.RATE_LIMITED, "slow down", now=NOW),
        ErrorMessage(ErrorCode.RATE_LIMITED, "slow down"),
    ),
]


@pytest.mark.parametrize(("frame", "expected"), BUILT)
def test_what_the_server_builds_decodes_back(frame: bytes, expected: ServerMessage) -> None:
    decoded = decode_server_message(frame)
    assert decoded == expected
    assert decode_server_message(frame.decode()) == expected, "text frames as well as bytes"
    if not isinstance(decoded, PriceUpdateMessage):  # its timestamp is the price's
        assert decoded.timestamp == NOW


@pytest.mark.parametrize(("frame", "expected"), BUILT)
def test_an_sse_event_decodes_like_the_frame(frame: bytes, expected: ServerMessage) -> None:
    parser = SseParser()
    lines = wire_sse.event(frame, cursor=b"c1").decode().split("\n")
    events = [event for line in lines if (event := parser.feed_line(line)) is not None]
    assert [decode_server_message(event.data) for event in events] == [expected]
    assert events[0].event == orjson.loads(frame)["type"]


@pytest.mark.parametrize(
    "frame",
    [
        messages.gap("pjm", from_seq=4, to_seq=None, reason=GapReason.LOST, now=NOW),
        messages.gap(
            "pjm", from_seq=1, to_seq=9, reason=GapReason.EPOCH_CHANGED, epoch="old", now=NOW
        ),
        messages.zone_status("pjm", ZoneStatus.LIVE, since=None, last_seq=9, now=NOW),
        messages.price_update(stored(9), replay=True),
    ],
)
def test_what_a_client_prints_is_the_wire_object(frame: bytes) -> None:
    """``as_json`` (what ``pricehub tail --json`` prints) is the message as the server
    wrote it, less what it does not describe (server time; a price update's ``type``), in
    the server's field order, except a price's: PROTOCOL.md's order there (the server
    writes ``seq`` first for its own reasons, ``with_seq``)."""
    decoded = decode_server_message(frame)
    assert isinstance(decoded, GapNotice | ZoneState | PriceUpdateMessage)
    wire = orjson.loads(frame)
    if isinstance(decoded, PriceUpdateMessage):
        del wire["type"]
        assert decoded.as_json() == wire
        assert list(decoded.price.as_json())[:3] == ["market_zone", "price", "volume"]
    else:
        del wire["timestamp"]
        assert list(decoded.as_json().items()) == list(wire.items())


def test_enum_fields_decode_to_members_and_keep_what_they_do_not_know() -> None:
    established = decode_server_message(BUILT[0][0])
    assert isinstance(established, ConnectionEstablished)
    assert established.storage_backend is Backend.REDIS
    newer = decode_server_object(
        {"type": "gap", "market_zone": "pjm", "from_seq": 1, "to_seq": 2, "reason": "moon"}
    )
    assert newer == GapNotice("pjm", 1, 2, "moon"), "a newer server's reason is still a hole"
    error = decode_server_object({"type": "error", "code": "new_code", "message": "m"})
    assert error == ErrorMessage("new_code", "m")


def test_server_time_is_kept_but_not_compared() -> None:
    """The same state said twice (a zone still stale on reconnecting) is equal."""
    frame = messages.zone_status("pjm", ZoneStatus.STALE, since=ACCEPTED, last_seq=9, now=NOW)
    first = decode_server_message(frame)
    again = decode_server_object({**orjson.loads(frame), "timestamp": "later"})
    assert first == again and (first.timestamp, again.timestamp) == (NOW, "later")


def test_a_price_stored_before_accepted_at_decodes_with_none() -> None:
    old = b'{"seq":3,"market_zone":"pjm","price":41.5,"volume":120.0,' \
          b'"timestamp":"2026-11-27T15:00:00.000Z"}'  # fmt: skip
    decoded = decode_server_message(messages.price_update(old))
    assert decoded == PriceUpdateMessage(price(3, accepted_at=None))


def test_an_unknown_type_is_kept_not_refused() -> None:
    frame = b'{"type":"future_type","epoch":"e"}'
    assert decode_server_message(frame) == UnknownMessage("future_type")


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"type":1}', "'type'"),
        (b'{"type":"price_update","market_zone":"pjm"}', "price_update: no field 'price'"),
        (
            b'{"type":"price_update","market_zone":"pjm","price":true,"volume":null,"seq":1,'
            b'"timestamp":"t"}',
            "'price' must be a number",
        ),
        (
            b'{"type":"price_update","market_zone":"pjm","price":"41","volume":null,"seq":1,'
            b'"timestamp":"t"}',
            "'price' must be a number",
        ),
        (
            b'{"type":"price_update","market_zone":"pjm","price":1,"volume":null,"seq":-1,'
            b'"timestamp":"t"}',
            "'seq' must be a non-negative integer",
        ),
        (
            b'{"type":"price_update","market_zone":"pjm","price":1,"volume":null,"seq":1,'
            b'"timestamp":"t","replay":"yes"}',
            "'replay' must be true or false",
        ),
        (b'{"type":"initial_data","market_zone":"pjm","latest_price":[]}', "a price must be"),
        (b'{"type":"resume_complete","market_zone":"pjm","recovered":1}', "'recovered'"),
        (
            b'{"type":"zone_status","market_zone":"pjm","status":"odd","since":null,'
            b'"last_seq":1}',
            "unknown zone status",
        ),
        (b'{"type":"subscribed","zones":"pjm"}', "'zones' must be a list of strings"),
        (b'{"type":"gap","market_zone":"pjm","from_seq":1,"reason":"lost"}', "'to_seq'"),
        (
            b'{"type":"connection_established","connection_id":"c","market_zone":"pjm",'
            b'"storage_backend":"redis","epoch":"e","heartbeat_interval":0}',
            "connection_established: 'heartbeat_interval' must be positive",
        ),
        (b'{"type":"pong","timestamp":5}', "'timestamp' must be a string"),
    ],
)
def test_malformed_messages_say_what_is_wrong(frame: bytes, words: str) -> None:
    with pytest.raises(MalformedMessage, match=words) as caught:
        decode_server_message(frame)
    assert isinstance(caught.value, ValueError), "older callers catch ValueError"
    kind = orjson.loads(frame).get("type") if frame.startswith(b"{") else None
    assert caught.value.kind == (kind if isinstance(kind, str) else None)


def test_client_messages_encode_to_what_the_server_decodes() -> None:
    sent: list[messages.ClientMessage] = [
        messages.Ping(),
        messages.Heartbeat(),
        messages.Subscribe(("pjm", "ercot"), {"pjm": 4, "ercot": 0}, "e1"),
        messages.Subscribe(("pjm",), {}, None),
        messages.Unsubscribe(("pjm",)),
        messages.RequestHistory("pjm", None, 10),
        messages.RequestHistory(None, 2.5, None),
    ]
    for message in sent:
        assert messages.decode_client_message(messages.encode_client_message(message)) == message
    assert messages.encode_client_message(messages.Heartbeat()) == b'{"type":"heartbeat"}'


@pytest.mark.parametrize(
    ("status", "body", "close_code", "error", "missing", "text"),
    [
        (401, '{"error": "invalid_token", "message": "token expired"}',
         CloseCode.INVALID_TOKEN, HttpErrorCode.INVALID_TOKEN, False, "token expired"),
        (403, '{"error": "forbidden_zone", "message": "m"}', CloseCode.FORBIDDEN_ZONE,
         HttpErrorCode.FORBIDDEN_ZONE, False, "m"),
        (404, '{"error": "unknown_zone", "message": "unknown zone x"}', CloseCode.POLICY,
         HttpErrorCode.UNKNOWN_ZONE, False, "unknown zone x"),
        (404, "404: Not Found", CloseCode.POLICY, None, True, "404: Not Found"),
        (422, '{"code": "too_many_zones", "message": "m"}', CloseCode.POLICY,
         HttpErrorCode.TOO_MANY_ZONES, False, "m"),
        (503, '{"error": "over_capacity"}', CloseCode.TRY_AGAIN_LATER,
         HttpErrorCode.OVER_CAPACITY, False, '{"error": "over_capacity"}'),
        (400, '{"error": "invalid_cursor", "message": "m"}', None, HttpErrorCode.INVALID_CURSOR,
         False, "m"),
        (502, " <html>bad gateway</html>\n", None, None, False, "<html>bad gateway</html>"),
    ],
)  # fmt: skip
def test_refusals_carry_the_close_code_with_the_same_advice(
    status: int, body: str, close_code: CloseCode | None, error: str | None, missing: bool,
    text: str,
) -> None:
    refusal = decode_refusal(status, body)
    assert (refusal.close_code, refusal.error, refusal.endpoint_missing, refusal.text) == (
        close_code, error, missing, text,
    )  # fmt: skip
    assert refusal.cursor_refused == (status == 400)


def test_the_client_reads_a_refusal_as_the_server_table_says() -> None:
    """Every refusal the server says with both a close code and an HTTP answer
    (``pricehub.wire.refusals``) reads back, from its HTTP answer, as that close code."""
    refusals = pytest.importorskip("pricehub.wire.refusals")
    for reason, row in refusals.REFUSALS.items():
        if row.close_code is not None:
            body = orjson.dumps({"error": row.error, "message": "m"}).decode()
            refusal = decode_refusal(row.status, body)
            assert (refusal.close_code, refusal.error) == (row.close_code, row.error), reason


def test_a_refusal_with_a_body_that_is_not_the_servers_says_the_body() -> None:
    refusal = decode_refusal(503, '  {"message": 5}  ')
    assert (refusal.message, refusal.text) == (None, '{"message": 5}')


@pytest.mark.parametrize(
    ("zones", "sse", "resume", "expected"),
    [
        (("pjm",), False, None, ("/api/ws/ws/market/pjm", {"token": "t"})),
        (("pjm",), True, (4, "e1"),
         ("/api/ws/sse/market/pjm", {"since": "4", "epoch": "e1", "token": "t"})),
        (("pjm", "ercot"), False, (4, "e1"),
         ("/api/ws/ws/prices", {"zones": "pjm,ercot", "token": "t"})),
        (("pjm", "ercot"), True, None,
         ("/api/ws/sse/prices", {"zones": "pjm,ercot", "token": "t"})),
    ],
)  # fmt: skip
def test_subscriber_targets_follow_the_contracts_paths(
    zones: tuple[str, ...], sse: bool, resume: tuple[int, str] | None, expected: Any
) -> None:
    since, epoch = resume or (None, None)
    target = paths.subscriber_target(zones, sse=sse, since=since, epoch=epoch, token="t")
    assert target == expected


# --- codes spelled once ------------------------------------------------------------------

_CODE_ENUMS = (ErrorCode, HttpErrorCode, GapReason, ZoneStatus, Backend)


# Where codes are defined (enum members): every other module names them.
_DEFINING = {"codes.py", "refusals.py"}


def _string_constants(path: Path) -> set[str]:
    """The module's string literals, ``__all__`` left out (names, not codes)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            node.value = ast.Constant(None)
    return {
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }  # fmt: skip


@pytest.mark.parametrize(
    "path",
    sorted(
        path for path in [*WIRE.glob("*.py"), *(WIRE.parent / "client").glob("*.py")]
        if path.name not in _DEFINING
    ),
    ids=lambda path: f"{path.parent.name}/{path.name}",
)
def test_no_wire_or_client_module_writes_a_code_as_a_literal(path: Path) -> None:
    """``codes.py`` says no module spells a code: checked for ``wire/`` and ``client/``
    (the server's modules are their owners' to convert)."""
    spelled = {str(member) for enum in _CODE_ENUMS for member in enum}
    # Message types are also field names ("error" is a key of HTTP error bodies).
    spelled |= {str(kind) for kind in MessageType} - {"error"}
    assert not _string_constants(path) & spelled


def test_decode_knows_every_server_message_type() -> None:
    client_types = {"ping", "heartbeat", "request_price_history", "subscribe", "unsubscribe"}
    for kind in set(map(str, MessageType)) - client_types:
        assert not isinstance(decode_server_object(_minimal(kind)), UnknownMessage), kind


def _minimal(kind: str) -> dict[str, Any]:
    price_fields = {"market_zone": "pjm", "price": 1, "volume": None, "seq": 1, "timestamp": NOW}
    return {
        "type": kind, "connection_id": "c", "zones": ["pjm"], "storage_backend": "redis",
        "epoch": "e", "heartbeat_interval": 1, "latest_price": price_fields, **price_fields,
        "recovered": True, "data": [], "from_seq": 1, "to_seq": None, "reason": "lost",
        "status": "live", "since": None, "last_seq": 1, "code": "invalid_json",
        "prices": {}, "cursor": {},
    }  # fmt: skip
