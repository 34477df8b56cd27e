"""The record contract read back: checks and sentinel reversal (pure, no servers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from teltonika.contract import entry_fields
from teltonika.processor.entries import (
    REASONS,
    ContractError,
    Position,
    parse_entry,
    parse_fields,
    reverse_io,
)
from teltonika.wire.records import NX, AVLRecord
from tests.processor.strategies import RECORD, fields_of, hostile_fields, huge_bigint_entry


def test_parse_valid_entry() -> None:
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
        # numbers are bounded before they are converted (int() refuses 4,300+ digits)
        ("io", '{"1":{"__bigint":"' + "9" * 5000 + '"}}', "bad_sentinel"),
        ("io", '{"1":{"__bigint":"' + "0" * 21 + '"}}', "bad_sentinel"),
        ("io", '{"' + "1" * 5000 + '":1}', "bad_io"),
        ("io", '{"123456":1}', "bad_io"),
        ("io", "[" * 5000, "bad_io"),
        ("io", '{"1":' + "9" * 5000 + "}", "bad_io"),
        ("timestamp_ms", "9" * 5000, "bad_field"),
        ("generation_type", "9" * 5000, "bad_field"),
        ("instance_id", "a\x00b", "bad_field"),
        ("instance_id", "\udcff", "bad_field"),
    ],
)
def test_contract_violations(field: str, value: str, reason: str) -> None:
    """Each kind of violation raises ContractError with its low-cardinality reason."""
    fields = fields_of(entry_fields("356307042441013", "8E", RECORD, 5, "i1"))
    fields[field] = value
    with pytest.raises(ContractError) as info:
        parse_entry("1-0", fields)
    assert info.value.reason == reason


def test_missing_and_binary_fields() -> None:
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


def test_io_without_sentinels_passes_through() -> None:
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
def test_any_encoded_record_parses_back(
    io: list[tuple[int, tuple[int, int | bytes]]], lat: int, lon: int, ts: int
) -> None:
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
    expected = {
        str(io_id): value.hex() if isinstance(value, bytes) else value
        for io_id, (width, value) in io
    }
    assert orjson.loads(p.io) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"1": 5, "2" :{"__bigint" : "18446744073709551615"}}', {"1": 5, "2": 2**64 - 1}),
        ('{"007":1}', {"7": 1}),
        ('{"1":{"__buffer_b64":"AAE="}}', {"1": "0001"}),
        ('{"1":{"__bigint":"007"}}', {"1": 7}),
        ("{}", {}),
    ],
)
def test_io_general_and_fast_paths_agree(text: str, expected: dict[str, object]) -> None:
    """Bags the fast path does not recognise (spaces, leading zeros) are read by the
    general path with the same result, as compact JSON with canonical ids."""
    out = reverse_io(text)
    assert orjson.loads(out) == expected
    assert out == orjson.dumps(expected).decode()


def test_unusual_but_valid_fields_take_the_general_path() -> None:
    """A generation type the fast path does not accept still parses field by field."""
    fields = fields_of(entry_fields("356307042441013", "16", RECORD, 5, "i1"))
    fields["generation_type"] = "1234567"
    assert parse_entry("1-0", fields).generation_type == "1234567"


def test_copy_line_escapes_free_text() -> None:
    """instance_id is the only free text; COPY's special characters are escaped. The io
    bag goes out as compact JSON, the record hash last."""
    fields = fields_of(entry_fields("356307042441013", "8", RECORD, 5, "a\tb\\c\nd"))
    fields["io"] = '{"1":\n2}'
    position = parse_entry("1-0", fields)
    line = position.copy_line()
    assert line.split("\t")[-3:] == ["a\\tb\\\\c\\nd", '{"1":2}', str(position.record_hash)]
    assert line.split("\t")[11] == "\\N"  # no generation type: NULL


def test_numbers_are_canonical_whatever_their_spelling() -> None:
    """Leading zeros, "-0" and trailing fractional zeros are rewritten canonically, so the
    stored values and the record hash do not depend on how a writer spelled them."""
    fields = fields_of(entry_fields("356307042441013", "16", RECORD, 5, "i1"))
    canonical = parse_entry("1-0", fields)
    spelled = dict(fields)
    spelled.update(
        latitude="-051.5072000",
        longitude="-0.12750",
        altitude="-012",
        speed="088",
        priority="01",
        event_io_id="0239",
        io='{"10": {"__buffer_b64": "AP8="}, "0011":{"__bigint":"09007199254740992"},'
        ' "78": 18446744073709551615, "239": 1}',
    )
    other = parse_entry("2-0", spelled)
    assert (other.latitude, other.longitude, other.altitude) == ("-51.5072", "-0.1275", "-12")
    assert (other.speed, other.priority, other.event_io_id) == ("88", "1", "239")
    assert other.record_hash == canonical.record_hash
    assert orjson.loads(other.io) == orjson.loads(canonical.io)
    zero = dict(fields, latitude="-0.0000", altitude="-0", generation_type="007")
    parsed = parse_entry("3-0", zero)
    assert (parsed.latitude, parsed.altitude, parsed.generation_type) == ("0", "0", "7")
    padded = parse_entry(
        "4-0", dict(fields, timestamp_ms="000" + str(fields["timestamp_ms"]), received_at_ms="0005")
    )
    assert (padded.timestamp_ms, padded.received_at_ms) == (RECORD.timestamp_ms, 5)
    assert padded.record_hash == canonical.record_hash
    assert padded.copy_row()[1] == str(RECORD.timestamp_ms)
    # a number is bounded by its length as spelled (18 digits), zeros included
    with pytest.raises(ContractError, match="timestamp_ms"):
        parse_entry("5-0", dict(fields, timestamp_ms="0" * 6 + str(fields["timestamp_ms"])))
    # an IMEI is an identifier, not a number: 15 digits exactly, a leading zero kept
    assert parse_entry("6-0", dict(fields, imei="035630704244101")).device_id == ("035630704244101")
    with pytest.raises(ContractError, match="imei"):
        parse_entry("7-0", dict(fields, imei="0356307042441013"))


def test_a_repeated_io_id_keeps_its_last_value_everywhere() -> None:
    """An IO id twice in one record: the ingestion side keeps the last value (one key in
    the entry's JSON); an entry whose JSON repeats a key (another writer) is read the same
    way on both paths (last value, as jsonb reads it), so its stored bag and record hash
    equal those of the record written once with that value."""
    twice = RECORD._replace(io=((239, 1, 1), (66, 2, 5), (239, 1, 0)))
    once = RECORD._replace(io=((239, 1, 0), (66, 2, 5)))
    written = fields_of(entry_fields("356307042441013", "8E", twice, 5, "i1"))
    assert orjson.loads(str(written["io"])) == {"239": 0, "66": 5}
    expected = parse_entry("1-0", fields_of(entry_fields("356307042441013", "8E", once, 5, "i1")))
    assert parse_entry("1-0", written).record_hash == expected.record_hash
    for text in (
        '{"239":1,"66":5,"239":0}',  # fast-path form
        '{"239": 1, "66": 5, "0239": 0}',  # general path
        '{"239":{"__bigint":"1"},"66":5,"239":0}',
    ):
        parsed = parse_entry("2-0", dict(written, io=text))
        assert orjson.loads(parsed.io) == {"239": 0, "66": 5}
        assert parsed.io.count('"239"') == 1
        assert parsed.record_hash == expected.record_hash


def test_record_hash_is_the_record_content() -> None:
    """A resend (another received_at_ms and instance_id) has the same hash; a record that
    differs in any content field, or in one IO value, has another."""
    fields = fields_of(entry_fields("356307042441013", "8E", RECORD, 5, "i1"))
    first = parse_entry("1-0", fields)
    resend = parse_entry("9-0", dict(fields, received_at_ms="99", instance_id="i2"))
    assert resend.record_hash == first.record_hash
    assert parse_entry("1-0", dict(fields, codec="8")).record_hash == first.record_hash
    changes = {
        "timestamp_ms": "1700000000124",
        "latitude": "-51.5073",
        "longitude": "-0.1276",
        "altitude": "-11",
        "angle": "358",
        "speed": "87",
        "satellites": "10",
        "priority": "2",
        "event_io_id": "240",
        "generation_type": "5",
        "io": str(fields["io"]).replace('"239":1', '"239":0'),
    }
    hashes = {first.record_hash}
    for name, value in changes.items():
        hashes.add(parse_entry("1-0", dict(fields, **{name: value})).record_hash)
    assert len(hashes) == len(changes) + 1


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("54.6872000", "54.6872"),
        ("054.10", "54.1"),
        ("-0.0", "0"),
        ("-0", "0"),
        ("0", "0"),
        ("12.0000000", "12"),
        ("-0.5", "-0.5"),
        ("-180.0000001", "-180.0000001"),
        ("100", "100"),
    ],
)
def test_canonical_degrees(text: str, canonical: str) -> None:
    """One text form for degrees, whatever the source (a record or a numeric(10,7) row)."""
    from teltonika.processor.identity import canonical_degrees

    assert canonical_degrees(text) == canonical


@example(fields=huge_bigint_entry())
@given(fields=hostile_fields())
def test_any_field_map_parses_or_raises_contract_error(fields: dict[str, object]) -> None:
    """Whatever names and values an entry holds (arbitrary bytes and text, thousands of
    digits, malformed JSON and sentinels), parse_entry returns a Position or raises
    ContractError with one of the contract reasons: never anything else."""
    try:
        position = parse_entry("1-0", fields)
    except ContractError as e:
        assert e.reason in REASONS and e.reason not in ("check_failed", "max_deliveries")
        return
    position.copy_line().encode("utf-8")  # what goes to COPY can always be encoded


def outcome(parse: Callable[..., Position], *args: Any) -> Position | str:
    try:
        return parse(*args)
    except ContractError as e:
        return e.reason


@example(fields=huge_bigint_entry())
@example(fields=fields_of(entry_fields("356307042441013", "16", RECORD, 5, "i1")))
@given(fields=hostile_fields())
def test_the_field_list_path_agrees_with_the_mapping_path(fields: dict[str, object]) -> None:
    """parse_fields (the consumer's: straight from the reply's list when the names are in
    the writer's order) gives the same Position, or the same reason, as parse_entry."""
    flat = [part for pair in fields.items() for part in pair]
    assert outcome(parse_fields, "1-0", flat) == outcome(parse_entry, "1-0", fields)


def test_oversized_entries_are_refused_before_they_are_read() -> None:
    """More than MAX_FIELDS fields, or any name or value longer than MAX_VALUE_CHARS, is
    ``oversized`` whichever path the entry takes (a fast-path io, an extra field)."""
    from teltonika.processor.entries import MAX_FIELDS, MAX_VALUE_CHARS, parse_fields
    from teltonika.processor.streams import LETTER_CHARS, LETTER_FIELDS, letter_fields

    good = [f.decode() for f in entry_fields("356307042441013", "8E", RECORD, 1, "i")]
    many = good + [x for i in range(MAX_FIELDS) for x in (f"x{i}", "1")]
    with pytest.raises(ContractError) as raised:
        parse_fields("1-1", many)
    assert raised.value.reason == "oversized"
    big_io = list(good)
    big_io[big_io.index("io") + 1] = '{"1":' + "1" * MAX_VALUE_CHARS + "}"
    extra = [*good, "note", "n" * (MAX_VALUE_CHARS + 1)]
    for fields in (big_io, extra):
        with pytest.raises(ContractError) as raised:
            parse_fields("1-1", fields)
        assert raised.value.reason == "oversized"
        with pytest.raises(ContractError):
            parse_entry("1-1", dict(zip(fields[0::2], fields[1::2], strict=True)))
    assert parse_fields("1-1", [*good, "note", "n" * MAX_VALUE_CHARS]).device_id

    assert letter_fields(good) == (good, None)
    kept, note = letter_fields(many + ["x"] * 100_000)
    assert note is not None
    assert len(kept) == 2 * LETTER_FIELDS and note.startswith(
        f"{(len(many) + 100_000) // 2} fields"
    )
    kept, note = letter_fields(extra + extra)
    assert sum(len(x) for x in kept) <= LETTER_CHARS and note
