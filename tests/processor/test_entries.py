"""The record contract read back: checks and sentinel reversal (pure, no servers)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teltonika.contract import entry_fields
from teltonika.processor.entries import ContractError, fields_dict, parse_entry, reverse_io
from teltonika.wire.records import NX, AVLRecord


def fields_of(flat):
    return fields_dict([v.decode() if isinstance(v, bytes) else v for v in flat])


RECORD = AVLRecord(
    timestamp_ms=1_700_000_000_123,
    priority=1,
    longitude=-0.1275,
    latitude=-51.5072,
    altitude=-12,
    angle=359,
    satellites=11,
    speed=88,
    event_io_id=239,
    io=((239, 1, 1), (78, 8, 2**64 - 1), (11, 8, 2**53), (10, NX, b"\x00\xff")),
    generation_type=None,
)


def test_parse_valid_entry():
    """A valid entry keeps every value exactly and reverses its sentinels."""
    p = parse_entry("1-0", fields_of(entry_fields("356307042441013", "8E", RECORD, 5, "i1")))
    assert p.device_id == "356307042441013"
    assert (p.timestamp_ms, p.received_at_ms) == (RECORD.timestamp_ms, 5)
    assert (p.latitude, p.longitude, p.altitude) == ("-51.5072", "-0.1275", "-12")
    assert p.generation_type is None and p.codec == "8E" and p.instance_id == "i1"
    assert orjson.loads(p.io) == {"239": 1, "78": 2**64 - 1, "11": 2**53, "10": "00ff"}
    assert str(2**64 - 1) in p.io  # digits, not a float


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("v", "2", "unknown_version"),
        ("imei", "35630704244101", "bad_field"),
        ("imei", "35630704244101x", "bad_field"),
        ("codec", "12", "bad_field"),
        ("timestamp_ms", "1.5", "bad_field"),
        ("latitude", "54.12345678", "bad_field"),
        ("speed", "-1", "bad_field"),
        ("generation_type", "x", "bad_field"),
        ("io", "[1]", "bad_io"),
        ("io", "{", "bad_io"),
        ("io", '{"a":1}', "bad_io"),
        ("io", '{"1":-1}', "bad_io"),
        ("io", '{"1":"text"}', "bad_io"),
        ("io", '{"1":true}', "bad_io"),
        ("io", '{"1":18446744073709551616}', "bad_io"),
        ("io", '{"1":{"__bigint":"18446744073709551616"}}', "bad_sentinel"),
        ("io", '{"1":{"__bigint":"-5"}}', "bad_sentinel"),
        ("io", '{"1":{"__bigint":5}}', "bad_sentinel"),
        ("io", '{"1":{"__buffer_b64":"***"}}', "bad_sentinel"),
        ("io", '{"1":{"__buffer_b64":"AA==","x":1}}', "bad_sentinel"),
        ("io", '{"1":{"__other":"1"}}', "bad_sentinel"),
    ],
)
def test_contract_violations(field, value, reason):
    """Each kind of violation raises ContractError with its low-cardinality reason."""
    fields = fields_of(entry_fields("356307042441013", "8E", RECORD, 5, "i1"))
    fields[field] = value
    with pytest.raises(ContractError) as info:
        parse_entry("1-0", fields)
    assert info.value.reason == reason


def test_missing_and_binary_fields():
    """A missing field is missing_field; a value that is not UTF-8 (bytes) is bad_field."""
    fields = fields_of(entry_fields("356307042441013", "8E", RECORD, 5, "i1"))
    del fields["angle"]
    with pytest.raises(ContractError, match="missing_field"):
        parse_entry("1-0", fields)
    fields = fields_of(entry_fields("356307042441013", "8E", RECORD, 5, "i1"))
    fields["instance_id"] = b"\xff"
    with pytest.raises(ContractError, match="bad_field"):
        parse_entry("1-0", fields)
    with pytest.raises(ContractError, match="missing_field"):
        parse_entry("1-0", {})


def test_io_without_sentinels_passes_through():
    """An IO bag without sentinels is handed to jsonb as it came (no re-serialisation)."""
    text = '{"1":1,"66":12480}'
    assert reverse_io(text) is text


io_values = st.one_of(
    st.tuples(st.just(1), st.integers(0, 255)),
    st.tuples(st.just(2), st.integers(0, 2**16 - 1)),
    st.tuples(st.just(4), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(8), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(NX), st.binary(max_size=40)),
)


@given(
    io=st.lists(st.tuples(st.integers(0, 65535), io_values), max_size=12, unique_by=lambda t: t[0]),
    lat=st.integers(-900_000_000, 900_000_000),
    lon=st.integers(-1_800_000_000, 1_800_000_000),
    ts=st.integers(0, 2**42),
)
def test_any_encoded_record_parses_back(io, lat, lon, ts):
    """Whatever the ingestion encoder writes, the processor reads back exactly."""
    rec = AVLRecord(
        timestamp_ms=ts,
        priority=0,
        longitude=lon / 1e7,
        latitude=lat / 1e7,
        altitude=0,
        angle=0,
        satellites=0,
        speed=0,
        event_io_id=0,
        io=tuple((io_id, width, value) for io_id, (width, value) in io),
    )
    p = parse_entry("1-0", fields_of(entry_fields("356307042441013", "8E", rec, 1, "i")))
    assert p.timestamp_ms == ts
    assert round(float(p.latitude) * 1e7) == lat
    expected = {str(io_id): value.hex() if width == NX else value for io_id, (width, value) in io}
    assert orjson.loads(p.io) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"1": 5, "2" :{"__bigint" : "18446744073709551615"}}', {"1": 5, "2": 2**64 - 1}),
        ('{"007":1}', {"007": 1}),
        ('{"1":{"__buffer_b64":"AAE="}}', {"1": "0001"}),
        ('{"1":{"__bigint":"007"}}', {"1": 7}),
        ("{}", {}),
    ],
)
def test_io_general_and_fast_paths_agree(text, expected):
    """Bags the fast path does not recognise (spaces, leading zeros) are read by the
    general path with the same result."""
    assert orjson.loads(reverse_io(text)) == expected


def test_unusual_but_valid_fields_take_the_general_path():
    """A generation type the fast path does not accept still parses field by field."""
    fields = fields_of(entry_fields("356307042441013", "16", RECORD, 5, "i1"))
    fields["generation_type"] = "1234567"
    assert parse_entry("1-0", fields).generation_type == "1234567"


def test_copy_line_escapes_free_text():
    """instance_id and io are the only free text; COPY's special characters are escaped."""
    fields = fields_of(entry_fields("356307042441013", "8", RECORD, 5, "a\tb\\c\nd"))
    fields["io"] = '{"1":\n2}'
    line = parse_entry("1-0", fields).copy_line()
    assert line.split("\t")[-2:] == ["a\\tb\\\\c\\nd", '{"1":\\n2}']
    assert line.split("\t")[11] == "\\N"  # no generation type: NULL
