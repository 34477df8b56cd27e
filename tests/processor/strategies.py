"""Hypothesis strategies for hostile stream entries (the processor's contract side),
shared by the parser tests (test_entries) and the consumer's any-entry tests."""

from __future__ import annotations

from hypothesis import strategies as st

from teltonika.contract import FIELDS, entry_fields
from teltonika.processor.entries import fields_dict
from teltonika.wire.records import NX, AVLRecord


def fields_of(flat: list[bytes]) -> dict[str, object]:
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


field_names = st.one_of(
    st.sampled_from(["io", "timestamp_ms", "latitude", "generation_type", "instance_id"]),
    st.sampled_from([*FIELDS, "x", "", "dead.id"]),
)
"""Field names, the ones whose values are parsed or converted more often."""
# digit strings around Python's int() limit (4,300 digits) as often as short ones
_DIGITS = st.one_of(st.integers(1, 25), st.integers(4295, 4305), st.integers(4306, 6000)).map(
    lambda n: "9" * n
)
_JSONISH = st.sampled_from(
    [
        '{"1":{"__bigint":"%s"}}',
        '{"%s":1}',
        '{"1":%s}',
        '{"1":{"__buffer_b64":"%s"}}',
        '{"1":[%s]}',
        "%s",
    ]
)
field_values = st.one_of(
    st.text(max_size=30),
    st.binary(max_size=30),
    _DIGITS,
    st.tuples(_JSONISH, st.one_of(_DIGITS, st.text(max_size=10))).map(lambda t: t[0] % t[1]),
    st.sampled_from(["", "-", "-0", "0", ".", "1e5", "NaN", "\x00", "\udcff", "8E", "1"]),
)
"""Field values: arbitrary text and bytes, huge numbers, JSON-like bags, edge cases."""
hostile_io_values = st.one_of(
    _DIGITS.map(lambda digits: '{"1":{"__bigint":"' + digits + '"}}'),
    _DIGITS.map(lambda digits: '{"' + digits + '":1}'),
    field_values,
)
"""Values of the io field: bags whose numbers int() would refuse, and anything else."""


@st.composite
def hostile_fields(draw: st.DrawFn) -> dict[str, object]:
    """A valid entry (most of the time) with up to three fields replaced or removed, or
    arbitrary names and values."""
    fields: dict[str, object] = {}
    if draw(st.integers(0, 4)):
        fields = fields_of(entry_fields("356307042441013", "8E", RECORD, 5, "i1"))
    count = draw(st.sampled_from([1, 1, 1, 2, 3]))  # mostly one: the others may hide it
    for name in draw(st.lists(field_names, min_size=count, max_size=count, unique=True)):
        fields[name] = draw(hostile_io_values if name == "io" else field_values)
    for name in draw(st.lists(field_names, max_size=2)):
        if draw(st.integers(0, 3)) == 0:
            fields.pop(name, None)
    return fields


def huge_bigint_entry() -> dict[str, object]:
    """The entry that used to kill the consumer: a __bigint of 5,000 digits."""
    fields = fields_of(entry_fields("356307042441013", "8E", RECORD, 5, "i1"))
    fields["io"] = '{"1":{"__bigint":"' + "9" * 5000 + '"}}'
    return fields
