"""The record contract v1: field order, string values, exact degrees, IO JSON sentinels,
and JSON lines that read back to the same values as stream entries."""

from __future__ import annotations

import json
from base64 import b64decode
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from teltonika.codecs import load_codecs
from teltonika.contract import (
    CONTRACT_VERSION,
    FIELDS,
    MAX_SAFE_INTEGER,
    entry_fields,
    entry_values,
    format_degrees,
    io_bag,
    io_json,
    json_line,
    message_fields,
)
from teltonika.wire import NX, AVLPacket, AVLRecord, DeviceMessage
from tests.wire.strategies import avl_records
from tests.wire.vectors import VECTORS, is_valid

IMEI = "352093081452251"
RECORD = AVLRecord(
    1560161136000,
    1,
    -8.6313433,
    41.1234567,
    -6,
    270,
    9,
    87,
    240,
    ((239, 1, 1), (66, 2, 24080), (78, 8, 2**64 - 1), (385, NX, b"\x01\x02\xff")),
    None,
)


def as_dict(flat: list[bytes]) -> dict[str, bytes]:
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


def test_entry_fields_order_and_values() -> None:
    """An entry is the flat ``field, value`` list in FIELDS order, every value bytes."""
    flat = entry_fields(IMEI, "8E", RECORD, 1700000000123, "ingest-1")
    assert [name.decode() for name in flat[0::2]] == list(FIELDS)
    assert all(isinstance(value, bytes) for value in flat)
    entry = as_dict(flat)
    assert entry == {
        "v": b"1",
        "imei": IMEI.encode(),
        "codec": b"8E",
        "timestamp_ms": b"1560161136000",
        "received_at_ms": b"1700000000123",
        "latitude": b"41.1234567",
        "longitude": b"-8.6313433",
        "altitude": b"-6",
        "angle": b"270",
        "speed": b"87",
        "satellites": b"9",
        "priority": b"1",
        "event_io_id": b"240",
        "generation_type": b"",
        "instance_id": b"ingest-1",
        "io": entry["io"],
    }
    assert CONTRACT_VERSION == "1"
    assert tuple(flat[1::2]) == entry_values(IMEI, "8E", RECORD, 1700000000123, "ingest-1")


def test_generation_type_for_codec16() -> None:
    """Codec 16 records carry their generation type; other codecs an empty string."""
    record = AVLRecord(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0, (), 7)
    assert as_dict(entry_fields(IMEI, "16", record, 0, "i"))["generation_type"] == b"7"
    record = AVLRecord(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0, (), 0)
    assert as_dict(entry_fields(IMEI, "16", record, 0, "i"))["generation_type"] == b"0"


def test_io_sentinels() -> None:
    """Integers above 2**53 - 1 become {"__bigint"}; NX bytes become {"__buffer_b64"};
    everything else is a plain JSON number keyed by the decimal id."""
    io = json.loads(io_json(RECORD.io))
    assert io == {
        "239": 1,
        "66": 24080,
        "78": {"__bigint": str(2**64 - 1)},
        "385": {"__buffer_b64": "AQL/"},
    }
    assert b64decode(io["385"]["__buffer_b64"]) == b"\x01\x02\xff"


def test_bigint_boundary() -> None:
    """2**53 - 1 is the last integer written as a number; 2**53 is a sentinel."""
    assert MAX_SAFE_INTEGER == 2**53 - 1
    at = json.loads(io_json(((1, 8, 2**53 - 1),)))
    above = json.loads(io_json(((1, 8, 2**53),)))
    assert at == {"1": 9007199254740991}
    assert isinstance(at["1"], int)
    assert above == {"1": {"__bigint": "9007199254740992"}}
    assert json.loads(io_json(((1, 4, 2**32 - 1),))) == {"1": 4294967295}


def test_empty_io_and_empty_nx() -> None:
    """No IO elements is an empty object; an empty NX value is an empty base64 string."""
    assert io_json(()) == b"{}"
    assert json.loads(io_json(((7, NX, b""),))) == {"7": {"__buffer_b64": ""}}


@given(raw=st.integers(-(2**31), 2**31 - 1))
def test_format_degrees_is_exact_for_every_i32(raw: int) -> None:
    """The decimal string holds exactly the device's degrees x 10^7, with no trailing
    zeros: consumers can recover the sent integer."""
    text = format_degrees(raw / 10_000_000)
    assert int(Decimal(text) * 10**7) == raw
    assert Decimal(text) * 10**7 == raw
    if "." in text:
        assert not text.endswith("0")
        assert len(text.split(".")[1]) <= 7


def test_format_degrees_examples() -> None:
    """Whole degrees print without a point; the sign survives small negative values."""
    assert format_degrees(0.0) == "0"
    assert format_degrees(-0.0) == "0"
    assert format_degrees(25.0) == "25"
    assert format_degrees(-1e-7) == "-0.0000001"
    assert format_degrees(-214.7483648) == "-214.7483648"
    assert format_degrees(54.667425) == "54.667425"


def _check_line(record: AVLRecord, codec: str) -> None:
    flat = entry_fields(IMEI, codec, record, 42, "ingest-1")
    line = json_line(IMEI, codec, record, 42, "ingest-1")
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    parsed = json.loads(line)
    assert list(parsed) == list(FIELDS)
    entry = as_dict(flat)
    for name in FIELDS[:-1]:
        assert parsed[name] == entry[name].decode()
    assert parsed["io"] == json.loads(entry["io"]) == json.loads(json.dumps(io_bag(record.io)))


def test_json_line_reads_back_like_the_entry() -> None:
    """A JSON line holds the same strings as the entry, with io as an object."""
    _check_line(RECORD, "8E")


@given(record=avl_records(0x8E))
def test_json_line_and_entry_agree_for_any_record(record: AVLRecord) -> None:
    """For any 8E record (NX and 8-byte values included) line and entry agree, and the
    io JSON gives every raw value back."""
    _check_line(record, "8E")
    io = json.loads(io_json(record.io))
    last = {io_id: (width, value) for io_id, width, value in record.io}  # later id wins
    assert set(io) == {str(io_id) for io_id in last}
    for io_id, (width, value) in last.items():
        got = io[str(io_id)]
        if width == NX:
            assert b64decode(got["__buffer_b64"]) == value
        elif isinstance(got, dict):
            assert isinstance(value, int) and int(got["__bigint"]) == value > MAX_SAFE_INTEGER
        else:
            assert isinstance(value, int) and got == value <= MAX_SAFE_INTEGER


def test_entries_from_vectors() -> None:
    """Every record of every valid AVL vector makes an entry whose degrees give back the
    sent integers and whose io JSON parses."""
    registry = load_codecs()
    count = 0
    for vector in VECTORS:
        if vector["transport"] != "tcp" or vector["codec"] not in ("8", "8E", "16"):
            continue
        if not is_valid(vector) or "records" not in vector["expected"]:
            continue
        codec, packet = registry.decode_frame(bytes.fromhex(vector["hex"]))
        assert isinstance(packet, AVLPacket)
        for record in packet.records:
            entry = as_dict(entry_fields(IMEI, codec.name, record, 0, "i"))
            lat = Decimal(entry["latitude"].decode()) * 10**7
            assert lat == round(record.latitude * 10**7)
            assert len(json.loads(entry["io"])) <= len(record.io)
            count += 1
    assert count > 40


def test_message_fields() -> None:
    """A device message becomes the messages stream's string fields."""
    message = DeviceMessage(0x0D, 0x06, b"GTSL|6\r\n", timestamp_ms=1680554705000)
    assert message_fields(IMEI, message, "13", 5, "ingest-1") == {
        "v": "1",
        "imei": IMEI,
        "codec": "13",
        "type": "6",
        "payload_hex": b"GTSL|6\r\n".hex(),
        "text": "GTSL|6\r\n",
        "timestamp_ms": "1680554705000",
        "received_at_ms": "5",
        "instance_id": "ingest-1",
    }
    binary = DeviceMessage(0x0C, 0x06, b"\x01\x03\x00")
    fields = message_fields(IMEI, binary, "12", 5, "ingest-1")
    assert (fields["text"], fields["timestamp_ms"], fields["payload_hex"]) == ("", "", "010300")


def plain_entry_values(
    imei: str, codec_name: str, record: AVLRecord, received_at_ms: int, instance_id: str
) -> tuple[bytes, ...]:
    """The contract written field by field: what :func:`entry_values` must equal."""
    generation = record.generation_type
    return (
        b"1",
        imei.encode(),
        codec_name.encode(),
        b"%d" % record.timestamp_ms,
        b"%d" % received_at_ms,
        format_degrees(record.latitude).encode(),
        format_degrees(record.longitude).encode(),
        b"%d" % record.altitude,
        b"%d" % record.angle,
        b"%d" % record.speed,
        b"%d" % record.satellites,
        b"%d" % record.priority,
        b"%d" % record.event_io_id,
        b"" if generation is None else b"%d" % generation,
        instance_id.encode(),
        io_json(record.io),
    )


# Degrees as decoded (an i32 / 10^7), near the forms orjson writes differently from the
# contract (whole degrees, 1e-7), with eight or nine decimals (which the contract rounds
# to seven), and any float a caller may build a record with.
any_degrees = st.one_of(
    st.integers(-(2**31), 2**31 - 1).map(lambda raw: raw / 10_000_000),
    st.integers(-1000, 1000).map(lambda raw: raw / 10_000_000),
    st.integers(-214, 214).map(float),
    st.integers(-(2**31), 2**31 - 1).map(lambda raw: raw / 10 ** (8 + raw % 2)),
    st.floats(-214.7483648, 214.7483647),
)


@given(
    record=avl_records(0x8E),
    latitude=any_degrees,
    longitude=any_degrees,
    received_at_ms=st.integers(0, 2**63 - 1),
)
def test_entry_values_equal_the_field_by_field_encoding(
    record: AVLRecord, latitude: float, longitude: float, received_at_ms: int
) -> None:
    """The numbers written by one orjson call and split are exactly the field-by-field
    strings, degrees included (whole, tiny and non-multiple-of-10^-7 values too)."""
    record = record._replace(latitude=latitude, longitude=longitude)
    assert entry_values(IMEI, "8E", record, received_at_ms, "i-1") == plain_entry_values(
        IMEI, "8E", record, received_at_ms, "i-1"
    )


def test_entry_values_degrees_examples() -> None:
    """The degree forms orjson writes differently from the contract."""
    for degrees, text in ((25.0, b"25"), (-0.0, b"0"), (1e-7, b"0.0000001"), (0.1234, b"0.1234")):
        record = RECORD._replace(latitude=degrees, longitude=-degrees)
        values = dict(zip(FIELDS, entry_values(IMEI, "8E", record, 0, "i"), strict=True))
        assert values["latitude"] == text
        assert values["longitude"] == (text if text == b"0" else b"-" + text)
