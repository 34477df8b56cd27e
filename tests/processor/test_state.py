"""Per-device state: bound, eviction order, never backwards (pure, no servers)."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from teltonika.processor.entries import Position
from teltonika.processor.state import DeviceSnapshot, DeviceState, IDeviceState
from tests.helpers import LoggedErrors


def latest(state: DeviceState, device: str) -> DeviceSnapshot:
    """The device's snapshot, which the test has just stored."""
    snapshot = state.get(device)
    assert snapshot is not None
    return snapshot


def pos(
    device: str,
    ts: int,
    received: int | None = None,
    speed: int = 1,
    priority: int = 0,
    event: int = 0,
    record_hash: int = 0,
) -> Position:
    return Position(
        entry_id="1-0",
        device_id=device,
        timestamp_ms=ts,
        received_at_ms=ts + 1 if received is None else received,
        latitude="1.5",
        longitude="2.5",
        altitude="3",
        angle="4",
        speed=str(speed),
        satellites="5",
        priority=str(priority),
        event_io_id=str(event),
        generation_type=None,
        codec="8",
        instance_id="i",
        io="{}",
        record_hash=record_hash,
    )


def test_provides_interface() -> None:
    assert verifyObject(IDeviceState, DeviceState(1))


def test_eviction_at_the_bound_least_recently_seen() -> None:
    """At the bound, the device seen least recently goes first (seen, not created)."""
    state = DeviceState(3)
    for device in "abc":
        state.apply(pos(device, 10))
    state.apply(pos("a", 5))  # an old record still counts as "seen"
    state.apply(pos("d", 10))
    assert set(state) == {"a", "c", "d"}
    assert len(state) == 3 and state.evictions == 1
    assert state.missing(["a", "b", "b", "e"]) == ["b", "e"]


def test_old_record_never_moves_latest_backwards() -> None:
    """A buffered older record updates last-seen only; the same row twice is a no-op."""
    state = DeviceState(10)
    moved: list[DeviceSnapshot] = []
    remove = state.add_listener(moved.append)
    assert state.apply(pos("a", 100, received=100, speed=50))
    assert not state.apply(pos("a", 50, received=200, speed=1))
    snapshot = latest(state, "a")
    assert (snapshot.timestamp_ms, snapshot.speed, snapshot.last_seen_ms) == (100, 50, 200)
    assert not state.apply(pos("a", 100, received=100, speed=50))
    assert latest(state, "a").last_seen_ms == 200
    assert state.apply(pos("a", 150, received=150, speed=9))
    assert latest(state, "a").last_seen_ms == 200  # last seen never goes backwards either
    assert [s.timestamp_ms for s in moved] == [100, 150]
    remove()
    state.apply(pos("a", 300))
    assert len(moved) == 2


def test_hydrate_does_not_override_newer_memory() -> None:
    """A rehydrated row older than what memory holds is ignored."""
    state = DeviceState(10)
    state.apply(pos("a", 100))
    state.hydrate(DeviceSnapshot("a", 50, 50, "0", "0", 0, 0, 0, 0))
    assert latest(state, "a").timestamp_ms == 100
    state.hydrate(DeviceSnapshot("b", 50, 50, "0", "0", 0, 0, 0, 0))
    assert [s.device_id for s in state.snapshot()] == ["a", "b"]


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DeviceState(0)


def test_a_failing_listener_does_not_stop_updates(logged_errors: LoggedErrors) -> None:
    """A listener that raises is logged; the state still moves and other listeners run."""
    state = DeviceState(10)
    seen: list[DeviceSnapshot] = []

    def broken(snapshot: DeviceSnapshot) -> None:
        raise ZeroDivisionError("a listener's bug")

    state.add_listener(broken)
    state.add_listener(seen.append)
    assert state.apply(pos("a", 100))
    assert latest(state, "a").timestamp_ms == 100 and len(seen) == 1
    assert len(logged_errors.flush()) == 1


def test_same_instant_event_then_priority_then_hash() -> None:
    """Among records of the same instant the latest is the event record (whatever the
    arrival order), then the higher priority, then the higher record hash; the periodic
    record of that second never replaces the event."""
    for order in (["periodic", "event"], ["event", "periodic"]):
        state = DeviceState(10)
        records = {
            "periodic": pos("a", 100, speed=40, record_hash=9),
            "event": pos("a", 100, speed=0, priority=1, event=239, record_hash=-5),
        }
        for name in order:
            state.apply(records[name])
        assert latest(state, "a").speed == 0 and latest(state, "a").event_io_id == 239
    state = DeviceState(10)
    state.apply(pos("a", 100, priority=1, event=1, record_hash=3))
    assert state.apply(pos("a", 100, priority=2, event=2, record_hash=1))  # panic wins
    assert not state.apply(pos("a", 100, priority=2, event=3, record_hash=0))
    assert state.apply(pos("a", 100, priority=2, event=3, record_hash=7))
    assert latest(state, "a").record_hash == 7
    assert state.apply(pos("a", 101))  # a later instant always wins


def test_hydrate_follows_the_same_rule() -> None:
    """A stored row of the same instant replaces memory only when it sorts later."""
    state = DeviceState(10)
    state.apply(pos("a", 100, event=0, record_hash=1))
    state.hydrate(DeviceSnapshot("a", 100, 100, "1", "2", 0, 0, 0, 0, 1, 239, -1))
    assert latest(state, "a").event_io_id == 239
    state.hydrate(DeviceSnapshot("a", 100, 100, "1", "2", 0, 0, 0, 0, 0, 0, 50))
    assert latest(state, "a").event_io_id == 239


def test_snapshot_is_a_value_equal_only_to_snapshots() -> None:
    """A snapshot (a NamedTuple, built as a tuple for speed) is immutable, hashable, equal
    to an equal snapshot and never to a plain tuple of the same fields; orjson refuses it."""
    import orjson

    state = DeviceState(2)
    state.apply(pos("a", 100, received=150))
    snapshot = latest(state, "a")
    assert snapshot == DeviceSnapshot("a", 100, 150, "1.5", "2.5", 3, 4, 1, 5, 0, 0, 0)
    assert snapshot != tuple(snapshot) and not snapshot == tuple(snapshot)  # noqa: SIM201
    assert hash(snapshot) == hash(snapshot._replace())
    with pytest.raises(AttributeError):
        snapshot.speed = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        orjson.dumps(snapshot)
    state.apply(pos("a", 50, received=160))  # older record: only last-seen moves
    assert state.get("a") == snapshot._replace(last_seen_ms=160)
