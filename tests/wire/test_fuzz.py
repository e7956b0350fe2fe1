"""Property-based fuzzing of everything that parses untrusted input.

The client message decoder, the HTTP publish body validator, the Redis ingest validator
and the subscriber token verifier get arbitrary bytes, arbitrary JSON and near-valid
inputs (valid shapes with hostile values). Each must either return a well-formed result
or raise its contract error (``ProtocolError`` with a contract code, ``ValidationError``
naming a field, ``AuthError`` 4001); any other exception is a crash and fails the test.

Example counts: the ``fuzz-ci`` Hypothesis profile is used when ``CI=true``: 10,000
examples for each of the three validators, 1,000 for the token verifier and the time
oracle: about 50 s of CPU for the file (Hypothesis itself costs ~1.3 ms per structured
example; a loaded machine stretches the wall time). Locally ``fuzz-dev`` runs 300 and 30
(about 3 s). ``CI=true pytest tests/wire/test_fuzz.py`` runs the CI budget locally.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import jwt
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pricehub.server.errors import AuthError
from pricehub.server.policy.auth import TokenVerifier
from pricehub.wire import messages
from pricehub.wire.codes import CloseCode
from pricehub.wire.errors import ProtocolError, ValidationError

settings.register_profile(
    "fuzz-ci", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("fuzz-dev", max_examples=300, deadline=None)
FUZZ = settings.get_profile("fuzz-ci" if os.environ.get("CI") == "true" else "fuzz-dev")
# The token verifier and the time oracle guard less input surface; a tenth of the budget.
FUZZ_LIGHT = settings(FUZZ, max_examples=FUZZ.max_examples // 10)

ZONES = ("pjm", "caiso", "ercot")
NOW = "2026-11-27T15:21:16.123Z"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
DECODER_CODES = {"invalid_json", "invalid_message", "unknown_type"}  # all a frame can cause
SECRET = "fuzz-secret-that-is-at-least-32-bytes"

# --- strategies ---------------------------------------------------------------------------
# Near-valid inputs are templates with hostile JSON fragments in their slots: a template
# and two fragments are three choices for Hypothesis, where a dictionary with optional keys
# is twenty. That is what fits 10,000 examples per test into the CI minute.

FRAGMENTS = [
    "null", "true", "false", "0", "-0", "1", "-1", "0.5", "-0.0", "1e308", "-1e308", "5e-324",
    "9223372036854775807", "18446744073709551615", "18446744073709551616", "-9223372036854775809",
    "1e999", "NaN", "Infinity", '""', '" "', '"pjm"', '"PJM"', '"nowhere"', '"' + "x" * 40 + '"',
    '"\\u00e9"', '"\\u0000"', '"\\ud800"', '"null"', '"nan"', '"1"', '"-1"', "[]", "{}",
    '["pjm"]', '["pjm","pjm"]', '["pjm","nowhere"]', "[1]", "[null]", '{"pjm":1}', '{"pjm":-1}',
    '{"pjm":1.5}', '{"":0}', "[[[]]]", '{"type":"ping"}', '"2026-11-27T15:00:00Z"',
    '"2026-11-27T15:00:00"', '"0001-01-01T00:00:00+01:00"', '"9999-12-31T23:59:59-01:00"',
    '"0999-01-01T00:00:00+00:00"', '"2026-11-27T15:00:00+25:00"', "[" * 2000, "",
]
fragments = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(lambda number: orjson.dumps(number).decode()),
    st.text(max_size=12).map(lambda text: orjson.dumps(text).decode()),
    st.text(max_size=6),  # not JSON at all
)


def templated(*templates: str) -> st.SearchStrategy[str]:
    """``templates`` with each ``{}`` slot filled by a fragment."""
    return st.tuples(st.sampled_from(templates), fragments, fragments).map(
        lambda drawn: drawn[0].replace("{}", drawn[1], 1).replace("{}", drawn[2], 1)
    )


scalars = (
    st.none() | st.booleans() | st.text(max_size=12)
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson can carry
    | st.floats(allow_nan=False, allow_infinity=False)
)
keys = st.sampled_from(["type", "zones", "price", "market_zone", "", "a"]) | st.text(max_size=6)
json_values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(keys, scalars, max_size=3)


def untrusted(near_valid: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Raw bytes, arbitrary JSON and near-valid text, as the bytes on the wire."""
    return st.one_of(
        st.binary(max_size=64),
        json_values.map(orjson.dumps),
        near_valid.map(lambda text: text.encode("utf-8", "surrogatepass")),
        near_valid.map(lambda text: text.encode("utf-8", "surrogatepass")),  # twice the weight
    )


client_frames = templated(
    "{}", '{"type":{}}', '{"type":"ping",{}:{}}', '{"type":"subscribe","zones":{}}',
    '{"type":"subscribe","zones":["pjm"],"since":{}}',
    '{"type":"subscribe","zones":["pjm"],"since":{"pjm":{}},"epoch":{}}',
    '{"type":"unsubscribe","zones":{}}', '{"type":"request_price_history","hours":{}}',
    '{"type":"request_price_history","limit":{}}',
    '{"type":"request_price_history","market_zone":{},"hours":{}}',
    '{"type":"request_price_history","hours":{},"limit":{}}', '[{},{}]',
)
publish_bodies = templated(
    "{}", '{"market_zone":{},"price":{}}', '{"market_zone":"pjm","price":{},"volume":{}}',
    '{"market_zone":"pjm","price":1,"timestamp":{}}', '{"market_zone":"pjm","price":1,{}:{}}',
    '[{"market_zone":"pjm","price":{}},{}]', "[{},{}]",
    "[" + '{"market_zone":"pjm","price":1},' * 5 + "{}]",  # one over the batch limit
)
any_offset = st.integers(min_value=-1439, max_value=1439).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
# Any microsecond of datetime's range as one integer: one choice where st.datetimes
# makes eight, and Hypothesis still probes both ends of the calendar.
moments = st.integers(min_value=0, max_value=(datetime.max - datetime.min) // timedelta(
    microseconds=1
)).map(lambda offset: datetime.min + timedelta(microseconds=offset))
iso_times = st.one_of(
    st.tuples(moments, any_offset).map(lambda drawn: drawn[0].replace(tzinfo=drawn[1]).isoformat()),
    moments.map(datetime.isoformat),  # naive: must be rejected
    st.sampled_from([fragment.strip('"') for fragment in FRAGMENTS if "T" in fragment]),
    st.text(max_size=30),
)
number_texts = st.one_of(
    st.floats().map(repr),
    st.integers().map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "1_000", " 5 ", "", "null", "None", "0x10"]),
    st.text(max_size=12),
)
ingest_entries = st.one_of(
    st.dictionaries(st.binary(max_size=12), st.binary(max_size=24), max_size=5),
    st.builds(
        lambda zone, price, volume, timestamp: {
            "market_zone": zone, "price": price, "volume": volume, "timestamp": timestamp
        },
        st.sampled_from(ZONES) | st.text(max_size=8), number_texts, number_texts, iso_times,
    ),
    st.tuples(st.sampled_from(["price", "volume", "timestamp", "extra", "market_zone"]),
              st.binary(max_size=24))
    .map(lambda drawn: {b"market_zone": b"pjm", b"price": b"1", drawn[0].encode(): drawn[1]}),
)


# --- checks of a successful result ----------------------------------------------------------


def check_price(body: messages.PriceBody) -> None:
    assert body.market_zone in ZONES
    assert isinstance(body.price, float)
    assert math.isfinite(body.price)
    assert body.volume is None or (math.isfinite(body.volume) and body.volume >= 0)
    assert TIMESTAMP.match(body.timestamp), body.timestamp
    orjson.loads(body.encode())  # what gets stored and broadcast is valid JSON


def check_message(message: messages.ClientMessage) -> None:
    match message:
        case messages.Subscribe(zones=zones, since=since, epoch=epoch):
            assert all(isinstance(zone, str) for zone in zones)
            assert all(isinstance(seq, int) and seq >= 0 for seq in since.values())
            assert epoch is None or isinstance(epoch, str)
        case messages.Unsubscribe(zones=zones):
            assert all(isinstance(zone, str) for zone in zones)
        case messages.RequestHistory(market_zone=zone, hours=hours, limit=limit):
            assert zone is None or isinstance(zone, str)
            assert hours is None or (math.isfinite(hours) and hours > 0)
            assert limit is None or (isinstance(limit, int) and limit > 0)
            assert hours is None or limit is None
        case _:
            assert isinstance(message, messages.Ping | messages.Heartbeat)


def check_protocol_error(error: ProtocolError) -> None:
    assert error.code in DECODER_CODES, error.code
    assert error.message


def check_auth_error(error: AuthError) -> None:
    assert error.close_code == CloseCode.INVALID_TOKEN


def check_field(error: ValidationError) -> None:
    assert isinstance(error.field, str)
    # the offending name itself, even "" (an unknown empty key)
    assert error.message


# --- the fuzz tests -------------------------------------------------------------------------


@FUZZ
@given(untrusted(client_frames) | client_frames)  # aiohttp hands text frames over as str
@example('{"type":"request_price_history","hours":1e308}')
@example('{"type":"subscribe","zones":[],"since":{"pjm":-1}}')
def test_client_message_decoder(frame: str | bytes) -> None:
    try:
        message = messages.decode_client_message(frame)
    except ProtocolError as exc:
        check_protocol_error(exc)
    else:
        check_message(message)


@FUZZ
@given(untrusted(publish_bodies))
@example(b'{"market_zone":"pjm","price":1,"timestamp":"0001-01-01T00:00:00+01:00"}')
@example(b'{"market_zone":"pjm","price":1,"timestamp":"9999-12-31T23:59:59-01:00"}')
def test_publish_body_validator(raw: bytes) -> None:
    try:
        bodies = messages.validate_publish_body(raw, zones=ZONES, now=NOW, max_batch=5)
    except ValidationError as exc:
        check_field(exc)
    else:
        assert 1 <= len(bodies) <= 5
        for body in bodies:
            check_price(body)


@FUZZ
@given(ingest_entries)
@example({b"market_zone": b"pjm", b"price": b"1", b"timestamp": b"0001-01-01T00:00:00+05:00"})
@example({b"market_zone": b"pjm", b"price": b"\xff"})
def test_ingest_fields_validator(fields: dict[bytes, bytes] | dict[str, str]) -> None:
    try:
        body = messages.validate_ingest_fields(fields, zones=ZONES, now=NOW)
    except ValidationError as exc:
        check_field(exc)
    else:
        check_price(body)


# Flat field lists as Redis sends them: names drawn mostly from the real ones (so
# repeats happen), values any bytes (NUL and invalid UTF-8 included).
flat_entries = st.lists(
    st.tuples(
        st.sampled_from([b"market_zone", b"price", b"volume", b"timestamp"])
        | st.binary(max_size=6),
        st.sampled_from([b"pjm", b"1.5", b"", b"2026-11-27T15:00:00Z"]) | st.binary(max_size=12),
    ),
    max_size=5,
).map(lambda pairs: [part for pair in pairs for part in pair])


@FUZZ_LIGHT
@given(flat_entries, st.booleans())
@example([b"market_zone", b"pjm", b"price", b"1", b"price", b"2"], False)
@example([b"market_zone", b"pjm", b"price", b"1\x00"], False)
@example([b"market_zone", b"pjm", b"price", b"1"], True)
def test_a_field_list_is_read_like_the_same_fields_one_by_one(
    fields: list[bytes], odd: bool
) -> None:
    """A list of bytes is decoded in one call (joined on NUL); any other sequence one
    field at a time. Both must give the same price or the same refusal."""
    fields = [*fields, b"price"] if odd else fields

    def outcome(given: Sequence[bytes]) -> object:
        try:
            return messages.validate_ingest_fields(given, zones=ZONES, now=NOW)
        except ValidationError as exc:
            return (exc.field, exc.message)

    assert outcome(fields) == outcome(tuple(fields))


@FUZZ_LIGHT
@given(st.datetimes(timezones=any_offset))
def test_times_with_an_offset_normalise_to_utc_milliseconds(moment: datetime) -> None:
    """The oracle: what ``astimezone`` says, or a clean rejection at the calendar's ends."""
    try:
        expected = moment.astimezone(UTC)
    except OverflowError:
        with pytest.raises(ValueError, match="range"):
            messages.normalise_timestamp(moment.isoformat())
        return
    e = expected  # spelled out field by field: an oracle independent of strftime/isoformat
    assert messages.normalise_timestamp(moment.isoformat()) == (
        f"{e.year:04d}-{e.month:02d}-{e.day:02d}T{e.hour:02d}:{e.minute:02d}:{e.second:02d}"
        f".{e.microsecond // 1000:03d}Z"
    )


VERIFIER = TokenVerifier(key=SECRET, algorithms=["HS256"])
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def signed(claims: dict[str, Any]) -> str:
    """A correctly signed token with arbitrary claims: only the claims are hostile."""
    return jwt.encode(claims, SECRET, algorithm="HS256")


@FUZZ_LIGHT
@given(
    st.one_of(
        st.text(max_size=80),
        st.lists(st.text(BASE64URL, max_size=16), min_size=3, max_size=3).map(".".join),
        st.dictionaries(keys, scalars, max_size=4).map(signed),
        st.tuples(st.integers(min_value=0, max_value=2**80) | scalars, json_values).map(
            lambda drawn: signed({"exp": drawn[0], "zones": drawn[1]})
        ),
    )
)
def test_token_verifier(token: str) -> None:
    try:
        grant = VERIFIER.verify(token)
    except AuthError as exc:
        check_auth_error(exc)
    else:
        assert grant.expires_at is not None
        assert grant.expires_at > time.time() - 5
        assert grant.zones is None or all(isinstance(zone, str) for zone in grant.zones)
