"""The connection registry and heartbeat against a real redis-server (docs/design.rst,
'Registry races')."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from teltonika.commands.registry import ConnectionRegistry
from tests.commands.helpers import fresh_metrics
from tests.helpers import connection_double

IMEI = "352093081452251"


@pytest_twisted.ensureDeferred
async def test_register_and_unregister(redis: Any) -> None:
    """After login HGET returns this instance; after logout the entry is gone."""
    metrics, _ = fresh_metrics()
    registry = ConnectionRegistry(redis, "a", metrics)
    await registry.register(IMEI)
    assert await redis.hget("connections:registry", IMEI) == "a"
    await registry.unregister(IMEI)
    assert await redis.hget("connections:registry", IMEI) is None


@pytest_twisted.ensureDeferred
async def test_race_newer_instance_wins_and_loser_does_not_delete(redis: Any) -> None:
    """A registers, B registers the same IMEI, A's late unregister leaves B's entry."""
    metrics, _ = fresh_metrics()
    a = ConnectionRegistry(redis, "a", metrics)
    b = ConnectionRegistry(redis, "b", metrics)
    await a.register(IMEI)
    await b.register(IMEI)
    await a.unregister(IMEI)
    assert await redis.hget("connections:registry", IMEI) == "b"
    await a.register("111111111111111")
    await a.unregister_all()
    assert await redis.hgetall("connections:registry") == {IMEI: "b"}


@pytest_twisted.ensureDeferred
async def test_two_sessions_on_one_instance(redis: Any) -> None:
    """The same IMEI twice here: only the last logout removes the entry."""
    metrics, _ = fresh_metrics()
    registry = ConnectionRegistry(redis, "a", metrics)
    await registry.register(IMEI)
    await registry.register(IMEI)
    await registry.unregister(IMEI)
    assert await redis.hget("connections:registry", IMEI) == "a"
    await registry.unregister(IMEI)
    assert await redis.hget("connections:registry", IMEI) is None


@pytest_twisted.ensureDeferred
async def test_heartbeat_sets_ex_90_and_reclaims_removed_entries(redis: Any) -> None:
    """The heartbeat key has EX 90; a held entry removed meanwhile (janitor after a
    heartbeat gap) is claimed again, but one that names another instance is left alone."""
    metrics, _ = fresh_metrics()
    registry = ConnectionRegistry(redis, "a", metrics, now_ms=lambda: 1234)
    await registry.register(IMEI)
    await registry.register("111111111111111")
    await redis.hdel("connections:registry", IMEI)
    await redis.hset("connections:registry", "111111111111111", "b")
    await registry.heartbeat()
    assert await redis.get("instance:heartbeat:a") == (
        '{"at_ms":1234,"command_timeout_s":30.0,"command_quiet_s":1.0,"command_settle_s":2.0,'
        '"command_due_margin_s":5.0}'
    )
    ttl = int(await redis.ttl("instance:heartbeat:a"))
    assert 85 < ttl <= 90
    assert await redis.hgetall("connections:registry") == {IMEI: "a", "111111111111111": "b"}
    await registry.stop_heartbeat()
    assert not await redis.exists("instance:heartbeat:a")


@pytest_twisted.ensureDeferred
async def test_redis_down_at_login_accepts_and_registers_later(
    redis_server: Any, redis: Any, connect: Any, logged_errors: Any
) -> None:
    """With Redis down, register() still succeeds (the device stays), the failure is
    counted, and the next heartbeat after Redis is back writes the entry."""
    metrics, prom = fresh_metrics()
    conn = connect()
    await conn.ping()
    registry = ConnectionRegistry(conn, "a", metrics, timeout=0.5)
    redis_server.kill()
    try:
        await registry.register(IMEI)
        await registry.heartbeat()
    finally:
        redis_server.start()
    assert registry.unsynced == {IMEI}
    failures = prom.get_sample_value("teltonika_registry_failures_total", {"operation": "register"})
    assert failures is not None and failures >= 1
    assert (
        prom.get_sample_value("teltonika_registry_failures_total", {"operation": "heartbeat"}) == 1
    )
    assert logged_errors.flush("Connection registry {operation} failed: {error}")
    # txredisapi queues commands while it reconnects; this waits for the reconnect.
    await conn.ping()
    await registry.heartbeat()
    assert registry.unsynced == set()
    assert await conn.hget("connections:registry", IMEI) == "a"


@pytest_twisted.ensureDeferred
async def test_sender_skips_an_entry_whose_instance_is_dead(redis: Any) -> None:
    """send_command routes by the registry only to an instance with a heartbeat; a stale
    entry gives device_not_connected at once instead of a command nobody reads."""
    from teltonika.commands.client import send_command
    from teltonika.commands.messages import Command
    from tests.commands.helpers import statuses

    await redis.hset("connections:registry", IMEI, "gone")
    command = Command(id="stale", imei=IMEI, payload=b"getinfo")
    assert await send_command(redis, command, 5) is None
    [status] = await statuses(redis, "stale")
    assert (status["status"], status["reason"]) == ("failed", "device_not_connected")
    assert not await redis.exists("commands:outbound:gone")
    await redis.set("instance:heartbeat:gone", "1")
    assert await send_command(redis, Command(id="live", imei=IMEI, payload=b"x"), 5) == "gone"


class _HeldRedis:
    """A stand-in whose EVAL replies only when the test says so (the reactor is a Clock)."""

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def eval(self, script: str, keys: list[str], args: list[str]) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


def test_unregister_all_waits_for_removals_in_flight() -> None:
    """A logout's removal still waiting for Redis when shutdown starts is awaited by
    unregister_all, so the connection is not closed under it (it would otherwise time
    out later and log an error long after the shutdown)."""
    from twisted.internet.task import Clock

    clock = Clock()
    redis = _HeldRedis()
    metrics, prom = fresh_metrics()
    registry = ConnectionRegistry(connection_double(redis), "a", metrics, clock=clock, timeout=5.0)
    registry.held[IMEI] = 1
    registry.unregister(IMEI)  # a connection closed during shutdown
    assert len(redis.pending) == 1
    done = registry.unregister_all()  # nothing else held: only the in-flight removal
    assert done.called == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    redis.pending[0].callback(1)
    assert done.called
    assert not clock.getDelayedCalls()  # its timeout was cancelled: nothing fires later
    assert prom.get_sample_value(
        "teltonika_registry_failures_total", {"operation": "unregister"}
    ) in (None, 0.0)
