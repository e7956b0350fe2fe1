"""The wire contract's pure functions, without sockets."""

from __future__ import annotations

import struct
from pathlib import Path

import orjson
import pytest

from pricehub.wire import messages
from pricehub.wire.errors import ProtocolError, ValidationError

ZONES = ("pjm", "ercot")
NOW = "2026-11-27T15:00:00.000Z"
ACCEPTED = b"2026-11-27T15:00:00.123456Z"  # a stored price's accepted_at


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2026-11-27T15:21:16.123Z", "2026-11-27T15:21:16.123Z"),
        ("2026-11-27T10:21:16.123456-05:00", "2026-11-27T15:21:16.123Z"),
        ("2026-11-27T16:21:16+01:00", "2026-11-27T15:21:16.000Z"),
        ("2026-11-27T15:21:16.9z", "2026-11-27T15:21:16.900Z"),
    ],
)
def test_timestamps_are_normalised_to_utc_milliseconds(given: str, expected: str) -> None:
    assert messages.normalise_timestamp(given) == expected


@pytest.mark.parametrize("given", ["2026-11-27T15:21:16", "yesterday", "", "2026-13-01T00:00Z"])
def test_timestamps_without_offset_or_garbage_are_rejected(given: str) -> None:
    with pytest.raises(ValueError, match=r"offset|ISO|range"):
        messages.normalise_timestamp(given)


def test_valid_price_with_defaults() -> None:
    body = messages.validate_price({"market_zone": "pjm", "price": -12}, zones=ZONES, now=NOW)
    assert body == messages.PriceBody("pjm", -12.0, None, NOW)
    assert orjson.loads(body.encode()) == {
        "market_zone": "pjm", "price": -12.0, "volume": None, "timestamp": NOW,
    }


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ([], "body"),
        ({"price": 1}, "market_zone"),
        ({"market_zone": "nowhere", "price": 1}, "market_zone"),
        ({"market_zone": "PJM", "price": 1}, "market_zone"),
        ({"market_zone": "pjm"}, "price"),
        ({"market_zone": "pjm", "price": "1"}, "price"),
        ({"market_zone": "pjm", "price": True}, "price"),
        ({"market_zone": "pjm", "price": float("nan")}, "price"),
        ({"market_zone": "pjm", "price": float("inf")}, "price"),
        ({"market_zone": "pjm", "price": 1, "volume": -1}, "volume"),
        ({"market_zone": "pjm", "price": 1, "volume": "x"}, "volume"),
        ({"market_zone": "pjm", "price": 1, "timestamp": "2026-11-27T15:00:00"}, "timestamp"),
        ({"market_zone": "pjm", "price": 1, "timestamp": 5}, "timestamp"),
        ({"market_zone": "pjm", "price": 1, "colour": "red"}, "colour"),
    ],
)
def test_invalid_prices_name_the_field(item: object, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        messages.validate_price(item, zones=ZONES, now=NOW)
    assert caught.value.field == field


def test_publish_body_batch_names_the_index_and_caps_size() -> None:
    good = {"market_zone": "pjm", "price": 1}
    raw = orjson.dumps([good, {"market_zone": "pjm", "price": None}])
    with pytest.raises(ValidationError) as caught:
        messages.validate_publish_body(raw, zones=ZONES, now=NOW, max_batch=10)
    assert caught.value.field == "[1].price"
    with pytest.raises(ValidationError, match="exceeds"):
        messages.validate_publish_body(
            orjson.dumps([good] * 3), zones=ZONES, now=NOW, max_batch=2
        )
    with pytest.raises(ValidationError, match="invalid JSON"):
        messages.validate_publish_body(b"{", zones=ZONES, now=NOW, max_batch=2)
    assert len(messages.validate_publish_body(orjson.dumps([good] * 2), zones=ZONES, now=NOW,
                                              max_batch=2)) == 2


def test_ingest_fields_are_strings_parsed_like_the_http_body() -> None:
    body = messages.validate_ingest_fields(
        {b"market_zone": b"ercot", b"price": b"41.5", b"volume": b"120"}, zones=ZONES, now=NOW
    )
    assert body == messages.PriceBody("ercot", 41.5, 120.0, NOW)
    with pytest.raises(ValidationError) as caught:
        messages.validate_ingest_fields({"market_zone": "ercot", "price": "cheap"}, zones=ZONES,
                                        now=NOW)
    assert caught.value.field == "price"
    with pytest.raises(ValidationError):
        messages.validate_ingest_fields({"market_zone": "ercot", "price": "nan"}, zones=ZONES,
                                        now=NOW)


@pytest.mark.parametrize("stamp", [NOW, "0999-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z"])
def test_timestamp_of_reads_the_stored_price_without_parsing(stamp: str) -> None:
    stored = messages.with_seq(
        messages.PriceBody("pjm", -1.5, None, stamp).encode(), 123456, ACCEPTED
    )
    assert messages.timestamp_of(stored) == orjson.loads(stored)["timestamp"] == stamp


def test_with_seq_and_price_update_splice_valid_json() -> None:
    body = messages.PriceBody("pjm", 41.5, 10.0, NOW).encode()
    stored = messages.with_seq(body, 42, ACCEPTED)
    assert orjson.loads(stored) == {
        "seq": 42, "market_zone": "pjm", "price": 41.5, "volume": 10.0, "timestamp": NOW,
        "accepted_at": ACCEPTED.decode(),
    }
    update = orjson.loads(messages.price_update(stored, replay=True, conflated=True))
    assert update["type"] == "price_update"
    assert update["replay"] is True and update["conflated"] is True and update["seq"] == 42
    assert "replay" not in orjson.loads(messages.price_update(stored))


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 70000])
def test_text_frame_header_encodes_the_length(length: int) -> None:
    payload = b"x" * length
    frame = messages.text_frame(payload)
    assert frame[0] == 0x81  # FIN + text opcode
    second = frame[1]
    assert second & 0x80 == 0  # server frames are unmasked
    if length < 126:
        assert second == length and frame[2:] == payload
    elif length < 65536:
        assert second == 126 and struct.unpack("!H", frame[2:4])[0] == length
        assert frame[4:] == payload
    else:
        assert second == 127 and struct.unpack("!Q", frame[2:10])[0] == length
        assert frame[10:] == payload


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"type":"ping"}', messages.Ping()),
        ('{"type":"heartbeat"}', messages.Heartbeat()),
        ('{"type":"request_price_history","hours":2}', messages.RequestHistory(None, 2.0, None)),
        ('{"type":"request_price_history","limit":5,"market_zone":"pjm"}',
         messages.RequestHistory("pjm", None, 5)),
        ('{"type":"subscribe","zones":["pjm","pjm","ercot"],"since":{"pjm":3},"epoch":"e"}',
         messages.Subscribe(("pjm", "ercot"), {"pjm": 3}, "e")),
        ('{"type":"unsubscribe","zones":["pjm"]}', messages.Unsubscribe(("pjm",))),
    ],
)
def test_client_messages_decode(raw: str, expected: messages.ClientMessage) -> None:
    assert messages.decode_client_message(raw) == expected


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        ("[1,2]", "invalid_message"),
        ('{"kind":"ping"}', "invalid_message"),
        ('{"type":5}', "invalid_message"),
        ('{"type":"dance"}', "unknown_type"),
        ('{"type":"subscribe","zones":"pjm"}', "invalid_message"),
        ('{"type":"subscribe","zones":[1]}', "invalid_message"),
        ('{"type":"subscribe","zones":["pjm"],"since":{"pjm":-1}}', "invalid_message"),
        ('{"type":"subscribe","zones":["pjm"],"since":{"pjm":true}}', "invalid_message"),
        ('{"type":"subscribe","zones":["pjm"],"epoch":3}', "invalid_message"),
        ('{"type":"request_price_history","hours":-1}', "invalid_message"),
        ('{"type":"request_price_history","limit":1.5}', "invalid_message"),
        ('{"type":"request_price_history","limit":1,"hours":1}', "invalid_message"),
        ('{"type":"request_price_history","market_zone":7}', "invalid_message"),
    ],
)
def test_bad_client_messages_map_to_contract_codes(raw: str | bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        messages.decode_client_message(raw)
    assert caught.value.code == code


def test_server_messages_carry_type_and_timestamp() -> None:
    stored = messages.with_seq(messages.PriceBody("pjm", 1.0, None, NOW).encode(), 1, ACCEPTED)
    frames = [
        messages.simple("pong", now=NOW),
        messages.initial_data("pjm", stored, now=NOW),
        messages.resume_complete("pjm", recovered=True, from_seq=1, to_seq=3, now=NOW),
        messages.price_history("pjm", [stored], hours=None, limit=1, now=NOW),
        messages.zones_message("subscribed", ["pjm"], now=NOW),
        messages.storage_backend_changed("redis", now=NOW),
        messages.error("unknown_type", "x", now=NOW),
    ]
    for raw in frames:
        message = orjson.loads(raw)
        assert message["timestamp"] == NOW and isinstance(message["type"], str)
    assert orjson.loads(frames[1])["latest_price"]["seq"] == 1
    assert orjson.loads(frames[3])["data"][0]["seq"] == 1


SHARED_CONTRACT = Path(__file__).resolve().parents[2].parent / "shared" / "PROTOCOL.md"


@pytest.mark.skipif(
    not SHARED_CONTRACT.is_file(),
    reason="../shared/PROTOCOL.md is not beside this checkout (the contract lives outside it)",
)
def test_docs_protocol_is_the_shared_contract_verbatim() -> None:
    shipped = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
    assert shipped.read_bytes() == SHARED_CONTRACT.read_bytes(), (
        "docs/PROTOCOL.md differs from ../shared/PROTOCOL.md: copy the shared file over it"
    )


@pytest.mark.parametrize(
    ("zone", "message"),
    [
        ("PJM", 'zone names are lower case: "PJM" (did you mean "pjm"?)'),
        ("Ercot", 'zone names are lower case: "Ercot" (did you mean "ercot"?)'),
        ("MARS", 'zone names are lower case: "MARS"'),  # not served: no suggestion
        ("pjm", None), ("mars", None), ("PJM-East", None), ("P" * 33, None),
        ("\u212a", None),  # KELVIN SIGN lower-cases to "k": not a name typed in capitals
    ],
)
def test_a_zone_in_capitals_is_refused_with_one_message(zone: str, message: str | None) -> None:
    error = messages.zone_case_error(zone, ZONES)
    assert (error and (error.code, error.message)) == (message and ("unknown_zone", message))
    generic = f"unknown zone {zone[:40]}"
    assert messages.unknown_zone_text(zone, ZONES) == (message or generic)


def test_a_published_zone_in_capitals_says_so_and_carries_its_code() -> None:
    with pytest.raises(ValidationError) as caught:
        messages.validate_publish_body(
            b'[{"market_zone": "PJM", "price": 1}]', zones=ZONES, now=NOW, max_batch=10
        )
    assert (caught.value.field, caught.value.code) == ("[0].market_zone", "unknown_zone")
    assert caught.value.message == 'zone names are lower case: "PJM" (did you mean "pjm"?)'
