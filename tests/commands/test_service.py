"""The command options of ``twistd teltonika``, the service tree, and the protocol hooks."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage

from teltonika.codecs import load_codecs
from teltonika.metrics import ServerMetrics
from teltonika.protocol.server import DeviceFactory, ServerSettings
from teltonika.tap import Options, makeService
from teltonika.wire import encode_avl_frame, encode_login, encode_message, wrap
from teltonika.wire.records import CODEC_8E, CODEC_12, AVLRecord
from tests.commands.test_queue import frame, success
from tests.server.helpers import ControlledSink, SetAuthority

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
    options = parse("--command-timeout", "12.5", "--command-queue-max", "3")
    assert (options["command-timeout"], options["command-queue-max"]) == (12.5, 3)


@pytest.mark.parametrize(
    "argv",
    [
        ["--command-queue-max", "0"],
        ["--command-timeout", "0"],
        ["--heartbeat-interval", "100"],
        ["--janitor-interval", "0"],
        ["--offline-max-attempts", "0"],
    ],
)
def test_command_option_errors(argv: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        parse(*argv)


def test_command_plane_only_with_redis(tmp_path: Any) -> None:
    """With --redis the tree has a 'commands' service (heartbeat, janitor, consumer);
    without it none. makeService opens no Redis connection."""
    reactor = MemoryReactorClock()
    options = parse("--redis", "redis://127.0.0.1:1/0", "--metrics", "off")
    service = makeService(options, reactor, on_fatal=lambda message: None)
    plane = service.getServiceNamed("commands")  # type: ignore[no-untyped-call]
    names = sorted(child.name for child in plane)
    assert names == ["command-consumer", "heartbeat", "janitor"]
    assert reactor.tcpClients == []
    assert len(service.server.factory.session_listeners) == 1
    options = parse("--output", str(tmp_path / "r.jsonl"), "--metrics", "off")
    service = makeService(options, reactor, on_fatal=lambda message: None)
    with pytest.raises(KeyError):
        service.getServiceNamed("commands")  # type: ignore[no-untyped-call]


def login(factory: DeviceFactory) -> tuple[Any, StringTransport]:
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(encode_login(IMEI))
    transport.clear()
    return protocol, transport


def make_factory(**settings: Any) -> tuple[DeviceFactory, ControlledSink, ServerMetrics]:
    metrics = ServerMetrics()
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
    """A command submitted to a session's queue is written; an AVL ACK queued behind it
    follows it whole; the device's reply resolves the command and is not published as
    a device message; an unsolicited reply is."""
    factory, sink, metrics = make_factory(command_timeout=7)
    protocol, transport = login(factory)
    handle = protocol.commands.submit(frame("getinfo"), CODEC_12)
    assert protocol.commands.default_timeout == 7
    record = AVLRecord(1_700_000_000_000, 0, 25.0, 54.0, 1, 2, 3, 4, 0, ())
    protocol.dataReceived(encode_avl_frame(CODEC_8E, [record]))
    assert transport.value() == frame("getinfo") + b"\x00\x00\x00\x01"
    protocol.dataReceived(wrap(encode_message(CODEC_12, b"INI:ok", 0x06)))
    assert success(handle.reply).payload == b"INI:ok"
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
    from teltonika.commands.queue import SocketClosedError
    from tests.commands.test_queue import failure

    factory, _, metrics = make_factory()
    one, _ = login(factory)
    two, _ = login(factory)
    handles = [one.commands.submit(frame("a"), CODEC_12), two.commands.submit(frame("b"), CODEC_12)]
    handles.append(two.commands.submit(frame("c"), CODEC_12))
    assert metrics.registry.get_sample_value("teltonika_command_queue_depth_total") == 3
    two.connectionLost()
    failure(handles[1].reply).trap(SocketClosedError)
    failure(handles[2].reply).trap(SocketClosedError)
    assert metrics.registry.get_sample_value("teltonika_command_queue_depth_total") == 1
