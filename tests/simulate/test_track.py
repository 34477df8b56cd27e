"""Tracks, IO values and command answers look like a real FMB device's."""

from __future__ import annotations

import random

import pytest

from teltonika.simulate.answers import SimulatedDeviceState, answer
from teltonika.simulate.track import Track
from teltonika.wire import CODEC_8, CODEC_8E, CODEC_16, NX, decode_avl, encode_avl


@pytest.mark.parametrize("codec_id", [CODEC_8, CODEC_8E, CODEC_16])
def test_records_encode_in_their_codec_and_decode_back(codec_id: int) -> None:
    """An hour of records fits the codec (ids, NX only in 8E) and survives the round trip."""
    track = Track(random.Random(1), codec_id)
    records = []
    for second in range(0, 3600, 10):
        changed = track.advance(10)
        records.append(track.record(1_700_000_000_000 + second * 1000, event=changed))
    for start in range(0, len(records), 20):
        chunk = records[start : start + 20]
        body = encode_avl(codec_id, chunk)
        assert decode_avl(body, 0, len(body)).records == tuple(chunk)
    ids = {io_id for r in records for io_id, _w, _v in r.io}
    assert {239, 240, 21, 66, 67, 16, 199, 24} <= ids
    if codec_id == CODEC_8:
        assert max(ids) <= 255
    has_nx = any(width == NX for r in records for _i, width, _v in r.io)
    assert has_nx == (codec_id == CODEC_8E)


def test_track_is_plausible() -> None:
    """Timestamps strictly increase, the odometer never decreases, the vehicle stays near home,
    ignition changes produce priority-1 event records on IO 239."""
    track = Track(random.Random(2), CODEC_8E)
    start_lat, start_lon = track.latitude, track.longitude
    last_stamp = -1
    odometer = track.total_odometer_m
    events = 0
    for _ in range(2000):
        changed = track.advance(5)
        r = track.record(1_700_000_000_000, event=changed)  # same clock: still increasing
        assert r.timestamp_ms > last_stamp
        last_stamp = r.timestamp_ms
        io = r.io_values()
        total = io[16]
        assert isinstance(total, int) and total >= odometer
        odometer = total
        assert 0 <= r.speed <= 130
        assert io[240] == int(r.speed > 0)
        if changed:
            events += 1
            assert (r.priority, r.event_io_id) == (1, 239)
    assert events > 0
    assert abs(track.latitude - start_lat) < 3 and abs(track.longitude - start_lon) < 5


def test_answers() -> None:
    track = Track(random.Random(3), CODEC_8)
    state = SimulatedDeviceState(imei="356307042441013", started_s=1_700_000_000.0)
    now = 1_700_000_100.0
    assert answer("getinfo", state, track, now, 7).startswith("RTC:2023/11/14")
    assert "REC:7" in answer("getinfo", state, track, now, 7)
    assert "IMEI:356307042441013" in answer("getver", state, track, now, 0)
    assert answer("getstatus", state, track, now, 0).startswith("Data Link: 1")
    assert answer("getgps", state, track, now, 0).startswith("GPS:1")
    assert answer("setdigout 1?", state, track, now, 0) == "DOUT1:1 Timeout:INFINITY DOUT2:IGNORED"
    assert state.outputs == [1, 0]
    assert answer("setdigout x", state, track, now, 0).startswith("Wrong param")
    assert answer("frobnicate", state, track, now, 0) == "Unknown command: frobnicate"
