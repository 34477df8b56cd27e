"""The fast AVL decoder agrees with the one-field-at-a-time reference on any body.

``decode_avl`` reads a record's IO groups through a cache of compiled layouts keyed by the
group counts, and builds records without ``__init__``; ``tests/wire/reference.py`` does
neither. Random valid bodies, bodies whose records share one layout (so the cache is hit
with other ids and values), damaged bodies and more layouts than the cache holds must all
give the same records, or be refused by both.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from teltonika.codecs import load_codecs
from teltonika.wire import (
    CODEC_8,
    CODEC_8E,
    CODEC_16,
    NX,
    AVLPacket,
    AVLRecord,
    DecodeError,
    decode_avl,
    encode_avl,
    wrap,
)
from teltonika.wire.avl import LAYOUTS, SHAPE_BUDGET
from tests.wire.reference import ReferenceError, reference_decode_avl
from tests.wire.strategies import ID_BITS, avl_batches, avl_records, mutated

REGISTRY = load_codecs()


def verdict(function: Any, data: bytes, start: int, end: int) -> AVLPacket | None:
    """The decoded packet, or None when the decoder refuses the body."""
    try:
        packet: AVLPacket = function(data, start, end)
    except (DecodeError, ReferenceError):
        return None
    return packet


def assert_agree(body: bytes) -> AVLPacket | None:
    """Both decoders refuse *body*, or both return equal packets; also at an offset."""
    expected = verdict(reference_decode_avl, body, 0, len(body))
    assert verdict(decode_avl, body, 0, len(body)) == expected
    padded = b"\x00" * 5 + body + b"\xab" * 4  # inside a larger buffer, as in a frame
    assert verdict(decode_avl, padded, 5, 5 + len(body)) == expected
    return expected


@st.composite
def same_layout_batches(draw: st.DrawFn) -> tuple[int, list[AVLRecord]]:
    """Records whose IO groups have the same sizes (one cached layout), with their own ids
    and values: the case the layout cache speeds up."""
    codec_id = draw(st.sampled_from((CODEC_8, CODEC_8E, CODEC_16)))
    widths = draw(st.lists(st.sampled_from((1, 2, 4, 8)), max_size=30))
    nx_count = draw(st.integers(0, 3)) if codec_id == CODEC_8E else 0
    ids = st.integers(0, 2 ** ID_BITS[codec_id] - 1)
    records = []
    for _ in range(draw(st.integers(1, 6))):
        base = draw(avl_records(codec_id))
        io: list[tuple[int, int, int | bytes]] = [
            (draw(ids), width, draw(st.integers(0, 2 ** (8 * width) - 1))) for width in widths
        ]
        io += [(draw(ids), NX, draw(st.binary(max_size=12))) for _ in range(nx_count)]
        records.append(base._replace(io=tuple(io)))
    return codec_id, records


@given(batch=avl_batches(max_records=5))
def test_random_bodies_decode_as_the_reference(batch: tuple[int, list[AVLRecord]]) -> None:
    """Any valid body: the same records as the reference, directly and via the registry."""
    codec_id, records = batch
    body = encode_avl(codec_id, records)
    expected = assert_agree(body)
    assert expected is not None
    _codec, packet = REGISTRY.decode_frame(wrap(body))
    assert packet == expected


@given(batch=same_layout_batches())
def test_records_sharing_a_layout_decode_as_the_reference(
    batch: tuple[int, list[AVLRecord]],
) -> None:
    """A cached layout gives each record its own ids, values and NX bytes."""
    codec_id, records = batch
    assert assert_agree(encode_avl(codec_id, records)) is not None
    for record in records:  # one record per body: the cache is hit across bodies too
        assert assert_agree(encode_avl(codec_id, [record])) is not None


@settings(max_examples=600)
@given(data=st.data())
def test_damaged_bodies_get_the_reference_verdict(data: st.DataObject) -> None:
    """Flips, cuts, insertions and lying counts: refused by both decoders, or decoded
    to the same records by both."""
    codec_id, records = data.draw(
        st.one_of(avl_batches(max_records=3), same_layout_batches()), label="batch"
    )
    assert_agree(data.draw(mutated(encode_avl(codec_id, records)), label="damaged"))


def test_more_layouts_than_the_cache_holds() -> None:
    """Layouts evicted from the cache and seen again decode as before, and the cache
    never holds more elements than its budget."""
    layout = LAYOUTS[CODEC_8]
    bodies = []
    for ones in range(60):
        for twos in range(5):
            io = [(i, 1, i) for i in range(ones)] + [(i, 2, 7 * i) for i in range(twos)]
            record = AVLRecord(1, 0, 1.5, -2.5, 3, 4, 5, 6, 7, tuple(io))
            bodies.append(encode_avl(CODEC_8, [record]))
    for body in bodies + bodies[:20]:
        assert assert_agree(body) is not None
        assert layout.cached_elements <= SHAPE_BUDGET
