"""The UDP listener: ACK after the sink, malformed dropped, failures counted, drained at
shutdown (real loopback UDP where the socket matters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.udp import Port
from twisted.logger import capturedLogs

from teltonika.codecs import CodecRegistry
from teltonika.metrics import ServerMetrics
from teltonika.protocol.udp import LOG_INTERVAL, DeviceDatagramProtocol
from teltonika.wire import (
    CODEC_8,
    CODEC_12,
    AVLPacket,
    encode_message,
    encode_udp,
    udp_ack,
    wrap_udp,
)
from teltonika.wire.builtin_codecs import BUILTIN_CODECS
from tests.dropin import CODEC_7A, codec7a
from tests.helpers import IMEI, ControlledSink, SetAuthority, record

CODECS = CodecRegistry(BUILTIN_CODECS)


def listen_udp(protocol: DatagramProtocol) -> Port:
    """Bind *protocol* to a free loopback UDP port (the global reactor's declared type does
    not show its listenUDP)."""
    port: Port = reactor.listenUDP(0, protocol, interface="127.0.0.1")  # type: ignore[attr-defined]
    return port


class Client(DatagramProtocol):
    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.waiting: Deferred[bytes] | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.replies.append(datagram)
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.callback(datagram)

    def send(self, datagram: bytes, address: tuple[str, int]) -> None:
        assert self.transport is not None  # listening
        self.transport.write(datagram, address)


@pytest_twisted.ensureDeferred
async def test_udp_ack_after_sink_and_malformed_dropped(logged_errors: Any) -> None:
    sink = ControlledSink(auto=False)
    metrics = ServerMetrics.create(CollectorRegistry())
    server = DeviceDatagramProtocol(CODECS, sink, SetAuthority(), metrics, reactor)
    server_port = listen_udp(server)
    client = Client()
    client_port = listen_udp(client)
    address = ("127.0.0.1", server_port.getHost().port)
    try:
        datagram = encode_udp(
            IMEI, CODEC_8, [record(1), record(2)], packet_id=0xCAFE, avl_packet_id=7
        )
        client.send(b"\x00\x01garbage", address)
        client.send(datagram, address)
        while not sink.calls:
            await deferLater(reactor, 0.01, lambda: None)
        assert client.replies == []  # nothing before the sink confirmed
        client.waiting = Deferred()
        sink.calls[0][4].callback(None)
        reply = await client.waiting
        assert reply == udp_ack(0xCAFE, 7, 2)
        assert sink.calls[0][0] == IMEI and len(sink.calls[0][2]) == 2

        # a failing sink: no ACK, counted
        client.send(datagram, address)
        while len(sink.calls) < 2:
            await deferLater(reactor, 0.01, lambda: None)
        sink.calls[1][4].errback(RuntimeError("down"))
        await deferLater(reactor, 0.05, lambda: None)
        assert client.replies == [reply]
        assert len(logged_errors.flush()) == 1

        def sample(result: str) -> float | None:
            return metrics.registry.get_sample_value(
                "teltonika_udp_datagrams_total", {"result": result}
            )

        assert sample("malformed") == 1
        assert sample("acked") == 1
        assert sample("sink_failed") == 1
    finally:
        await server_port.stopListening()
        await client_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_datagram_bodies_are_decoded_by_the_codec_registry() -> None:
    """A datagram's body goes through the codec registry, as a TCP frame's does: an AVL
    codec plugin (0x7A) is decoded, published under its name and ACKed with its count; a
    message codec's body is dropped as malformed (reason field), and a body whose codec no
    plugin claims as unknown_codec."""
    sink = ControlledSink()
    metrics = ServerMetrics.create(CollectorRegistry())
    codecs = CodecRegistry([*BUILTIN_CODECS, codec7a])
    server = DeviceDatagramProtocol(codecs, sink, SetAuthority(), metrics, reactor)
    server_port = listen_udp(server)
    client = Client()
    client_port = listen_udp(client)
    address = ("127.0.0.1", server_port.getHost().port)
    try:
        packet = AVLPacket(CODEC_7A, (record(1), record(2), record(3)))
        client.waiting = Deferred()
        client.send(wrap_udp(IMEI, codec7a.encode(packet), 5, 6), address)
        assert await client.waiting == udp_ack(5, 6, 3)
        [(imei, codec, records, _at, _d)] = sink.calls
        assert (imei, codec) == (IMEI, "7A")
        assert [(r.timestamp_ms, r.speed) for r in records] == [
            (r.timestamp_ms, r.speed) for r in packet.records
        ]
        for body in (encode_message(CODEC_12, b"getver"), bytes([0x42, 1, 0, 1])):
            server.datagramReceived(wrap_udp(IMEI, body), address)
        assert len(sink.calls) == 1
        assert (
            metrics.registry.get_sample_value("teltonika_decode_errors_total", {"reason": "field"})
            == 1
        )
        assert (
            metrics.registry.get_sample_value(
                "teltonika_decode_errors_total", {"reason": "unknown_codec"}
            )
            == 1
        )
        assert metrics.registry.get_sample_value("teltonika_records_total", {"codec": "7A"}) == 3
    finally:
        await server_port.stopListening()
        await client_port.stopListening()


@pytest.fixture
def udp_protocol() -> Iterator[Callable[..., tuple[DeviceDatagramProtocol, Clock]]]:
    """Makes a protocol listening on a real loopback UDP port (its own Clock for the
    rate limits); the ports are closed afterwards."""
    ports: list[Any] = []

    def make(sink: Any = None, authority: Any = None) -> tuple[DeviceDatagramProtocol, Clock]:
        clock = Clock()
        protocol = DeviceDatagramProtocol(
            CODECS,
            sink if sink is not None else ControlledSink(),
            authority if authority is not None else SetAuthority(),
            ServerMetrics.create(CollectorRegistry()),
            clock,
        )
        ports.append(listen_udp(protocol))
        return protocol, clock

    yield make
    for port in ports:
        port.stopListening()


def _results(protocol: DeviceDatagramProtocol, result: str) -> float:
    value = protocol.metrics.registry.get_sample_value(
        "teltonika_udp_datagrams_total", {"result": result}
    )
    return value or 0.0


def test_sendto_error_is_caught_counted_and_logged_rate_limited(udp_protocol: Any) -> None:
    """An ACK the kernel refuses to send (here a real EACCES: a datagram claiming the
    broadcast address as its source, answered from a socket without SO_BROADCAST) does not
    escape as an unhandled error: each is counted (result ack_failed), and a burst logs
    one event; the next one after the interval says how many were left out."""
    protocol, clock = udp_protocol()
    datagram = encode_udp(IMEI, CODEC_8, [record(1)])
    with capturedLogs() as events:
        for _ in range(5):
            protocol.datagramReceived(datagram, ("255.255.255.255", 5027))
        clock.advance(LOG_INTERVAL)
        protocol.datagramReceived(datagram, ("255.255.255.255", 5027))
    assert _results(protocol, "ack_failed") == 6
    assert _results(protocol, "acked") == 0
    sent = [e for e in events if "Could not send the ACK" in e["log_format"]]
    assert [e["suppressed"] for e in sent] == [0, 4]
    assert "Permission denied" in sent[0]["error"]
    assert protocol.in_flight == 0


def test_authority_failure_drops_and_counts_the_datagram(
    udp_protocol: Any, logged_errors: Any
) -> None:
    """A device lookup that gives no answer drops the datagram unACKed and counts it
    (result authority_failed); a flood of them logs one error per interval."""
    protocol, _clock = udp_protocol(authority=SetAuthority(error=RuntimeError("Redis down")))
    for _ in range(3):
        protocol.datagramReceived(encode_udp(IMEI, CODEC_8, [record(1)]), ("10.0.0.9", 1))
    assert _results(protocol, "authority_failed") == 3
    assert len(logged_errors.flush()) == 1


def test_malformed_datagrams_are_logged_rate_limited(udp_protocol: Any) -> None:
    """A malformed datagram costs a spoofer nothing to send: each is dropped and counted,
    and a flood logs one warning per interval (the next says how many were left out)."""
    protocol, clock = udp_protocol()
    with capturedLogs() as events:
        for _ in range(100):
            protocol.datagramReceived(b"\x00\x01garbage", ("10.0.0.9", 1))
        clock.advance(LOG_INTERVAL)
        protocol.datagramReceived(b"\x00\x01garbage", ("10.0.0.9", 1))
    assert _results(protocol, "malformed") == 101
    dropped = [e for e in events if e.get("event") == "rejected_frame"]
    assert [e["suppressed"] for e in dropped] == [0, 99]
    assert dropped[0]["peer"] == "10.0.0.9:1" and dropped[0]["hex"] == "000167617262616765"


@pytest_twisted.ensureDeferred
async def test_shutdown_drains_datagrams_before_closing_the_port(tmp_path: Path) -> None:
    """A datagram whose records are still on their way to the sink when the shutdown
    starts is ACKed: the port stops reading but stays open until the sink answered."""
    from twisted.application.internet import UDPServer

    from teltonika.protocol.tcp import DeviceFactory
    from teltonika.services.ingestion import IngestionService, IngestionSettings

    sink = ControlledSink(auto=False)
    metrics = ServerMetrics.create(CollectorRegistry())
    datagrams = DeviceDatagramProtocol(CODECS, sink, SetAuthority(), metrics, reactor)
    factory = DeviceFactory(CODECS, sink, SetAuthority(), metrics, reactor)
    ingestion = IngestionService(
        factory,
        ControlledSink(),
        [],
        udp=(UDPServer(0, datagrams, interface="127.0.0.1", reactor=reactor), datagrams),
        clock=reactor,
        on_fatal=lambda message: None,
        settings=IngestionSettings(shutdown_timeout=5.0),
    )
    ingestion.privilegedStartService()
    ingestion.startService()
    client = Client()
    client_port = listen_udp(client)
    try:
        assert datagrams.transport is not None
        address = ("127.0.0.1", datagrams.transport.getHost().port)
        client.send(encode_udp(IMEI, CODEC_8, [record(1)], packet_id=3), address)
        while not sink.calls:
            await deferLater(reactor, 0.01, lambda: None)
        stopping = ingestion.stopService()
        await deferLater(reactor, 0.05, lambda: None)
        assert not stopping.called  # waits for the datagram in flight
        client.waiting = Deferred()
        sink.calls[0][4].callback(None)
        assert await client.waiting == udp_ack(3, 0, 1)
        await stopping
        assert datagrams.transport is None  # and then the port closed
    finally:
        await client_port.stopListening()
