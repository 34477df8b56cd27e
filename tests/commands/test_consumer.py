"""The command consumer against a real redis-server, with StringTransport device sockets."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from teltonika.commands.client import store_offline
from teltonika.commands.codec import encode_command
from teltonika.commands.consumer import CommandConsumer, CommandConsumerSettings
from teltonika.commands.messages import Command, Outcome
from teltonika.protocol.queue import CommandQueue, CommandQueueSettings
from teltonika.wire.records import CODEC_12, CODEC_14, DeviceMessage
from tests.commands.helpers import fresh_metrics, publish, statuses, terminal
from tests.helpers import connection_double, eventually

IMEI = "352093081452251"
OTHER = "490154203237518"


class Devices:
    """Fake device sockets: IMEI -> (transport, queue) on a Clock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.sockets: dict[str, tuple[StringTransport, CommandQueue]] = {}

    def connect(self, imei: str, **kwargs: Any) -> tuple[StringTransport, CommandQueue]:
        """A device socket whose queue writes at once (no quiet or settle interval)
        unless *kwargs* say otherwise."""
        transport = StringTransport()
        kwargs.setdefault("quiet", 0)
        kwargs.setdefault("settle", 0)
        queue = CommandQueue(
            transport, self.clock, settings=CommandQueueSettings(**kwargs), imei=imei
        )
        self.sockets[imei] = (transport, queue)
        return transport, queue

    def lookup(self, imei: str) -> CommandQueue | None:
        socket = self.sockets.get(imei)
        return None if socket is None else socket[1]


@pytest_twisted.async_yield_fixture
async def rig(
    redis: Any, connect: Callable[[], Any]
) -> AsyncIterator[tuple[Devices, Callable[..., CommandConsumer]]]:
    devices = Devices()
    started: list[CommandConsumer] = []

    def start(instance_id: str = "a", **kwargs: Any) -> CommandConsumer:
        metrics, _ = fresh_metrics()
        consumer = CommandConsumer(
            connect(),
            redis,
            instance_id,
            devices.lookup,
            reactor,
            metrics,
            settings=CommandConsumerSettings(block=0.2, **kwargs),
        )
        consumer.startService()
        started.append(consumer)
        return consumer

    yield devices, start
    for consumer in started:
        if consumer.running:
            await consumer.stopService()
        await consumer.when_settled()


@pytest_twisted.async_yield_fixture
async def running(rig: Any) -> AsyncIterator[tuple[CommandConsumer, StringTransport, CommandQueue]]:
    """One consumer of instance a, started once for all examples of a hypothesis test,
    and the socket of a device (IMEI) connected to it."""
    devices, start = rig
    transport, queue = devices.connect(IMEI)
    yield start(), transport, queue


@pytest_twisted.ensureDeferred
async def test_command_written_replied_and_settled(redis: Any, rig: Any) -> None:
    """A command reaches the device's socket; its reply comes back as delivered then
    responded; the entry is deleted from the stream once settled."""
    devices, start = rig
    transport, queue = devices.connect(IMEI)
    start()
    command_id = await publish(redis, "a", IMEI, "getinfo")
    await eventually(transport.value)
    assert transport.value() == encode_command(CODEC_12, b"getinfo", IMEI)
    assert queue.reply_received(DeviceMessage(CODEC_12, 6, b"INI:2019/7/22 RTC:ok\r\n"))
    final = await terminal(redis, command_id)
    assert final["status"] == "responded"
    assert final["response"] == "INI:2019/7/22 RTC:ok"
    assert final["response_hex"] == b"INI:2019/7/22 RTC:ok\r\n".hex()
    assert final["instance_id"] == "a" and final["imei"] == IMEI and final["codec"] == "12"
    assert [s["status"] for s in await statuses(redis, command_id)] == ["delivered", "responded"]
    assert int(await redis.execute_command("XLEN", "commands:outbound:a")) == 0


@pytest_twisted.ensureDeferred
async def test_failures_have_reasons(redis: Any, rig: Any) -> None:
    """device_not_connected, invalid_command, expired, timeout, nack, socket_closed and
    queue_full each end their command with exactly one failed status."""
    devices, start = rig
    transport, queue = devices.connect(IMEI, max_depth=2)
    start()
    missing = await publish(redis, "a", OTHER, "getinfo")
    assert (await terminal(redis, missing))["reason"] == "device_not_connected"
    await redis.execute_command(
        "XADD",
        "commands:outbound:a",
        "*",
        "v",
        "1",
        "id",
        "bad1",
        "imei",
        IMEI,
        "codec",
        "99",
        "payload",
        "x",
    )
    assert (await terminal(redis, "bad1"))["reason"] == "invalid_command"
    expired = await publish(redis, "a", IMEI, "getinfo", expires_at_ms=1)
    assert (await terminal(redis, expired))["reason"] == "expired"

    timed = await publish(redis, "a", IMEI, "getver", timeout_s=5)
    nacked = await publish(redis, "a", IMEI, "getver", codec="14")
    full = await publish(redis, "a", IMEI, "getio")
    assert (await terminal(redis, full))["reason"] == "queue_full"
    await eventually(transport.value)
    devices.clock.advance(5)
    assert (await terminal(redis, timed))["reason"] == "timeout"
    await eventually(lambda: queue.outstanding_codec == CODEC_14)
    assert queue.reply_received(DeviceMessage(CODEC_14, 0x11, b"", imei=IMEI))
    assert (await terminal(redis, nacked))["reason"] == "nack"

    closed = await publish(redis, "a", IMEI, "getinfo")
    await eventually(lambda: queue.outstanding_codec == CODEC_12)
    queue.close()
    assert (await terminal(redis, closed))["reason"] == "socket_closed"
    for command_id in (missing, "bad1", expired, timed, nacked, full, closed):
        finals = [s for s in await statuses(redis, command_id) if s["status"] != "delivered"]
        assert len(finals) == 1, finals
    assert int(await redis.execute_command("XLEN", "commands:outbound:a")) == 0


@pytest_twisted.ensureDeferred
async def test_restarted_consumer_rereads_its_pending_entries(redis: Any, rig: Any) -> None:
    """An entry read but not settled before a stop is dispatched again by the next
    consumer with the same instance id (consumer group pending list)."""
    devices, start = rig
    first_transport, _ = devices.connect(IMEI)
    consumer = start()
    command_id = await publish(redis, "a", IMEI, "getinfo")
    await eventually(first_transport.value)
    await consumer.stopService()
    second_transport, second_queue = devices.connect(IMEI)  # the device reconnected
    start()
    await eventually(second_transport.value)
    assert second_queue.reply_received(DeviceMessage(CODEC_12, 6, b"ok"))
    final = await terminal(redis, command_id)
    assert final["status"] == "responded", [
        (s["status"], s["reason"]) for s in await statuses(redis)
    ]


@pytest_twisted.ensureDeferred
async def test_each_instance_reads_only_its_own_stream(redis: Any, rig: Any) -> None:
    """A command for instance b is not touched by instance a's consumer."""
    devices, start = rig
    transport, _ = devices.connect(IMEI)
    start("a")
    await publish(redis, "b", IMEI, "getinfo")
    mine = await publish(redis, "a", OTHER, "getinfo")
    await terminal(redis, mine)
    assert transport.value() == b""
    assert int(await redis.execute_command("XLEN", "commands:outbound:b")) == 1


async def _stream_settled(redis: Any, stream: str = "commands:outbound:a") -> bool:
    """The stream holds no entry and the group has nothing pending."""
    if int(await redis.execute_command("XLEN", stream)):
        return False
    pending = await redis.execute_command("XPENDING", stream, "teltonika")
    return int(pending[0]) == 0


async def _terminal_count(redis: Any) -> int:
    return len([s for s in await statuses(redis) if s["status"] in ("responded", "failed")])


ENTRY_NAMES = (
    st.sampled_from(
        ["v", "kind", "id", "imei", "codec", "payload", "payload_hex", "timeout_s",
         "created_at_ms", "expires_at_ms", "offline", "attempt"]
    )
    | st.text(max_size=6)
    | st.binary(min_size=1, max_size=6)
)  # fmt: skip
ENTRY_VALUES = (
    st.sampled_from(["", "1", "12", "14", "command", "flush", OTHER, "getinfo", "-5", "nan"])
    | st.text(max_size=16)
    | st.binary(max_size=16)
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entry=st.dictionaries(ENTRY_NAMES, ENTRY_VALUES, min_size=1, max_size=12))
@pytest_twisted.ensureDeferred
async def test_any_entry_ends_in_one_terminal_status_and_the_loop_goes_on(
    redis: Any,
    running: tuple[CommandConsumer, StringTransport, CommandQueue],
    entry: dict[Any, Any],
) -> None:
    """Whatever names and bytes an entry holds (non-UTF-8 values come back from
    txredisapi as bytes), it is settled: acknowledged and deleted, with exactly one
    terminal status (none for a flush or an offline entry with nothing stored). Its
    device (OTHER) is not connected, so a valid one fails with device_not_connected.
    Then the consumer still delivers a valid command to a connected device and its
    reply is published: the loop went on."""
    _consumer, transport, queue = running
    before = await _terminal_count(redis)
    await redis.execute_command(
        "XADD", "commands:outbound:a", "*", *[part for pair in entry.items() for part in pair]
    )
    silent = entry.get("kind") == "flush" or entry.get("offline") == "1"
    await eventually(lambda: _stream_settled(redis), timeout=5)
    await eventually(lambda: _count_is(redis, before + (0 if silent else 1)), timeout=5)
    transport.clear()
    valid = await publish(redis, "a", IMEI, "getinfo")
    await eventually(transport.value, timeout=5)
    assert transport.value() == encode_command(CODEC_12, b"getinfo", IMEI)
    assert queue.reply_received(DeviceMessage(CODEC_12, 6, b"INI:ok"))
    final = await terminal(redis, valid)
    assert (final["status"], final["response"]) == ("responded", "INI:ok")


async def _count_is(redis: Any, expected: int) -> bool:
    count = await _terminal_count(redis)
    assert count <= expected, "more than one terminal status"
    return count == expected


@pytest_twisted.ensureDeferred
async def test_a_valid_command_is_answered_after_malformed_entries(
    redis: Any, rig: Any, logged_errors: Any
) -> None:
    """Malformed entries before it (bytes, missing fields) fail with invalid_command and
    a valid command behind them is still delivered and answered."""
    devices, start = rig
    transport, queue = devices.connect(IMEI)
    start()
    stream = "commands:outbound:a"
    await redis.execute_command("XADD", stream, "*", "id", b"\xff\xfe", "imei", b"\x80")
    await redis.execute_command("XADD", stream, "*", b"\xc3", b"\x00\xff", "id", "bad2")
    await redis.execute_command("XADD", stream, "*", "id", "bad3", "imei", IMEI, "payload", "é")
    good = await publish(redis, "a", IMEI, "getinfo")
    await eventually(transport.value)
    assert queue.reply_received(DeviceMessage(CODEC_12, 6, b"INI:ok"))
    assert (await terminal(redis, good))["response"] == "INI:ok"
    reasons = [(s["id"], s["reason"]) for s in await statuses(redis) if s["status"] == "failed"]
    assert reasons == [
        ("\\xff\\xfe", "invalid_command"),
        ("bad2", "invalid_command"),
        ("bad3", "invalid_command"),
    ]
    assert await _stream_settled(redis)


def _flat(args: Any) -> list[Any]:
    out: list[Any] = []
    for arg in args:
        out.extend(_flat(arg) if isinstance(arg, list | tuple) else [arg])
    return out


def _publishes(status: str) -> Callable[[tuple[Any, ...]], bool]:
    """Whether a Redis call's arguments publish a status entry *status* (by whatever
    command: a script's arguments or an XADD)."""

    def check(args: tuple[Any, ...]) -> bool:
        flat = _flat(args)
        return any(a == "status" and b == status for a, b in itertools.pairwise(flat))

    return check


class FlakyRedis:
    """A txredisapi connection whose first call that *matches* fails (EVAL or any other
    command): before Redis ran it (*ran* False: the connection was down), or after (*ran*
    True: the reply was lost)."""

    def __init__(self, redis: Any, ran: bool, matches: Callable[[tuple[Any, ...]], bool]) -> None:
        self._redis = redis
        self.ran = ran
        self.matches = matches
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)

    async def _call(self, name: str, *args: Any) -> Any:
        run = getattr(self._redis, name)
        if not self.matches(args):
            return await run(*args)
        self.calls += 1
        if self.calls == 1:
            if self.ran:
                await run(*args)
            raise ConnectionError("connection lost mid-call")
        return await run(*args)

    def eval(self, *args: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._call("eval", *args))

    def execute_command(self, *args: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._call("execute_command", *args))


@pytest.mark.parametrize("update", ["settle", "delivered"])
@pytest.mark.parametrize("ran", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_failed_status_update_is_retried_until_redis_takes_it(
    redis: Any, connect: Callable[[], Any], logged_errors: Any, ran: bool, update: str
) -> None:
    """The status-and-XACK script, or the delivered status, fails once (connection
    dropped before or after Redis ran it): it is retried, the sender gets exactly one
    delivered status then exactly one terminal status, in that order, the entry is
    settled (so it is not written again after a restart) and no mark is left behind."""
    devices = Devices()
    transport, queue = devices.connect(IMEI)
    flaky = FlakyRedis(redis, ran, _publishes({"settle": "responded", "delivered": update}[update]))
    metrics, registry = fresh_metrics()
    consumer = CommandConsumer(
        connect(),
        flaky,
        "a",
        devices.lookup,
        reactor,
        metrics,
        settings=CommandConsumerSettings(block=0.2),
    )
    consumer.startService()
    try:
        command_id = await publish(redis, "a", IMEI, "getinfo")
        await eventually(transport.value)
        if update == "delivered":  # its retry has gone through before the reply comes
            await eventually(lambda: flaky.calls >= 2)
        assert queue.reply_received(DeviceMessage(CODEC_12, 6, b"INI:ok"))
        await eventually(lambda: flaky.calls >= 2)
        final = await terminal(redis, command_id)
        assert final["status"] == "responded"
        await consumer.when_settled()
        assert [s["status"] for s in await statuses(redis, command_id)] == [
            "delivered",
            "responded",
        ]
        assert await _stream_settled(redis)
        assert not await redis.exists("commands:delivered:a")
        assert (
            registry.get_sample_value("teltonika_command_redis_retries_total", {"update": update})
            == 1
        )
        assert (
            registry.get_sample_value(
                "teltonika_commands_total", {"status": "delivered", "reason": ""}
            )
            # a status whose first call ran, reply lost, is not counted (as for settle)
            == (None if ran and update == "delivered" else 1)
        )
    finally:
        await consumer.stopService()
    assert len(logged_errors.flush()) == 1


@pytest_twisted.ensureDeferred
async def test_abandon_ends_the_retries(
    redis: Any, connect: Callable[[], Any], logged_errors: Any
) -> None:
    """At shutdown the retries stop: nothing keeps running against a closed connection."""

    class Down:
        def eval(self, *args: Any) -> Deferred[Any]:
            return fail(ConnectionError("down"))

    devices = Devices()
    metrics, _ = fresh_metrics()
    consumer = CommandConsumer(
        connect(), connection_double(Down()), "a", devices.lookup, reactor, metrics
    )
    outcome = Outcome("c", IMEI, "12", "failed", reason="timeout")
    settling = consumer._settle("1-1", outcome, offline=False)
    await eventually(lambda: consumer._retry_waits)
    consumer.abandon()
    assert await settling is None
    assert not consumer._retry_waits
    logged_errors.flush()


async def behind_a_slow_command(redis: Any, rig: Any) -> tuple[Any, ...]:
    """A device socket whose one command (getver) is outstanding; returns the rig's
    devices, the socket's transport (cleared) and queue, the consumer, the command id."""
    devices, start = rig
    transport, queue = devices.connect(IMEI)
    consumer = start()
    slow = await publish(redis, "a", IMEI, "getver")
    await eventually(transport.value)
    transport.clear()
    return devices, transport, queue, consumer, slow


@pytest_twisted.ensureDeferred
async def test_a_command_expiring_behind_a_slow_one_is_failed_not_written(
    redis: Any, rig: Any
) -> None:
    """An online command with a 1 s expiry waits behind a slow command: when the expiry
    passes it fails with expired and is never written (today's delivered-late bug)."""
    devices, transport, queue, consumer, slow = await behind_a_slow_command(redis, rig)
    late = await publish(redis, "a", IMEI, "setdigout 1", expires_at_ms=consumer.now_ms() + 1000)
    await eventually(lambda: queue.depth == 2)
    devices.clock.advance(1)
    final = await terminal(redis, late)
    assert (final["status"], final["reason"]) == ("failed", "expired")
    assert queue.reply_received(DeviceMessage(CODEC_12, 6, b"Ver:1"))
    await terminal(redis, slow)
    devices.clock.advance(60)
    assert transport.value() == b""
    assert [s["status"] for s in await statuses(redis, late)] == ["failed"]


@pytest_twisted.ensureDeferred
async def test_an_offline_command_in_flight_expires_instead_of_being_written_late(
    redis: Any, rig: Any
) -> None:
    """An offline command taken at login waits behind a slow command; its expiry passes
    before its turn: failed/expired, never written, and its stored copy is gone."""
    devices, transport, queue, consumer, slow = await behind_a_slow_command(redis, rig)
    command = Command(
        id="off-late",
        imei=IMEI,
        payload=b"setdigout 1",
        offline=True,
        expires_at_ms=consumer.now_ms() + 1000,
    )
    await store_offline(redis, command, consumer.now_ms())
    await consumer.take_offline(IMEI)
    await eventually(lambda: queue.depth == 2)
    devices.clock.advance(1)
    final = await terminal(redis, "off-late")
    assert (final["status"], final["reason"]) == ("failed", "expired")
    assert not await redis.exists("commands:offline:command:off-late")
    assert await redis.zcard("commands:offline:expiry") == 0
    assert queue.reply_received(DeviceMessage(CODEC_12, 6, b"Ver:1"))
    await terminal(redis, slow)
    assert transport.value() == b""


@pytest_twisted.ensureDeferred
async def test_an_offline_command_timed_out_on_an_old_session_goes_to_the_new_one(
    redis: Any, rig: Any
) -> None:
    """The device logged in again on this instance while an offline command was in
    flight on its old session (which then timed out instead of closing): the new login
    collected an empty list, so when the timeout puts the command back the consumer takes
    the list again and the new session gets the command now."""
    devices, start = rig
    old_transport, _old_queue = devices.connect(IMEI)
    consumer = start()
    command = Command(
        id="off-old",
        imei=IMEI,
        payload=b"getinfo",
        offline=True,
        expires_at_ms=consumer.now_ms() + 600_000,
        timeout_s=5,
    )
    await store_offline(redis, command, consumer.now_ms())
    await consumer.take_offline(IMEI)
    await eventually(old_transport.value)
    new_transport, new_queue = devices.connect(IMEI)  # the new session
    await consumer.take_offline(IMEI)  # what its login does: the list is empty now
    devices.clock.advance(5)
    await eventually(new_transport.value)
    assert new_transport.value() == encode_command(CODEC_12, b"getinfo", IMEI)
    assert new_queue.reply_received(DeviceMessage(CODEC_12, 6, b"INI:ok"))
    final = await terminal(redis, "off-old")
    assert (final["status"], final["response"], final["attempt"]) == ("responded", "INI:ok", "2")
    progress = [(s["status"], s["reason"]) for s in await statuses(redis, "off-old")]
    assert progress[:3] == [("queued", ""), ("delivered", ""), ("requeued", "timeout")]
