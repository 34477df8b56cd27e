"""The command options of ``twistd teltonika``, the service tree, and the protocol hooks."""

from __future__ import annotations

from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage

from teltonika.codecs import load_codecs
from teltonika.metrics import ServerMetrics
from teltonika.protocol.settings import ServerSettings
from teltonika.protocol.tcp import DeviceFactory
from teltonika.tap import Options, build_service
from teltonika.wire import encode_avl_frame, encode_login, encode_message, wrap
from teltonika.wire.records import CODEC_8E, CODEC_12, AVLRecord
from tests.helpers import ControlledSink, SetAuthority, process_reactor, successResultOf
from tests.helpers import command_frame as frame

IMEI = "352093081452251"


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_command_option_defaults() -> None:
    options = parse()
    assert (
        options["command-timeout"],
        options["command-queue-warn"],
        options["command-queue-max"],
        options["heartbeat-interval"],
        options["heartbeat-ttl"],
        options["janitor-interval"],
        options["offline-max-attempts"],
    ) == (30.0, 5, 20, 30.0, 90.0, 30.0, 10)
    assert (options["command-quiet"], options["command-settle"]) == (1.0, 2.0)
    options = parse("--command-timeout", "12.5", "--command-queue-max", "3")
    assert (options["command-timeout"], options["command-queue-max"]) == (12.5, 3)
    options = parse("--command-quiet", "0.25", "--command-settle", "0")
    assert (options["command-quiet"], options["command-settle"]) == (0.25, 0.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--command-queue-max", "0"],
        ["--command-timeout", "0"],
        ["--heartbeat-interval", "100"],
        ["--janitor-interval", "0"],
        ["--offline-max-attempts", "0"],
        ["--command-quiet", "0"],
        ["--command-quiet", "-1"],
        ["--command-quiet", "301"],
        ["--command-settle", "-1"],
        ["--command-settle", "301"],
    ],
)
def test_command_option_errors(argv: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        parse(*argv)


def test_command_plane_only_with_redis(tmp_path: Any) -> None:
    """With --redis the tree has a 'commands' service (heartbeat, janitor, consumer);
    without it none. build_service opens no Redis connection."""
    reactor = MemoryReactorClock()
    options = parse("--redis", "redis://127.0.0.1:1/0", "--metrics", "off")
    service = build_service(options, process_reactor(reactor), on_fatal=lambda message: None)
    plane = service.getServiceNamed("commands")
    names = sorted(child.name for child in plane)
    assert names == ["command-consumer", "heartbeat", "janitor"]
    assert reactor.tcpClients == []
    assert len(service.server.factory.session_listeners) == 1
    options = parse("--output", str(tmp_path / "r.jsonl"), "--metrics", "off")
    service = build_service(options, process_reactor(reactor), on_fatal=lambda message: None)
    with pytest.raises(KeyError):
        service.getServiceNamed("commands")


ACK_1 = b"\x00\x00\x00\x01"


def avl(n: int) -> bytes:
    record = AVLRecord(1_700_000_000_000 + n * 1000, 0, 25.0, 54.0, 1, 2, 3, 4, 0, ())
    return encode_avl_frame(CODEC_8E, [record])


def login(factory: DeviceFactory) -> tuple[Any, StringTransport]:
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(encode_login(IMEI))
    transport.clear()
    return protocol, transport


def clock_of(factory: DeviceFactory) -> MemoryReactorClock:
    """The memory reactor a factory of this module was built with (typed IReactorTime)."""
    return cast(MemoryReactorClock, factory.clock)


def make_factory(**settings: Any) -> tuple[DeviceFactory, ControlledSink, ServerMetrics]:
    metrics = ServerMetrics.create(CollectorRegistry())
    sink = ControlledSink()
    factory = DeviceFactory(
        load_codecs(),
        sink,
        SetAuthority(),
        metrics,
        MemoryReactorClock(),
        ServerSettings(**settings),
    )
    return factory, sink, metrics


def test_protocol_writes_go_through_the_queue_and_replies_resolve_commands() -> None:
    """A command submitted to a session's queue is written right after the next ACK,
    whole; the device's reply resolves the command and is not published as a device
    message; an unsolicited reply is."""
    factory, sink, metrics = make_factory(command_timeout=7)
    protocol, transport = login(factory)
    handle = protocol.session.commands.submit(frame("getinfo"), CODEC_12)
    assert protocol.session.commands.settings.default_timeout == 7
    protocol.dataReceived(avl(0))
    assert transport.value() == ACK_1 + frame("getinfo")
    protocol.dataReceived(wrap(encode_message(CODEC_12, b"INI:ok", 0x06)))
    assert successResultOf(handle.reply).payload == b"INI:ok"
    assert sink.messages == []
    protocol.dataReceived(wrap(encode_message(CODEC_12, b"scale 1kg", 0x06)))
    assert [m["text"] for _, m, _d in sink.messages] == ["scale 1kg"]
    assert (
        metrics.registry.get_sample_value(
            "teltonika_command_unsolicited_replies_total", {"codec": "12"}
        )
        == 1
    )


def test_socket_close_fails_pending_and_the_gauge_sums_sockets() -> None:
    """teltonika_command_queue_depth_total sums every socket's queue; a closed socket's
    commands fail with SocketClosedError and leave the gauge."""
    from teltonika.protocol.queue import SocketClosedError
    from tests.helpers import failureResultOf

    factory, _, metrics = make_factory()
    one, _ = login(factory)
    two, _ = login(factory)
    handles = [
        one.session.commands.submit(frame("a"), CODEC_12),
        two.session.commands.submit(frame("b"), CODEC_12),
    ]
    handles.append(two.session.commands.submit(frame("c"), CODEC_12))
    assert metrics.registry.get_sample_value("teltonika_command_queue_depth_total") == 3
    two.connectionLost()
    failureResultOf(handles[1].reply).trap(SocketClosedError)
    failureResultOf(handles[2].reply).trap(SocketClosedError)
    assert metrics.registry.get_sample_value("teltonika_command_queue_depth_total") == 1


def test_a_command_never_goes_out_in_place_of_an_ack() -> None:
    """The reproduction: log in, feed one AVL frame with the sink held, submit getinfo.
    The command waits; the ACK goes first when the frame is stored, and the command
    follows it in the same write turn (the device reads its ACK, then the command)."""
    factory, sink, _ = make_factory()
    sink.auto = False
    protocol, transport = login(factory)
    protocol.dataReceived(avl(0))
    handle = protocol.session.commands.submit(frame("getinfo"), CODEC_12)
    clock_of(factory).advance(5)  # a slow sink: the quiet interval passes, the frame waits
    assert transport.value() == b""
    sink.calls[0][-1].callback(None)
    assert transport.value() == ACK_1 + frame("getinfo")
    assert successResultOf(handle.written) is True


def test_a_pipelined_frame_keeps_the_command_back_until_its_own_ack() -> None:
    """Two frames in one read: after the first ACK the device is awaiting the second
    frame's ACK, so the command goes only after that one."""
    factory, sink, _ = make_factory()
    sink.auto = False
    protocol, transport = login(factory)
    protocol.session.commands.submit(frame("getinfo"), CODEC_12)
    protocol.dataReceived(avl(0) + avl(1))
    sink.calls[0][-1].callback(None)
    assert transport.value() == ACK_1
    sink.calls[1][-1].callback(None)
    assert transport.value() == ACK_1 + ACK_1 + frame("getinfo")


def test_a_partial_frame_keeps_the_command_back() -> None:
    """Half a frame buffered means the device is in the middle of sending one and will
    await its ACK: no command after the previous ACK nor after any quiet time."""
    factory, _, _ = make_factory()
    protocol, transport = login(factory)
    protocol.session.commands.submit(frame("getinfo"), CODEC_12)
    second = avl(1)
    protocol.dataReceived(avl(0) + second[:10])
    assert transport.value() == ACK_1
    clock_of(factory).advance(10)
    assert transport.value() == ACK_1
    protocol.dataReceived(second[10:])
    assert transport.value() == ACK_1 + ACK_1 + frame("getinfo")


def test_after_login_a_command_waits_for_an_ack_or_the_quiet_interval() -> None:
    """The login's 01 is no opportunity (a device with a backlog sends at once): a command
    queued at login goes after the quiet interval of a silent device, or right after the
    first ACK of a device that starts sending."""
    factory, _, _ = make_factory(command_quiet=1.5)
    quiet_one, quiet_transport = login(factory)
    quiet_one.session.commands.submit(frame("getinfo"), CODEC_12)
    clock_of(factory).advance(1.0)
    quiet_one.dataReceived(b"\xff")  # a keepalive is a byte received too
    clock_of(factory).advance(1.4)
    assert quiet_transport.value() == b""
    clock_of(factory).advance(0.1)
    assert quiet_transport.value() == frame("getinfo")

    busy, busy_transport = login(factory)
    busy.session.commands.submit(frame("getver"), CODEC_12)
    busy.dataReceived(avl(0))
    assert busy_transport.value() == ACK_1 + frame("getver")


def test_a_reply_is_no_opportunity_for_the_next_command() -> None:
    """After a reply the next command waits for an ACK or the quiet interval too: the
    device may have sent a frame right behind its reply."""
    factory, _, _ = make_factory()
    protocol, transport = login(factory)
    first = protocol.session.commands.submit(frame("getinfo"), CODEC_12)
    protocol.session.commands.submit(frame("getver"), CODEC_12)
    clock_of(factory).advance(1)
    assert transport.value() == frame("getinfo")
    transport.clear()
    protocol.dataReceived(wrap(encode_message(CODEC_12, b"INI:ok", 0x06)))
    assert successResultOf(first.reply).payload == b"INI:ok"
    assert transport.value() == b""
    clock_of(factory).advance(1)
    assert transport.value() == frame("getver")


def test_a_device_reporting_every_second_gets_its_command_after_an_ack() -> None:
    """The protocol tells the queue when AVL frames arrive: for a device reporting once
    a second, the quiet interval alone never lets a command out when its next frame is
    due; the next ACK does."""
    factory, _, _ = make_factory()
    protocol, transport = login(factory)
    for n in range(3):
        clock_of(factory).advance(1.0)
        protocol.dataReceived(avl(n))
    transport.clear()
    protocol.session.commands.submit(frame("getinfo"), CODEC_12)
    clock_of(factory).advance(1.0)
    assert transport.value() == b""
    protocol.dataReceived(avl(3))
    assert transport.value() == ACK_1 + frame("getinfo")


def test_an_ack_after_a_slow_store_starts_the_quiet_interval_again() -> None:
    """A frame stored in 1.5 s (longer than the quiet interval): its ACK makes the device
    send its next frame, so a command arriving 0.1 s after the ACK waits a whole quiet
    interval from the ACK instead of going out at once, ahead of that frame."""
    factory, sink, _ = make_factory(command_quiet=1)
    sink.auto = False
    protocol, transport = login(factory)
    protocol.dataReceived(avl(0))
    clock_of(factory).advance(1.5)
    sink.calls[0][-1].callback(None)
    assert transport.value() == ACK_1
    clock_of(factory).advance(0.1)
    protocol.session.commands.submit(frame("getinfo"), CODEC_12)
    clock_of(factory).advance(0.89)
    assert transport.value() == ACK_1
    clock_of(factory).advance(0.01)
    assert transport.value() == ACK_1 + frame("getinfo")


def test_the_login_reply_starts_the_quiet_interval_again() -> None:
    """A login decided slowly (a 3 s authority lookup): the device starts sending its
    backlog when it reads the 01, so an offline command taken at login waits a quiet
    interval from the 01, not from the IMEI packet."""
    from tests.helpers import PendingAuthority

    authority = PendingAuthority()
    factory = DeviceFactory(
        load_codecs(),
        ControlledSink(),
        authority,
        ServerMetrics.create(CollectorRegistry()),
        MemoryReactorClock(),
        ServerSettings(command_quiet=1),
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(encode_login(IMEI))
    clock_of(factory).advance(3)
    authority.pending[0].callback(True)
    assert transport.value() == b"\x01"
    handle = protocol.session.commands.submit(frame("getinfo"), CODEC_12)
    clock_of(factory).advance(0.99)
    assert transport.value() == b"\x01"
    clock_of(factory).advance(0.01)
    assert transport.value() == b"\x01" + frame("getinfo")
    assert successResultOf(handle.written) is True


def test_no_command_is_written_while_the_connection_drains() -> None:
    """At shutdown the server reads no more (stop_reading) and then closes: a command
    written then would have its reply unread (and an offline one would run twice). It
    waits on neither path, after the last ACK nor after any quiet time, and fails with
    socket_closed when the connection closes; the ACK itself still goes out."""
    from teltonika.protocol.queue import SocketClosedError
    from tests.helpers import failureResultOf

    factory, sink, _ = make_factory(command_quiet=1)
    sink.auto = False
    protocol, transport = login(factory)
    protocol.dataReceived(avl(0))
    handle = protocol.session.commands.submit(frame("getinfo"), CODEC_12)
    protocol.session.stop_reading()
    sink.calls[0][-1].callback(None)
    assert transport.value() == ACK_1
    clock_of(factory).advance(10)
    assert transport.value() == ACK_1
    protocol.connectionLost()
    failureResultOf(handle.reply).trap(SocketClosedError)
    assert successResultOf(handle.written) is False

    quiet, quiet_transport = login(factory)
    waiting = quiet.session.commands.submit(frame("getver"), CODEC_12)
    clock_of(factory).advance(0.5)
    quiet.session.stop_reading()
    clock_of(factory).advance(10)
    assert quiet_transport.value() == b""
    quiet.connectionLost()
    failureResultOf(waiting.reply).trap(SocketClosedError)
