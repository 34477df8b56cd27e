"""The live broadcast's pure parts, without a network: the wire messages (hypothesis),
the latest map's rules, loading from PostgreSQL merged with live updates, the hub's
ordering and conflation, the single-flight cache, and the handshake decisions."""

from __future__ import annotations

import json
from typing import Any, TypedDict

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from teltonika.contract import FIELDS
from teltonika.processor.entries import Position, parse_entry
from teltonika.processor.live import messages as m
from teltonika.processor.live.cache import SingleFlightCache
from teltonika.processor.live.handshake import (
    credential_from_headers,
    origin_allowed,
    parse_allowed,
)
from teltonika.processor.live.hub import Hub, Subscription
from teltonika.processor.live.latest import ADVANCED, FUTURE, SEEN, UNCHANGED, LatestMap
from teltonika.processor.live.loader import LatestLoader
from teltonika.processor.live.metrics import LiveMetrics
from teltonika.processor.state import DeviceState, latest_key
from tests.processor.live.feeder import entry

DEVICE = "352093081234567"
NOW = 1_800_000_000_000


def pos(
    ts: int,
    device: str = DEVICE,
    rx: int | None = None,
    lat: float = 41.0,
    *,
    event_io_id: int = 0,
    priority: int = 0,
    record_hash: int = 0,
) -> m.LivePosition:
    return m.make_position(
        device,
        ts,
        ts + 100 if rx is None else rx,
        lat,
        19.0,
        10,
        5,
        90,
        7,
        event_io_id=event_io_id,
        priority=priority,
        record_hash=record_hash,
    )


# -- messages -----------------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["subscribe", "unsubscribe", "ping", "x"]) | json_values,
        "id": st.text(max_size=70) | json_values,
        "event": st.text(max_size=70) | json_values,
        "devices": st.lists(st.from_regex(r"[0-9]{15}", fullmatch=True) | st.text(), max_size=5)
        | json_values,
    },
)


@given(st.binary(max_size=300))
def test_parser_takes_any_bytes(payload: bytes) -> None:
    """Arbitrary bytes give a request or a RequestError, never anything else."""
    try:
        m.parse_request(payload, 10)
    except m.RequestError as e:
        assert e.code in m.ERROR_CODES


@given(requests)
def test_parser_takes_any_object(message: dict[str, Any]) -> None:
    """Any JSON object gives a valid request or a RequestError with a known code; a
    usable id is echoed in the error."""
    try:
        request = m.parse_request(json.dumps(message).encode(), 3)
    except m.RequestError as e:
        assert e.code in m.ERROR_CODES and not e.fatal
        if e.request_id is not None:
            assert e.request_id == message.get("id")
        return
    assert 1 <= len(request.id) <= m.MAX_ID_CHARS
    if isinstance(request, m.Subscribe):
        assert (request.event is None) != (request.devices is None)
        assert request.devices is None or 1 <= len(request.devices) <= 3


@given(
    st.dictionaries(
        st.sampled_from(FIELDS),
        st.text(max_size=25) | st.binary(max_size=5) | st.none(),
        max_size=6,
    ),
    st.sets(st.sampled_from(FIELDS), max_size=3),
)
def test_position_from_any_fields(changed: dict[str, Any], removed: set[str]) -> None:
    """Any entry (a valid one with values replaced or removed) gives a position or None,
    never an exception; a position is exactly the writer's record (same key)."""
    fields: dict[str, Any] = {**entry(DEVICE, NOW), **changed}
    for name in removed:
        fields.pop(name, None)
    position = m.position_from_fields(fields)
    flat = [x for pair in fields.items() for x in pair]
    assert m.position_from_entry("1-0", flat) == position
    if position is not None:
        assert orjson.loads(position.wire)["device"] == position.device
        assert position.key == latest_key(parse_entry("1-0", fields))


def test_position_wire_format() -> None:
    """Coordinates are JSON numbers with at most 7 decimals; fix follows satellites."""
    fields = {
        **entry(DEVICE, 1778572801000, rx=1778572801377, lat="41.3276001", sats=0),
        "longitude": "-19.8189002",
        "altitude": "-5",
        "speed": "64",
        "angle": "272",
    }
    position = m.position_from_fields(fields)
    assert position is not None
    assert orjson.loads(position.wire) == {
        "device": DEVICE,
        "ts": 1778572801000,
        "lat": 41.3276001,
        "lon": -19.8189002,
        "alt": -5,
        "speed": 64,
        "heading": 272,
        "sats": 0,
        "fix": False,
        "rx": 1778572801377,
    }
    assert m.position_from_fields({**fields, "latitude": "91"}) is None
    assert m.position_from_fields({**fields, "v": "2"}) is None  # the writer dead-letters it
    assert m.position_from_entry("1-0", "not a list") is None
    assert pos(1, lat=1 / 3).lat == 0.3333333
    array = m.encode_positions_array([position, position])
    message = orjson.loads(m.encode_positions('a"b', 3, array))
    assert message["id"] == 'a"b' and message["skipped"] == 3 and len(message["positions"]) == 2


# -- latest map ---------------------------------------------------------------------------
def test_latest_rules() -> None:
    """Newer advances; equal and older only move seen; a future ts is ignored; bounded."""
    latest = LatestMap(2, 300_000)
    assert latest.apply(pos(NOW), NOW) is ADVANCED
    assert latest.apply(pos(NOW, rx=NOW + 5_000), NOW) is SEEN  # equal ts: duplicate
    assert latest.apply(pos(NOW - 1, rx=NOW + 1), NOW) is UNCHANGED  # late, seen not newer
    assert latest.apply(pos(NOW - 1, rx=NOW + 9_000), NOW) is SEEN
    assert latest.apply(pos(NOW + 301_000), NOW) is FUTURE
    entry = latest.get(DEVICE)
    assert entry is not None and entry.position is not None
    assert entry.position.ts == NOW and entry.seen == NOW + 301_100
    latest.apply(pos(NOW, device="2" * 15), NOW)
    latest.apply(pos(NOW, device="3" * 15), NOW)
    assert len(latest) == 2 and DEVICE not in latest


@pytest.mark.parametrize("live_ts, stored_ts, expected", [(NOW, NOW - 5, NOW), (NOW - 5, NOW, NOW)])
def test_loaded_rows_merge_with_live_updates(live_ts: int, stored_ts: int, expected: int) -> None:
    """A device missing from the map is loaded in one query; a live update that arrives
    while the query runs is kept when newer, replaced when older (merged by ts)."""
    metrics = LiveMetrics.create(CollectorRegistry())
    latest = LatestMap(10, 300_000)
    hub = Hub(latest, Clock(), metrics, lambda: NOW)
    query: Deferred[list[Any]] = Deferred()
    calls: list[tuple[Any, ...]] = []

    def run(fn: Any, *args: Any) -> Deferred[list[Any]]:
        calls.append(args)
        return query

    loader = LatestLoader(latest, run, lambda: NOW, metrics)
    other = "4" * 15
    done = Deferred.fromCoroutine(loader.ensure([DEVICE, other]))
    hub.receive([pos(live_ts)])  # buffered in the map while PostgreSQL answers
    query.callback([(DEVICE, stored_ts, stored_ts, 41.5, 19.5, 1, 2, 3, 4, 0, 0, 0)])
    assert done.called and len(calls) == 1 and calls[0][0] == [DEVICE, other]
    entry = latest.get(DEVICE)
    assert entry is not None and entry.position is not None and entry.position.ts == expected
    absent = latest.get(other)
    assert absent is not None and absent.position is None  # known to have no row
    Deferred.fromCoroutine(loader.ensure([DEVICE, other]))
    assert len(calls) == 1  # nothing missing any more: no query


# -- the "latest" rule, shared with the processor's state and PostgreSQL's LATEST_ORDER ----
class SameInstant(TypedDict):
    event_io_id: int
    priority: int
    record_hash: int


PERIODIC: SameInstant = {"event_io_id": 0, "priority": 0, "record_hash": 2**62}
EVENT: SameInstant = {"event_io_id": 239, "priority": 0, "record_hash": -(2**62)}


@pytest.mark.parametrize("order", ["periodic first", "event first"])
def test_latest_same_ts_event_wins_either_order(order: str) -> None:
    """Two records of one instant: the event record is the latest whichever arrives
    first (though the periodic one has the higher hash); the first ``ADVANCED`` and the
    second only if it is the event; a resend of the latest is a duplicate."""
    latest = LatestMap(10, 300_000)
    periodic, event = pos(NOW, lat=41.1, **PERIODIC), pos(NOW, lat=41.2, **EVENT)
    first, second = (periodic, event) if order == "periodic first" else (event, periodic)
    assert latest.apply(first, NOW) is ADVANCED
    assert latest.apply(second, NOW) is (ADVANCED if second is event else UNCHANGED)
    assert latest.apply(pos(NOW, lat=41.2, **EVENT), NOW) is UNCHANGED  # the same record
    found = latest.get(DEVICE)
    assert found is not None and found.position == event


def test_latest_same_ts_priority_then_hash() -> None:
    """Within one instant and kind: the higher priority, then the higher record hash."""
    latest = LatestMap(10, 300_000)
    latest.apply(pos(NOW, priority=2, record_hash=-5), NOW)
    assert latest.apply(pos(NOW, priority=1, record_hash=9), NOW) is UNCHANGED
    assert latest.apply(pos(NOW, priority=2, record_hash=7), NOW) is ADVANCED
    assert latest.apply(pos(NOW - 1, event_io_id=1, priority=2, record_hash=99), NOW) is UNCHANGED
    found = latest.get(DEVICE)
    assert found is not None and found.position is not None
    assert found.position.key == (NOW, False, 2, 7)


def _record(ts: int, event: int, priority: int, lat: str) -> dict[str, str]:
    return {
        **entry(DEVICE, ts, lat=lat),
        "event_io_id": str(event),
        "priority": str(priority),
        "io": f'{{"{event}":1}}' if event else "{}",
    }


def _row(r: Position) -> tuple[Any, ...]:
    """A stored record as the loader's query returns it."""
    return (
        r.device_id,
        r.timestamp_ms,
        r.received_at_ms,
        float(r.latitude),
        float(r.longitude),
        int(r.altitude),
        int(r.speed),
        int(r.angle),
        int(r.satellites),
        int(r.event_io_id),
        int(r.priority),
        r.record_hash,
    )


records = st.lists(
    st.builds(
        _record,
        st.sampled_from([NOW - 1000, NOW]),
        st.sampled_from([0, 0, 239, 240]),
        st.sampled_from([0, 1, 2]),
        st.sampled_from(["41.1", "41.2", "41.3"]),
    ),
    min_size=1,
    max_size=8,
)


@given(records, st.data())
def test_live_map_ends_where_state_and_sql_end(
    entries: list[dict[str, str]], data: st.DataObject
) -> None:
    """Whatever the records of one device and their split between PostgreSQL (loaded
    when a subscription needs the device) and the live stream (some arriving while the
    query runs, some after), the live map and what a subscriber was last shown end on
    the record the processor's own state and ``ORDER BY LATEST_ORDER`` call the latest."""
    stored = data.draw(st.lists(st.sampled_from(entries), unique_by=id))
    live = data.draw(st.permutations([e for e in entries if all(e is not s for s in stored)]))
    during = data.draw(st.integers(0, len(live)))
    state = DeviceState(10)
    for fields in entries:
        state.apply(parse_entry("1-0", fields))
    expected = state.get(DEVICE)
    assert expected is not None

    metrics = LiveMetrics.create(CollectorRegistry())
    latest = LatestMap(10, 300_000)
    clock = Clock()
    hub = Hub(latest, clock, metrics, lambda: NOW)
    query: Deferred[list[Any]] = Deferred()
    loader = LatestLoader(latest, lambda fn, *args: query, lambda: NOW, metrics)
    loading = Deferred.fromCoroutine(loader.ensure([DEVICE]))
    hub.receive([p for p in map(m.position_from_fields, live[:during]) if p is not None])
    rows = sorted(  # what LATEST_SQL returns: the stored row first in LATEST_ORDER
        (parse_entry("1-0", f) for f in stored), key=latest_key, reverse=True
    )[:1]
    query.callback([_row(r) for r in rows])
    assert loading.called
    outlet = Outlet()
    hub.attach(Subscription("s", None, outlet), [m.Member(DEVICE)])
    for fields in live[during:]:
        hub.receive([p for p in [m.position_from_fields(fields)] if p is not None])
        clock.advance(0.1)
    found = latest.get(DEVICE)
    assert found is not None and found.position is not None
    assert found.position.key == expected.latest_key()
    shown = [
        p
        for message in outlet.sent
        for p in (
            [d["position"] for d in message["devices"]]
            if message["type"] == "snapshot"
            else message["positions"]
        )
        if p is not None
    ]
    assert shown and (shown[-1]["ts"], shown[-1]["lat"]) == (
        expected.timestamp_ms,
        float(expected.latitude),
    )
    assert [p["ts"] for p in shown] == sorted(p["ts"] for p in shown)  # ts never goes back


# -- hub ----------------------------------------------------------------------------------
class Outlet:
    def __init__(self) -> None:
        self.paused = False
        self.sent: list[dict[str, Any]] = []

    def send(self, data: Any, kind: str) -> None:
        message = orjson.loads(data if isinstance(data, bytes) else b"".join(data))
        assert message["type"] == kind
        self.sent.append(message)

    def ts(self) -> list[int]:
        out = []
        for message in self.sent:
            if message["type"] == "snapshot":
                out += [d["position"]["ts"] for d in message["devices"] if d["position"]]
            elif message["type"] == "positions":
                out += [p["ts"] for p in message["positions"]]
        return out


def test_attach_between_flushes_sends_nothing_twice() -> None:
    """Positions pending for an event go to the existing subscribers before a new one's
    snapshot, so the newcomer gets none of them again; one encoding is shared."""
    clock = Clock()
    hub = Hub(
        LatestMap(10, 300_000), clock, LiveMetrics.create(CollectorRegistry()), lambda: NOW, 0.1
    )
    first, second = Outlet(), Outlet()
    members = [m.Member(DEVICE, "1", "#1")]
    hub.attach(Subscription("a", "42", first), members)
    hub.receive([pos(NOW + 1)])
    clock.advance(0.01)  # the first flush goes at once (idle hub)
    hub.receive([pos(NOW + 2)])  # pending: the next flush waits for the interval
    hub.attach(Subscription("b", "42", second), members)
    hub.receive([pos(NOW + 3), pos(NOW + 2), pos(NOW + 3)])
    clock.advance(0.2)
    assert first.ts() == [NOW + 1, NOW + 2, NOW + 3]
    assert second.ts() == [NOW + 2, NOW + 3]


def test_paused_subscription_conflates() -> None:
    """While paused, only the newest position per device is kept and the replaced ones
    are reported as skipped when sending resumes."""
    clock = Clock()
    hub = Hub(
        LatestMap(10, 300_000), clock, LiveMetrics.create(CollectorRegistry()), lambda: NOW, 0.1
    )
    outlet = Outlet()
    subscription = Subscription("s", None, outlet)
    hub.attach(subscription, [m.Member(DEVICE), m.Member("5" * 15)])
    outlet.paused = True
    for k in range(1, 50):
        hub.receive([pos(NOW + k), pos(NOW + k, device="5" * 15)])
        clock.advance(0.1)
    assert [x["type"] for x in outlet.sent] == ["snapshot"]
    outlet.paused = False
    subscription.release()
    last = outlet.sent[-1]
    assert last["skipped"] == 96
    assert sorted((p["device"], p["ts"]) for p in last["positions"]) == [
        (DEVICE, NOW + 49),
        ("5" * 15, NOW + 49),
    ]


# -- cache ----------------------------------------------------------------------------------
def test_single_flight_cache() -> None:
    """One call in flight per key, each caller its own Deferred; success and refusal are
    cached for their lifetimes; a failure with lifetime 0 is not."""
    clock = Clock()
    calls: list[Deferred[str]] = []

    def fetch(key: str) -> Deferred[str]:
        calls.append(Deferred())
        return calls[-1]

    def lifetime(outcome: Any) -> float:
        if isinstance(outcome, Failure):
            return 5.0 if outcome.check(KeyError) else 0.0
        return 30.0

    cache: SingleFlightCache[str, str] = SingleFlightCache(clock, fetch, lifetime)
    waiting = [cache.get("k") for _ in range(50)]
    assert len(calls) == 1 and len({id(d) for d in waiting}) == 50
    calls[0].callback("user")
    assert all(d.result == "user" for d in waiting)
    assert cache.get("k").result == "user" and len(calls) == 1
    clock.advance(31)
    expired = cache.get("k")
    calls[-1].errback(KeyError("no"))
    expired.addErrback(lambda f: None)
    refused = cache.get("k")
    assert len(calls) == 2 and isinstance(refused.result, Failure)
    refused.addErrback(lambda f: None)
    clock.advance(6)
    failed = cache.get("k")
    calls[-1].errback(OSError("down"))
    failed.addErrback(lambda f: None)
    cache.get("k").addErrback(lambda f: None)
    assert len(calls) == 4


# -- handshake ----------------------------------------------------------------------------
def test_origins() -> None:
    allowed = parse_allowed(["https://ops.example.com"])
    host = "live.example.com:8090"
    assert origin_allowed(None, host, allowed)
    assert origin_allowed("http://live.example.com:8090", host, allowed)
    assert origin_allowed("https://ops.example.com:443", host, allowed)
    assert not origin_allowed("null", host, allowed)
    assert not origin_allowed("http://live.example.com", host, allowed)
    assert not origin_allowed("http://evil.example.com:8090", host, allowed)
    assert not origin_allowed("ftp://live.example.com:8090", host, allowed)
    assert not origin_allowed("http://x/y?z", host, allowed)


def test_credentials() -> None:
    """The bearer token, else only the named cookie; values unfit for a header are
    ignored."""
    name = "directus_session_token"
    headers = {"cookie": f"a=1; {name}=abc.DEF-1; b=2"}
    assert credential_from_headers(headers, name) == m_cred("cookie", "abc.DEF-1", name)
    assert credential_from_headers({"authorization": "Bearer t0k"}, name) == m_cred("bearer", "t0k")
    assert credential_from_headers({"cookie": f"{name}=bad value"}, name) is None
    assert credential_from_headers({"authorization": "Basic eA=="}, name) is None
    assert credential_from_headers({}, name) is None


def m_cred(kind: str, value: str, name: str = "") -> Any:
    from teltonika.processor.live.interfaces import Credential

    return Credential(kind, value, name)
