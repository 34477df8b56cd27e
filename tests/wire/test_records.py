"""AVLRecord and AVLPacket are tuples underneath (for speed), but behave as values of their
own type: equal only to their own kind, hashable, immutable, refused by orjson."""

from __future__ import annotations

import orjson
import pytest

from teltonika.wire import CODEC_8E, NX, AVLPacket, AVLRecord

RECORD = AVLRecord(1, 0, 1.5, -2.5, 3, 4, 5, 6, 7, ((1, 1, 1), (2, NX, b"x")))


@pytest.mark.parametrize(
    "value", [RECORD, AVLPacket(CODEC_8E, (RECORD,))], ids=["record", "packet"]
)
def test_tuple_backed_values_keep_their_identity(value: AVLRecord | AVLPacket) -> None:
    """Equal to an equal value of the same class, never to a plain tuple of the same
    fields (either way round); hashable; fields cannot be set; orjson refuses them."""
    same = type(value)(*value)
    plain = tuple(value)
    assert value == same
    assert (value != same) is False
    assert hash(value) == hash(same)
    assert (value == plain) is False and (plain == value) is False
    assert value != plain and plain != value
    assert {value, same} == {value}
    with pytest.raises(AttributeError):
        value.codec_id = 1  # type: ignore[misc, union-attr]
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(value)


def test_record_defaults_and_replace() -> None:
    """Keyword construction with the documented defaults; ``_replace`` makes a changed copy."""
    record = AVLRecord(
        timestamp_ms=1,
        priority=0,
        longitude=0.0,
        latitude=0.0,
        altitude=0,
        angle=0,
        satellites=0,
        speed=0,
        event_io_id=0,
    )
    assert record.io == () and record.generation_type is None
    moved = record._replace(latitude=54.5)
    assert moved.latitude == 54.5 and record.latitude == 0.0
    assert AVLPacket(CODEC_8E, (record,)).codec_name == "8E"
