"""The UDP listener over real loopback UDP: ACK after the sink, malformed dropped."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater

from teltonika.metrics import ServerMetrics
from teltonika.udp import DeviceDatagramProtocol
from teltonika.wire import CODEC_8, encode_udp, udp_ack
from tests.server.helpers import IMEI, ControlledSink, SetAuthority, record


class Client(DatagramProtocol):
    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.waiting: Deferred[bytes] | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.replies.append(datagram)
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.callback(datagram)


@pytest_twisted.ensureDeferred
async def test_udp_ack_after_sink_and_malformed_dropped(logged_errors: Any) -> None:
    sink = ControlledSink(auto=False)
    metrics = ServerMetrics(CollectorRegistry())
    server = DeviceDatagramProtocol(sink, SetAuthority(), metrics, reactor)
    server_port = reactor.listenUDP(0, server, interface="127.0.0.1")
    client = Client()
    client_port = reactor.listenUDP(0, client, interface="127.0.0.1")
    address = ("127.0.0.1", server_port.getHost().port)
    try:
        datagram = encode_udp(
            IMEI, CODEC_8, [record(1), record(2)], packet_id=0xCAFE, avl_packet_id=7
        )
        client.transport.write(b"\x00\x01garbage", address)
        client.transport.write(datagram, address)
        while not sink.calls:
            await deferLater(reactor, 0.01, lambda: None)
        assert client.replies == []  # nothing before the sink confirmed
        client.waiting = Deferred()
        sink.calls[0][4].callback(None)
        reply = await client.waiting
        assert reply == udp_ack(0xCAFE, 7, 2)
        assert sink.calls[0][0] == IMEI and len(sink.calls[0][2]) == 2

        # a failing sink: no ACK, counted
        client.transport.write(datagram, address)
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
