"""The janitor against a real redis-server: dead instances are cleaned, live ones never."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.application.internet import TimerService
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock

from teltonika.commands.janitor import Janitor
from teltonika.commands.registry import ConnectionRegistry
from tests.commands.helpers import fresh_metrics, publish, statuses
from tests.helpers import eventually

A_IMEI = "352093081452251"
B_IMEI = "490154203237518"
MOVED = "356307042441013"


async def dead_instance_b(redis: Any) -> list[str]:
    """Instance b held two devices (one has since moved to live instance c) and had two
    unsettled commands; instance a is alive."""
    metrics, _ = fresh_metrics()
    a = ConnectionRegistry(redis, "a", metrics)
    b = ConnectionRegistry(redis, "b", metrics)
    c = ConnectionRegistry(redis, "c", metrics)
    await a.register(A_IMEI)
    await b.register(B_IMEI)
    await b.register(MOVED)
    await c.register(MOVED)
    for registry in (a, b, c):
        await registry.heartbeat()
    ids = [await publish(redis, "b", B_IMEI, "getinfo"), await publish(redis, "b", B_IMEI, "x")]
    return ids


@pytest_twisted.ensureDeferred
async def test_janitor_on_a_clock_cleans_an_instance_whose_heartbeat_expired(redis: Any) -> None:
    """While b's heartbeat lives nothing is touched; once it has expired (deleted here,
    deterministically) the next tick of a's janitor removes b's entries, keeps entries
    that name live instances, and fails b's unsettled commands with instance_gone."""
    ids = await dead_instance_b(redis)
    metrics, prom = fresh_metrics()
    clock = Clock()
    janitor = Janitor(redis, "a", metrics, lambda: int(clock.seconds() * 1000), clock=clock)
    service = TimerService(30, janitor.run)
    service.clock = clock
    passes: list[Any] = []
    original = janitor.run_once

    async def counted() -> dict[str, int]:
        result = await original()
        passes.append(result)
        return result

    janitor.run_once = counted  # type: ignore[method-assign]
    service.startService()
    try:
        await eventually(lambda: len(passes) == 1)
        assert passes[0] == {"removed": 0, "failed": 0, "expired": 0}
        await redis.delete("instance:heartbeat:b")  # b died: its heartbeat expired
        clock.advance(30)
        await eventually(lambda: len(passes) == 2)
    finally:
        await service.stopService()
    assert passes[1] == {"removed": 1, "failed": 2, "expired": 0}
    assert await redis.hgetall("connections:registry") == {A_IMEI: "a", MOVED: "c"}
    for command_id in ids:
        [status] = await statuses(redis, command_id)
        assert (status["status"], status["reason"]) == ("failed", "instance_gone")
        assert status["instance_id"] == "a"
    assert not await redis.exists("commands:outbound:b")
    assert prom.get_sample_value("teltonika_janitor_removed_total") == 1


@pytest_twisted.ensureDeferred
async def test_concurrent_janitors_fail_each_command_once(redis: Any, connect: Any) -> None:
    """Janitors of two instances running at once: every command gets one status."""
    ids = await dead_instance_b(redis)
    await redis.delete("instance:heartbeat:b")
    metrics, _ = fresh_metrics()
    other = connect()
    janitors = [Janitor(redis, "a", metrics, lambda: 1), Janitor(other, "c", metrics, lambda: 1)]
    results = await DeferredList([j.run() for j in janitors], fireOnOneErrback=True)
    assert all(ok for ok, _ in results)
    for command_id in ids:
        assert len(await statuses(redis, command_id)) == 1
    assert await redis.hgetall("connections:registry") == {A_IMEI: "a", MOVED: "c"}


@pytest_twisted.ensureDeferred
async def test_a_live_or_restarted_instance_is_left_alone(redis: Any) -> None:
    """An instance whose heartbeat exists keeps its entries and its commands."""
    ids = await dead_instance_b(redis)
    metrics, _ = fresh_metrics()
    result = await Janitor(redis, "a", metrics, lambda: 1).run_once()
    assert result == {"removed": 0, "failed": 0, "expired": 0}
    assert await redis.hget("connections:registry", B_IMEI) == "b"
    assert int(await redis.execute_command("XLEN", "commands:outbound:b")) == len(ids)


@pytest_twisted.ensureDeferred
async def test_janitor_failure_is_counted_and_logged(
    redis_server: Any, connect: Any, logged_errors: Any
) -> None:
    """With Redis down, a pass fails within its timeout, is logged and counted, and the
    Deferred TimerService waits on still succeeds (the timer keeps running)."""
    from twisted.internet import reactor

    conn = connect()
    await conn.ping()
    metrics, prom = fresh_metrics()
    janitor = Janitor(conn, "a", metrics, lambda: 1, clock=reactor, timeout=0.3)
    redis_server.kill()
    try:
        await janitor.run()  # fails the test if it raises
    finally:
        redis_server.start()
    assert prom.get_sample_value("teltonika_janitor_failures_total") == 1
    assert logged_errors.flush("Janitor pass failed: {error}")
    await conn.ping()
