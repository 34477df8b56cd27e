"""The benchmark's minimal WebSocket client reads server frames exactly (hypothesis):
whatever the read boundaries, every frame comes out once, in order, with its payload."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.wsclients import OP_PING, FrameError, FrameReader, histogram_percentile
from teltonika.processor.live.protocol import text_frame_header

payloads = st.lists(
    st.binary(max_size=300) | st.integers(125, 70_000).map(lambda n: b"x" * n), max_size=6
)


@given(payloads, st.lists(st.integers(1, 5_000), max_size=40), st.booleans())
def test_frames_whatever_the_read_boundaries(
    frames: list[bytes], cuts: list[int], keep: bool
) -> None:
    stream = b"".join(text_frame_header(len(p)) + p for p in frames) + bytes((0x89, 2)) + b"hi"
    reader = FrameReader()
    out = []
    position = 0
    for cut in [*cuts, len(stream)]:
        out += reader.feed(stream[position : position + cut], keep)
        position += cut
        if position >= len(stream):
            break
    out += reader.feed(stream[position:], keep)
    assert [(fin, op, n) for fin, op, n, _ in out] == [
        *((True, 1, len(p)) for p in frames),
        (True, OP_PING, 2),
    ]
    assert [payload for *_, payload in out] == [*(frames if keep else [None] * len(frames)), b"hi"]
    assert not reader.buffer


def test_masked_or_extended_frames_are_refused() -> None:
    with pytest.raises(FrameError):
        FrameReader().feed(bytes((0x81, 0x82)) + b"abcdxy", True)
    with pytest.raises(FrameError):
        FrameReader().feed(bytes((0xC1, 2)) + b"xy", True)


def test_histogram_percentile() -> None:
    assert histogram_percentile({1: 50, 2: 49, 900: 1}, 50) == 2.0
    assert histogram_percentile({1: 50, 2: 49, 900: 1}, 99) == 900.0
