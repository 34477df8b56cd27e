"""The command consumer against a real redis-server, with StringTransport device sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from teltonika.commands.codec import encode_command
from teltonika.commands.consumer import CommandConsumer
from teltonika.commands.queue import CommandQueue
from teltonika.wire.records import CODEC_12, CODEC_14, DeviceMessage
from tests.commands.conftest import fresh_metrics
from tests.commands.helpers import eventually, publish, statuses, terminal

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
        queue = CommandQueue(transport, self.clock, imei=imei, **kwargs)
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
            connect(), redis, instance_id, devices.lookup, reactor, metrics, block=0.2, **kwargs
        )
        consumer.startService()
        started.append(consumer)
        return consumer

    yield devices, start
    for consumer in started:
        if consumer.running:
            await consumer.stopService()
        await consumer.when_settled()


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
