"""The live endpoint end to end: the real ``twistd teltonika-processor --live`` with
Redis and PostgreSQL, an autobahn client over TCP (handshake, hello, subscriptions,
ordering, heartbeats and protocol abuse)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from teltonika.processor.state import LATEST_ORDER
from tests.processor.live.helpers import (
    SUBPROTOCOL,
    Env,
    LiveProcessor,
    connect,
    entry,
    eventually,
    imei,
    now_ms,
    wait_table,
)

pytestmark = pytest.mark.slow
EVENT_DEVICES = {imei(1): "#201", imei(2): "#202"}


@pytest.fixture(scope="module")
def proc(live_env: Env) -> LiveProcessor:
    events = live_env.tmp / "events.json"
    events.write_text(
        json.dumps(
            {
                "events": {
                    "42": {"devices": EVENT_DEVICES, "users": ["*"]},
                    "private": {"devices": {imei(3): "x"}, "users": ["somebody-else"]},
                }
            }
        )
    )
    process = live_env.processor(
        "live-a",
        "--live-events",
        f"file:{events}",
        "--live-tick",
        "1",
        "--live-allowed-origin",
        "https://ops.example.com",
        "--live-max-rate",
        "10",
        "--live-max-message",
        "4096",
        "--live-max-devices",
        "50",
    )
    wait_table(live_env.dsn)
    # a device that has not sent since the processor started: only PostgreSQL knows it
    live_env.insert_row(imei(1), now_ms() - 60_000, 41.5, 19.5)
    return process


@pytest_twisted.ensureDeferred
async def test_origins(proc: LiveProcessor, clients: list[Any]) -> None:
    """The page's own origin, a --live-allowed-origin and no Origin at all are
    accepted; another origin and "null" are refused at the handshake."""
    own = f"http://127.0.0.1:{proc.port}"
    for origin in (own, "https://ops.example.com", None):
        client = await connect(proc.port, origin=origin)
        clients.append(client)
        assert (await client.next())["type"] == "hello"
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{proc.port + 1}"):
        with pytest.raises(ConnectionError):
            await connect(proc.port, origin=origin)
    assert proc.metric("teltonika_processor_live_auth_results_total", result="origin_refused") >= 2


@pytest_twisted.ensureDeferred
async def test_subprotocol_and_hello(proc: LiveProcessor, clients: list[Any]) -> None:
    """v1 is chosen when offered, served when nothing is offered, refused when only other
    versions are; hello carries the version, instance, user, clock and limits."""
    offered = await connect(proc.port, protocols=["teltonika-live.v2", SUBPROTOCOL])
    plain = await connect(proc.port, protocols=[])
    clients += [offered, plain]
    assert offered.protocol_in_use == SUBPROTOCOL
    assert plain.protocol_in_use is None
    before = now_ms()
    hello = await offered.next()
    assert hello["type"] == "hello" and hello["v"] == 1
    assert hello["instance"] == "live-a" and hello["user"] == "anonymous"
    assert hello["server"].startswith("teltonika/")
    assert abs(hello["now"] - before) < 60_000
    assert hello["heartbeat"]["tick"] == 1
    assert hello["limits"] == {"subscriptions": 8, "devices": 50, "message_bytes": 4096}
    assert (await plain.next())["type"] == "hello"
    with pytest.raises(ConnectionError):
        await connect(proc.port, protocols=["teltonika-live.v2"])


@pytest_twisted.ensureDeferred
async def test_event_snapshot_then_positions(
    live_env: Env, proc: LiveProcessor, clients: list[Any]
) -> None:
    """An event subscription's snapshot holds every member (one loaded from PostgreSQL,
    one unknown), then live positions follow; older, equal and future records are not
    sent; unsubscribe stops the flow."""
    client = await connect(proc.port)
    clients.append(client)
    await client.next("hello")
    client.send({"type": "subscribe", "id": "ev", "event": "42"})
    snapshot = await client.next("snapshot")
    assert snapshot["id"] == "ev" and snapshot["event"] == "42"
    by_device = {d["device"]: d for d in snapshot["devices"]}
    assert set(by_device) == set(EVENT_DEVICES)
    stored = by_device[imei(1)]
    assert stored["label"] == "#201" and stored["entry"] is None
    assert stored["position"]["lat"] == 41.5 and stored["position"]["fix"] is True
    assert by_device[imei(2)]["position"] is None and by_device[imei(2)]["seen"] is None
    base = now_ms()
    live_env.xadd(
        entry(imei(2), base, lat="41.1234567", lon="-19.7654321", sats=0),
        entry(imei(2), base - 10_000),  # late: only seen
        # a true duplicate (same content, so same record hash): a different record of the
        # same instant could be "later" by the latest rule's hash and be sent too
        entry(imei(2), base, lat="41.1234567", lon="-19.7654321", sats=0),
        entry(imei(2), base + 3_600_000),  # an hour ahead: ignored
        entry(imei(1), base + 1),
        entry(imei(9), base),  # not in the event
    )
    got: list[dict[str, Any]] = []
    while len(got) < 2:
        message = await client.next("positions")
        assert message["id"] == "ev" and message["skipped"] == 0
        got += message["positions"]
    assert [(p["device"], p["ts"]) for p in got] == [(imei(2), base), (imei(1), base + 1)]
    first = got[0]
    assert (first["lat"], first["lon"], first["fix"], first["sats"]) == (
        41.1234567,
        -19.7654321,
        False,
        0,
    )
    client.send({"type": "unsubscribe", "id": "ev"})
    assert (await client.next("unsubscribed"))["id"] == "ev"
    live_env.xadd(entry(imei(2), base + 5))
    client.send({"type": "ping", "id": "after"})
    assert (await client.next("pong"))["id"] == "after"
    assert not [m for m in client.received if m["type"] == "positions" and m["id"] == "ev"][2:]


@pytest_twisted.ensureDeferred
async def test_devices_subscription_forbidden_event_ping_tick(
    live_env: Env, proc: LiveProcessor, clients: list[Any]
) -> None:
    """A devices subscription gets a snapshot and positions; a forbidden or unknown
    event is FORBIDDEN for that id only; ping is answered with pong; a silent connection
    gets a tick."""
    client = await connect(proc.port)
    clients.append(client)
    await client.next("hello")
    device = imei(20)
    client.send({"type": "subscribe", "id": "dv", "devices": [device]})
    snapshot = await client.next("snapshot")
    assert snapshot["devices"] == [
        {"device": device, "entry": None, "label": None, "seen": None, "position": None}
    ]
    live_env.xadd(entry(device, now_ms()))
    message = await client.next("positions")
    assert message["positions"][0]["device"] == device
    for event in ("private", "nope"):
        client.send({"type": "subscribe", "id": f"x-{event}", "event": event})
        error = await client.next("error")
        assert error["id"] == f"x-{event}" and error["error"]["code"] == "FORBIDDEN"
    client.send({"type": "ping", "id": "p7"})
    pong = await client.next("pong")
    assert pong["id"] == "p7" and isinstance(pong["now"], int)
    tick = await client.next("tick", timeout=5)
    assert isinstance(tick["now"], int)


SAME_TS_CASES = [
    ("periodic", "event", False),
    ("event", "periodic", False),
    ("periodic", "event", True),
    ("event", "periodic", True),
]


@pytest.mark.parametrize("first, second, first_stored", SAME_TS_CASES)
@pytest_twisted.ensureDeferred
async def test_same_ts_ends_on_the_record_postgresql_calls_latest(
    live_env: Env,
    proc: LiveProcessor,
    clients: list[Any],
    first: str,
    second: str,
    first_stored: bool,
) -> None:
    """Two records of one device with the same ts, an event record and a periodic one,
    in either order, the first live or already in PostgreSQL (then the snapshot comes from
    the loader): the subscriber is shown the event record last, the same row
    ``ORDER BY LATEST_ORDER`` returns once the writer stored both, and a later subscriber's
    snapshot holds it too. The periodic record arriving second is not sent at all."""
    device = imei(40 + SAME_TS_CASES.index((first, second, first_stored)))
    marker = imei(49)
    ts = now_ms() - 2_000
    lat = {"periodic": "41.1111111", "event": "41.2222222"}
    event_io = {"periodic": 0, "event": 239}
    if first_stored:
        live_env.insert_row(device, ts, float(lat[first]), 19.5, event_io_id=event_io[first])
    else:
        live_env.xadd(entry(device, ts, lat=lat[first], event_io_id=event_io[first]))
        await eventually(lambda: stored_rows(live_env, device) == 1)
    client = await connect(proc.port)
    clients.append(client)
    await client.next("hello")
    client.send({"type": "subscribe", "id": "s", "devices": [device, marker]})
    snapshot = await client.next("snapshot")
    shown = [d["position"] for d in snapshot["devices"] if d["device"] == device]
    assert shown[0] is not None and shown[0]["lat"] == float(lat[first])
    live_env.xadd(
        entry(device, ts, lat=lat[second], event_io_id=event_io[second]),
        entry(marker, now_ms()),  # read after the second record: its arrival ends the wait
    )
    while True:
        message = await client.next("positions")
        shown += [p for p in message["positions"] if p["device"] == device]
        if any(p["device"] == marker for p in message["positions"]):
            break
    assert [(p["ts"], p["lat"]) for p in shown] == [(ts, float(lat[first]))] + (
        [(ts, float(lat["event"]))] if second == "event" else []
    )
    await eventually(lambda: stored_rows(live_env, device) == 2)
    with psycopg.connect(live_env.dsn, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT latitude::float8 FROM positions WHERE device_id = %s"
            f" ORDER BY {LATEST_ORDER} LIMIT 1",
            (device,),
        ).fetchone()
    assert row is not None
    (stored_lat,) = row
    assert stored_lat == shown[-1]["lat"] == float(lat["event"])
    later = await connect(proc.port)
    clients.append(later)
    await later.next("hello")
    later.send({"type": "subscribe", "id": "t", "devices": [device]})
    again = await later.next("snapshot")
    assert again["devices"][0]["position"]["lat"] == stored_lat


def stored_rows(live_env: Env, device: str) -> int:
    with psycopg.connect(live_env.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM positions WHERE device_id = %s", (device,)
        ).fetchone()
    assert row is not None  # count(*) always answers one row
    return int(row[0])


@pytest_twisted.ensureDeferred
async def test_subscription_taken_while_records_stream(
    live_env: Env, proc: LiveProcessor, clients: list[Any]
) -> None:
    """Subscribing while one device streams: snapshot then positions hold every ts after
    the snapshot's exactly once, strictly increasing (no gap, no duplicate, no
    regression)."""
    device = imei(30)
    base = now_ms()
    count = 400
    sent = [base + i * 10 for i in range(count)]
    started = threading.Event()

    def feed() -> None:
        for i, ts in enumerate(sent):
            live_env.xadd(entry(device, ts), entry(device, ts - 5_000))  # each with a late one
            if i == 50:
                started.set()
            time.sleep(0.002)

    feeding = deferToThread(feed)
    await deferToThread(started.wait, 30)
    client = await connect(proc.port)
    clients.append(client)
    await client.next("hello")
    client.send({"type": "subscribe", "id": "s", "devices": [device]})
    snapshot = await client.next("snapshot")
    position = snapshot["devices"][0]["position"]
    first = position["ts"] if position else 0
    await feeding
    seen: list[int] = []
    while not seen or seen[-1] != sent[-1]:
        message = await client.next("positions")
        seen += [p["ts"] for p in message["positions"]]
    assert seen == [ts for ts in sent if ts > first]
    assert first in (0, *sent)


@pytest_twisted.ensureDeferred
async def test_protocol_abuse(proc: LiveProcessor, clients: list[Any]) -> None:
    """Unknown types, duplicate ids, unknown ids and bad fields are answered with errors
    and the connection stays; non-JSON and binary frames close 4400; an over-size frame
    closes 1009; a flood gets RATE_LIMITED, then 4429."""
    client = await connect(proc.port)
    clients.append(client)
    await client.next("hello")
    client.send({"type": "hug", "id": "h1"})
    error = await client.next("error")
    assert error["id"] == "h1" and error["error"]["code"] == "UNKNOWN_TYPE"
    client.send({"type": "subscribe", "id": "d", "devices": [imei(40)]})
    await client.next("snapshot")
    client.send({"type": "subscribe", "id": "d", "devices": [imei(41)]})
    error = await client.next("error")
    assert "id" not in error and error["request"] == "d"
    assert error["error"]["code"] == "DUPLICATE_ID"
    client.send({"type": "unsubscribe", "id": "zz"})
    assert (await client.next("error"))["error"]["code"] == "UNKNOWN_ID"
    for bad in (
        {"type": "subscribe", "id": "b", "devices": ["123"]},
        {"type": "subscribe", "id": "b", "event": "1", "devices": [imei(1)]},
        {"type": "ping", "id": "x" * 65},
    ):
        client.send(bad)
        assert (await client.next("error"))["error"]["code"] == "INVALID_PAYLOAD"
    client.send({"type": "subscribe", "id": "many", "devices": [imei(i) for i in range(51)]})
    assert (await client.next("error"))["error"]["code"] == "TOO_MANY_DEVICES"

    many = await connect(proc.port)
    clients.append(many)
    await many.next("hello")
    for n in range(9):
        many.send({"type": "subscribe", "id": f"s{n}", "devices": [imei(42)]})
    error = await many.next("error")
    assert (error["id"], error["error"]["code"]) == ("s8", "TOO_MANY_SUBSCRIPTIONS")
    assert len([m for m in many.received if m["type"] == "snapshot"]) <= 8

    not_json = await connect(proc.port)
    await not_json.next("hello")
    not_json.send(b"{nope")
    assert (await not_json.next("error"))["error"]["code"] == "INVALID_PAYLOAD"
    assert (await not_json.wait_closed())[0] == 4400

    binary = await connect(proc.port)
    await binary.next("hello")
    binary.send(b"\x00\x01", binary=True)
    assert (await binary.wait_closed())[0] == 4400

    large = await connect(proc.port)
    await large.next("hello")
    large.send(json.dumps({"type": "ping", "id": "p", "pad": "x" * 5000}).encode())
    assert (await large.wait_closed())[0] == 1009
    assert proc.metric("teltonika_processor_live_closes_total", reason="oversize") == 1

    flood = await connect(proc.port)
    await flood.next("hello")
    for n in range(200):
        flood.send({"type": "ping", "id": f"f{n}"})
    code, _ = await flood.wait_closed()
    assert code == 4429
    assert any(
        m["type"] == "error" and m["error"]["code"] == "RATE_LIMITED" for m in flood.received
    )
    assert reactor.running
