"""The fan-out reader against a real redis-server: it starts at the end of the stream,
reads every later entry in order, skips unusable ones, and keeps reading (from its
cursor) after Redis went away and came back."""

from __future__ import annotations

from typing import Any

import pytest_twisted
import redis
from prometheus_client import CollectorRegistry
from twisted.internet import reactor

from teltonika.contract import TELEMETRY_STREAM
from teltonika.processor.fastreader import reader_connection
from teltonika.processor.live.fanout import FanoutReader, FanoutSettings
from teltonika.processor.live.hub import Hub
from teltonika.processor.live.latest import LatestMap
from teltonika.processor.live.metrics import LiveMetrics
from teltonika.redis.connect import parse_redis_url
from teltonika.redis.connection import RedisConnection
from tests.processor.live.helpers import entry, eventually, imei, now_ms
from tests.servers import RedisServer


@pytest_twisted.ensureDeferred
async def test_reader_follows_the_stream_across_a_redis_restart() -> None:
    server = RedisServer().start()
    client = redis.Redis.from_url(server.url)
    fields: dict[Any, Any] = entry(imei(1), now_ms())  # redis-py's field types are invariant
    client.xadd(TELEMETRY_STREAM, fields)  # before the start: not read
    metrics = LiveMetrics.create(CollectorRegistry())
    latest = LatestMap(100, 300_000)
    hub = Hub(latest, reactor, metrics, now_ms)
    address = parse_redis_url(server.url)
    reader = FanoutReader(
        lambda: reader_connection(address, reply_timeout=5),
        TELEMETRY_STREAM,
        hub,
        reactor,
        now_ms,
        metrics,
        settings=FanoutSettings(block_ms=100, timeout=2),
    )
    reader.start()
    try:
        await eventually(lambda: reader.cursor is not None)
        base = now_ms()
        client.xadd(TELEMETRY_STREAM, {"imei": "garbage"})
        for k in range(3):
            client.xadd(TELEMETRY_STREAM, entry(imei(2), base + k))  # type: ignore[arg-type]

        def newest(device: str) -> Any:
            found = latest.get(device)
            return found is not None and found.position is not None and found.position.ts

        await eventually(lambda: newest(imei(2)) == base + 2)
        assert imei(1) not in latest
        assert metrics.fanout_skipped._value.get() == 1
        server.kill()
        await eventually(lambda: metrics.fanout_errors._value.get() > 0)
        server.start()
        client = redis.Redis.from_url(server.url)
        client.xadd(TELEMETRY_STREAM, entry(imei(3), now_ms()))  # type: ignore[arg-type]
        await eventually(lambda: newest(imei(3)))
    finally:
        await reader.stop()
        client.close()
        server.cleanup()


def test_a_failing_entry_check_skips_the_entry_not_the_reader(
    monkeypatch: Any, logged_errors: Any
) -> None:
    """An entry whose check raises (a bug, not a contract breach) is counted as skipped
    and logged; the entries after it still go to the hub and the cursor moves on."""
    from twisted.internet.task import Clock

    from teltonika.processor.live import fanout, messages

    real = messages.position_from_entry  # what fanout imported

    def flaky(entry_id: str, flat: object) -> Any:
        if entry_id == "2-0":
            raise RuntimeError("a bug")
        return real(entry_id, flat)

    monkeypatch.setattr(fanout, "position_from_entry", flaky)
    metrics = LiveMetrics.create(CollectorRegistry())
    latest = LatestMap(100, 300_000)
    clock = Clock()
    hub = Hub(latest, clock, metrics, now_ms)

    def never_connects() -> RedisConnection:
        raise AssertionError("handle() only reads the replies it is given")

    reader = FanoutReader(never_connects, TELEMETRY_STREAM, hub, clock, now_ms, metrics)
    base = now_ms()
    entries: list[Any] = [  # as Redis replies: lists
        [f"{k}-0", [x for pair in entry(imei(k), base + k).items() for x in pair]]
        for k in (1, 2, 3)
    ]
    reader.handle(entries)
    assert reader.cursor == "3-0"
    assert metrics.fanout_skipped._value.get() == 1
    assert imei(1) in latest and imei(3) in latest and imei(2) not in latest
    assert len(logged_errors.flush("Live fan-out could not read entry {entry}")) == 1
