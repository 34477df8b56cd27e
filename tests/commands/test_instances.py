"""Two whole server instances sharing one real redis-server, scripted devices over TCP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from teltonika.commands.client import send_command, store_offline
from teltonika.commands.janitor import Janitor
from teltonika.commands.messages import OFFLINE_EXPIRY_KEY as EXPIRY
from teltonika.commands.messages import Command
from teltonika.commands.scripts import TAKE_OFFLINE, run_script
from teltonika.redis.connection import reply_int
from teltonika.wire import encode_avl_frame
from teltonika.wire.records import CODEC_8E, CODEC_12, CODEC_14, AVLRecord
from tests.commands.device import ScriptedDevice, connect_device, echo, reply_frame
from tests.commands.helpers import fresh_metrics, publish, statuses, terminal
from tests.commands.instances import Instance
from tests.helpers import eventually

pytestmark = pytest.mark.slow

IMEI_A = "352093081452251"
IMEI_B = "490154203237518"
RACER = "356307042441013"
QUIET = ("--command-quiet", "0.1")
QUIET_SETTLE = (*QUIET, "--command-settle", "3")


@pytest_twisted.async_yield_fixture
async def cluster(redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Starts instances and devices; stops and closes them all at the end."""
    instances: list[Instance] = []
    devices: list[ScriptedDevice] = []

    async def start(instance_id: str, *extra: str) -> Instance:
        instance = await Instance(redis_url, instance_id, *extra).start()
        instances.append(instance)
        return instance

    async def device(instance: Instance, imei: str, respond: Any = None) -> ScriptedDevice:
        dev = await connect_device(reactor, instance.port, imei, respond)
        devices.append(dev)
        return dev

    start.device = device  # type: ignore[attr-defined]
    yield start
    for dev in devices:
        await dev.close()
    for instance in instances:
        await instance.stop()


async def registry(redis: Any) -> dict[str, str]:
    result: dict[str, str] = await redis.hgetall("connections:registry")
    return result


@pytest_twisted.ensureDeferred
async def test_command_for_device_on_b_is_delivered_by_b_only(redis: Any, cluster: Any) -> None:
    """Each instance registers its device; a command routed through the registry to B
    reaches only B's device, and the reply comes back on commands:responses from B.
    ACK and command bytes share the socket without corrupting each other."""
    a = await cluster("a")
    b = await cluster("b")
    dev_a = await cluster.device(a, IMEI_A, echo("A"))
    dev_b = await cluster.device(b, IMEI_B, echo("B"))
    await eventually(lambda: _has(redis, {IMEI_A: "a", IMEI_B: "b"}))
    assert await redis.exists("instance:heartbeat:a") and await redis.exists("instance:heartbeat:b")

    command = Command(id="cmd-b", imei=IMEI_B, payload=b"getinfo")
    assert await send_command(redis, command, 0) == "b"
    dev_b.send(encode_avl_frame(CODEC_8E, [_record()]))  # an ACK on the same socket
    final = await terminal(redis, "cmd-b")
    assert (final["status"], final["response"], final["instance_id"]) == (
        "responded",
        "B:getinfo",
        "b",
    )
    assert [s["status"] for s in await statuses(redis, "cmd-b")] == ["delivered", "responded"]
    assert [m.payload for m in dev_b.commands] == [b"getinfo"]
    assert dev_a.commands == []
    await eventually(lambda: dev_b.acks == [1])

    # codec 14 carries the IMEI; the device echoes it back.
    c14 = Command(id="cmd-14", imei=IMEI_A, payload=b"getver", codec="14")
    assert await send_command(redis, c14, 0) == "a"
    final = await terminal(redis, "cmd-14")
    assert (final["status"], final["response"], final["codec"]) == ("responded", "A:getver", "14")
    assert dev_a.commands[0].codec_id == CODEC_14 and dev_a.commands[0].imei == IMEI_A


@pytest_twisted.ensureDeferred
async def test_unsolicited_reply_goes_to_the_messages_stream(redis: Any, cluster: Any) -> None:
    """A codec 12 reply with no command outstanding resolves nothing and is published
    as a device message; a codec 12 reply while a codec 14 command waits does not
    resolve it either."""
    a = await cluster("a", "--command-timeout", "2")
    dev = await cluster.device(a, IMEI_A)
    await eventually(lambda: _has(redis, {IMEI_A: "a"}))
    dev.send(reply_frame(CODEC_12, b"scale 12.5kg"))
    await publish(redis, "a", IMEI_A, "getver", codec="14", id="c14")
    await eventually(lambda: dev.commands)
    dev.send(reply_frame(CODEC_12, b"AT$MSGSND"))
    dev.send(reply_frame(CODEC_14, b"Ver:1", IMEI_A))
    assert (await terminal(redis, "c14"))["response"] == "Ver:1"

    async def texts() -> list[str]:
        entries = await redis.execute_command("XRANGE", "telemetry:teltonika:messages", "-", "+")
        return [dict(zip(v[::2], v[1::2], strict=True))["text"] for _, v in entries]

    assert await eventually(lambda: _equal(texts(), ["scale 12.5kg", "AT$MSGSND"]))


@pytest_twisted.ensureDeferred
async def test_same_imei_racing_between_instances(redis: Any, cluster: Any) -> None:
    """The device reconnects to B before A noticed the old socket: the registry points
    at B, and A's disconnect afterwards does not delete B's entry."""
    a = await cluster("a")
    b = await cluster("b")
    old = await cluster.device(a, RACER)
    await eventually(lambda: _has(redis, {RACER: "a"}))
    new = await cluster.device(b, RACER, echo("B"))
    await eventually(lambda: _has(redis, {RACER: "b"}))
    await old.close()
    await eventually(lambda: not a.server.factory.sessions)
    await a.commands.consumer.when_settled()
    assert await registry(redis) == {RACER: "b"}
    await send_command(redis, Command(id="after-race", imei=RACER, payload=b"getgps"), 0)
    assert (await terminal(redis, "after-race"))["response"] == "B:getgps"
    await new.close()
    await eventually(lambda: _has(redis, {}))


@pytest_twisted.ensureDeferred
async def test_graceful_shutdown_unregisters_everything(redis: Any, cluster: Any) -> None:
    """Stopping an instance removes its registry entries and its heartbeat."""
    a = await cluster("a")
    await cluster.device(a, IMEI_A)
    await cluster.device(a, IMEI_B)
    await eventually(lambda: _has(redis, {IMEI_A: "a", IMEI_B: "a"}))
    await a.stop()
    assert await registry(redis) == {}
    assert not await redis.exists("instance:heartbeat:a")


@pytest_twisted.ensureDeferred
async def test_dead_instance_is_cleaned_by_the_other_janitor(redis: Any, cluster: Any) -> None:
    """B dies without cleanup; once its heartbeat has expired (deleted here) A's janitor,
    ticking on a Clock, removes B's entries and fails B's undelivered command with
    instance_gone. The device reconnecting to A is routable again."""
    a = await cluster("a")
    b = await cluster("b")
    await cluster.device(b, IMEI_B)
    await eventually(lambda: _has(redis, {IMEI_B: "b"}))
    await b.crash()
    assert await registry(redis) == {IMEI_B: "b"}
    stuck = await publish(redis, "b", IMEI_B, "getinfo")  # sent to B after it died
    clock = Clock()
    metrics, _ = fresh_metrics()
    janitor = Janitor(redis, "a", metrics, lambda: int(clock.seconds() * 1000), clock=clock)
    assert (await janitor.run_once())["removed"] == 0  # heartbeat still alive
    await redis.delete("instance:heartbeat:b")  # its EX ran out
    assert await janitor.run_once() == {"removed": 1, "failed": 1, "expired": 0}
    assert await registry(redis) == {}
    final = await terminal(redis, stuck)
    assert (final["status"], final["reason"]) == ("failed", "instance_gone")
    await cluster.device(a, IMEI_B, echo("A"))
    await eventually(lambda: _has(redis, {IMEI_B: "a"}))


@pytest_twisted.ensureDeferred
async def test_offline_command_survives_restarts_and_is_delivered_at_login(
    redis: Any, cluster: Any
) -> None:
    """An offline command stored while the device is away survives a restart of every
    instance and is delivered at the device's next login, on whichever instance."""
    a = await cluster("a")
    command = Command(
        id="off-1", imei=IMEI_A, payload=b"setdigout 1", offline=True, expires_at_ms=2**50
    )
    assert await store_offline(redis, command, 1) is None
    assert [s["status"] for s in await statuses(redis, "off-1")] == ["queued"]
    await a.stop()
    b = await cluster("b")
    dev = await cluster.device(b, IMEI_A, echo("B"))
    final = await terminal(redis, "off-1")
    assert (final["status"], final["response"], final["attempt"]) == (
        "responded",
        "B:setdigout 1",
        "1",
    )
    assert [m.payload for m in dev.commands] == [b"setdigout 1"]
    assert not await redis.exists("commands:offline:command:off-1")
    assert await redis.zcard("commands:offline:expiry") == 0


@pytest_twisted.ensureDeferred
async def test_offline_command_for_an_online_device_is_delivered_now(
    redis: Any, cluster: Any
) -> None:
    a = await cluster("a")
    await cluster.device(a, IMEI_A, echo("A"))
    await eventually(lambda: _has(redis, {IMEI_A: "a"}))
    command = Command(
        id="off-now", imei=IMEI_A, payload=b"getinfo", offline=True, expires_at_ms=2**50
    )
    assert await store_offline(redis, command, 1) == "a"
    assert (await terminal(redis, "off-now"))["response"] == "A:getinfo"


@pytest_twisted.ensureDeferred
async def test_offline_attempts_are_capped_and_expiry_is_enforced(redis: Any, cluster: Any) -> None:
    """A device that never answers: each login is one attempt (requeued on timeout);
    the failure of attempt --offline-max-attempts is final: attempts_exhausted. A command
    whose expiry passes while waiting fails with expired (janitor)."""
    a = await cluster("a", "--command-timeout", "0.2", "--offline-max-attempts", "2")
    command = Command(
        id="off-2", imei=IMEI_A, payload=b"getinfo", offline=True, expires_at_ms=2**50
    )
    await store_offline(redis, command, 1)
    first = await cluster.device(a, IMEI_A)  # a silent device
    await eventually(lambda: _status_count(redis, "off-2", "requeued", 1))
    assert [m.payload for m in first.commands] == [b"getinfo"]
    await first.close()
    await eventually(lambda: not a.server.factory.sessions)
    second = await cluster.device(a, IMEI_A)
    final = await terminal(redis, "off-2")
    assert (final["status"], final["reason"], final["attempt"]) == (
        "failed",
        "attempts_exhausted",
        "2",
    )
    assert len(second.commands) == 1
    progress = [(s["status"], s["reason"]) for s in await statuses(redis, "off-2")]
    assert progress == [
        ("queued", ""),
        ("delivered", ""),
        ("requeued", "timeout"),
        ("delivered", ""),
        ("failed", "attempts_exhausted"),
    ]

    soon = Command(id="off-3", imei=IMEI_B, payload=b"getinfo", offline=True, expires_at_ms=5)
    await store_offline(redis, soon, 1)
    metrics, _ = fresh_metrics()
    assert (await Janitor(redis, "a", metrics, lambda: 10).run_once())["expired"] == 1
    final = await terminal(redis, "off-3")
    assert (final["status"], final["reason"]) == ("failed", "expired")


async def _has(redis: Any, expected: dict[str, str]) -> bool:
    return await registry(redis) == expected


async def _equal(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _status_count(redis: Any, command_id: str, status: str, count: int) -> bool:
    return len([s for s in await statuses(redis, command_id) if s["status"] == status]) >= count


def _record() -> AVLRecord:
    return AVLRecord(1_700_000_000_000, 0, 25.0, 54.0, 100, 90, 7, 50, 0, ((1, 1, 1),))


@pytest_twisted.ensureDeferred
async def test_redis_outage_and_data_loss(
    redis_server: Any, redis: Any, cluster: Any, logged_errors: Any
) -> None:
    """Redis restarts empty while an instance runs: a device that logged in during the
    outage stays connected and is registered once Redis is back, the connected device is
    re-claimed by the heartbeat, the consumer re-creates its group, and commands work
    again. Errors are logged (and claimed here), nothing crashes."""
    a = await cluster("a", "--heartbeat-interval", "0.3", "--heartbeat-ttl", "5")
    await cluster.device(a, IMEI_A, echo("A"))
    await eventually(lambda: _has(redis, {IMEI_A: "a"}))
    redis_server.kill()
    try:
        late = await cluster.device(a, IMEI_B, echo("A2"))  # login while Redis is down
        assert late.accepted.called
        await eventually(lambda: a.commands.registry.unsynced == {IMEI_B}, 15)
    finally:
        redis_server.start()  # empty: no persistence
    await redis.ping()
    await eventually(lambda: _has(redis, {IMEI_A: "a", IMEI_B: "a"}), 20)
    await eventually(lambda: redis.exists("instance:heartbeat:a"))

    async def answered() -> bool:
        command = Command(id=f"after-{uuid4().hex}", imei=IMEI_B, payload=b"getinfo")
        await send_command(redis, command, 0)
        try:
            final = await terminal(redis, command.id, 2)
        except AssertionError:
            return False
        return final["response"] == "A2:getinfo"

    await eventually(answered, 20, 0.1)
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_shutdown_completes_with_redis_down(
    redis_server: Any, redis: Any, cluster: Any, logged_errors: Any
) -> None:
    """SIGTERM while Redis is unreachable: every command-plane step is bounded, so the
    service stops (registry entries are left for the janitors)."""
    a = await cluster("a")
    await cluster.device(a, IMEI_A)
    await eventually(lambda: _has(redis, {IMEI_A: "a"}))
    redis_server.kill()
    started = reactor.seconds()
    try:
        await a.stop()
    finally:
        redis_server.start()
    assert reactor.seconds() - started < 30
    assert not a.service.running
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_a_requeued_offline_command_reaches_a_device_that_already_logged_in_again(
    redis: Any, cluster: Any
) -> None:
    """The device reconnects on the same instance while an offline command is in flight
    on its old socket: the new login collects an empty waiting list, then the old
    socket's socket_closed puts the command back. The device is online, so its instance
    is asked to flush and the command reaches the new connection now."""
    a = await cluster("a", *QUIET)
    old = await cluster.device(a, IMEI_A)  # silent: the command stays outstanding
    await eventually(lambda: _has(redis, {IMEI_A: "a"}))
    command = Command(
        id="off-again", imei=IMEI_A, payload=b"getinfo", offline=True, expires_at_ms=2**50
    )
    assert await store_offline(redis, command, 1) == "a"
    await eventually(lambda: old.commands)
    new = await cluster.device(a, IMEI_A, echo("new"))  # replaces the old connection
    final = await terminal(redis, "off-again")
    assert (final["status"], final["response"], final["attempt"]) == (
        "responded",
        "new:getinfo",
        "2",
    )
    progress = [(s["status"], s["reason"]) for s in await statuses(redis, "off-again")]
    assert ("requeued", "socket_closed") in progress
    assert [m.payload for m in new.commands] == [b"getinfo"]


@pytest_twisted.ensureDeferred
async def test_a_late_reply_is_not_credited_to_the_next_command(redis: Any, cluster: Any) -> None:
    """getver times out; the device's late reply arrives during the settle interval and
    goes to the device-messages stream; setdigout 1, queued behind, gets its own reply."""
    a = await cluster("a", *QUIET_SETTLE)
    dev = await cluster.device(a, IMEI_A)
    await eventually(lambda: _has(redis, {IMEI_A: "a"}))
    await publish(redis, "a", IMEI_A, "getver", id="slow", timeout_s=0.3)
    await publish(redis, "a", IMEI_A, "setdigout 1", id="next")
    await eventually(lambda: dev.commands)
    assert (await terminal(redis, "slow"))["reason"] == "timeout"
    dev.send(reply_frame(CODEC_12, b"Ver:03.18"))  # the late reply
    await eventually(lambda: len(dev.commands) == 2)
    dev.send(reply_frame(CODEC_12, b"DOUT1:1"))
    assert (await terminal(redis, "next"))["response"] == "DOUT1:1"

    async def texts() -> list[str]:
        entries = await redis.execute_command("XRANGE", "telemetry:teltonika:messages", "-", "+")
        return [dict(zip(v[::2], v[1::2], strict=True))["text"] for _, v in entries]

    assert await eventually(lambda: _equal(texts(), ["Ver:03.18"]))


@pytest_twisted.ensureDeferred
async def test_an_offline_command_of_a_dead_instance_reaches_the_device_where_it_is_now(
    redis: Any, cluster: Any
) -> None:
    """Instance b died with an offline command in flight (taken into its stream); the
    device is logged in on a by now. a's janitor puts the command back to wait and, since
    the registry shows the device online on a, asks a to flush: a delivers it without
    waiting for another login."""
    a = await cluster("a", *QUIET)
    command = Command(
        id="off-dead", imei=IMEI_B, payload=b"getinfo", offline=True, expires_at_ms=2**50
    )
    await store_offline(redis, command, 1)
    taken = await run_script(  # what b did at the device's login, before it died
        redis,
        TAKE_OFFLINE,
        [f"commands:offline:{IMEI_B}", "commands:outbound:b", "commands:responses", EXPIRY],
        ["b", "1", "10", "1000"],
    )
    assert reply_int(taken) == 1
    await cluster.device(a, IMEI_B, echo("A"))
    await eventually(lambda: _has(redis, {IMEI_B: "a"}))
    metrics, _ = fresh_metrics()
    janitor = Janitor(redis, "a", metrics, lambda: 1000)
    assert (await janitor.run_once())["failed"] == 1
    final = await terminal(redis, "off-dead")
    assert (final["status"], final["response"], final["attempt"]) == (
        "responded",
        "A:getinfo",
        "2",
    )


@pytest_twisted.ensureDeferred
async def test_an_offline_command_timed_out_on_a_stale_socket_reaches_the_device_elsewhere(
    redis: Any, cluster: Any
) -> None:
    """An offline command is in flight on a's socket, which has gone half-open: the
    device has logged in again on b (collecting an empty waiting list). a's timeout puts
    the command back to wait; the registry shows the device online on b, so b is asked
    to flush and delivers it now instead of at the device's next login."""
    a = await cluster("a", *QUIET)
    b = await cluster("b", *QUIET)
    stale = await cluster.device(a, IMEI_A)  # never answers: the command times out
    await eventually(lambda: _has(redis, {IMEI_A: "a"}))
    command = Command(
        id="off-stale",
        imei=IMEI_A,
        payload=b"getinfo",
        offline=True,
        expires_at_ms=2**50,
        timeout_s=3,
    )
    assert await store_offline(redis, command, 1) == "a"
    await eventually(lambda: stale.commands)
    fresh = await cluster.device(b, IMEI_A, echo("B"))
    await eventually(lambda: _has(redis, {IMEI_A: "b"}))
    assert [s["status"] for s in await statuses(redis, "off-stale")] == ["queued", "delivered"]
    final = await terminal(redis, "off-stale")
    assert (final["status"], final["response"], final["attempt"], final["instance_id"]) == (
        "responded",
        "B:getinfo",
        "2",
        "b",
    )
    progress = [(s["status"], s["reason"]) for s in await statuses(redis, "off-stale")]
    assert ("requeued", "timeout") in progress
    assert [m.payload for m in fresh.commands] == [b"getinfo"]
