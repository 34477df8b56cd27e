"""DirectWriter over real TCP: bytes arrive complete and in order whether the kernel took
them at once or the transport queued the rest, and a peer that stops reading still pauses
the transport's producer (backpressure unchanged)."""

from __future__ import annotations

import socket
from typing import Any, cast

import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, ISystemHandle
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from teltonika.processor.live.socketwrite import DirectWriter, _after
from tests.processor.live.helpers import eventually


@given(st.lists(st.binary(max_size=20), max_size=6), st.data())
def test_after_is_the_rest(parts: list[bytes], data: st.DataObject) -> None:
    """What is left after a partial send is exactly the unsent tail of the parts."""
    whole = b"".join(parts)
    sent = data.draw(st.integers(0, len(whole)))
    assert b"".join(_after(parts, sent)) == whole[sent:]


def test_other_transports_get_write_sequence() -> None:
    """A transport that is not plain TCP is never bypassed."""
    transport = StringTransport()
    writer = DirectWriter(transport)
    assert writer.socket is None
    writer.write((b"ab", b"c"), 3)
    assert transport.value() == b"abc"


@implementer(IPushProducer)
class Server(Protocol):
    def __init__(self) -> None:
        self.paused = False
        self.connected_: Deferred[Server] = Deferred()

    def connectionMade(self) -> None:
        IConsumer(self.transport).registerProducer(self, True)
        handle = ISystemHandle(self.transport).getHandle()
        assert isinstance(handle, socket.socket)
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        self.connected_.callback(self)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_real_tcp_in_order_through_a_full_buffer() -> None:
    """Messages sent straight to the socket while the peer reads; once the peer stops,
    the kernel buffer fills, the rest queues in the transport (which pauses its
    producer) and a later write queues behind it even when the kernel has room again;
    when the peer reads every byte arrives once, in order, and the producer is resumed."""
    server = Server()
    factory = Factory.forProtocol(lambda: server)
    # listenTCP is declared for ServerFactory[its default protocol], an invariant generic
    port: Any = reactor.listenTCP(0, cast(ServerFactory, factory), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    peer.setblocking(False)
    try:
        await server.connected_
        transport: Any = server.transport
        writer = DirectWriter(transport)
        assert writer.socket is not None
        shared = bytes(range(256)) * 64  # 16 KiB, "the positions array"
        expected = bytearray()
        for n in range(4):  # the peer has room: nothing is queued in the transport
            parts = (n.to_bytes(4, "big"), shared, b"}")
            writer.write(parts, 16_389)
            expected += b"".join(parts)
            assert not transport._tempDataLen and not transport.dataBuffer
        n = 4
        while not server.paused:  # the peer does not read: kernel full, then the queue
            parts = (n.to_bytes(4, "big"), shared, b"}")
            writer.write(parts, 16_389)
            expected += b"".join(parts)
            n += 1
            assert n < 1000, "the producer was never paused"
        assert transport._tempDataLen or transport.dataBuffer
        received = bytearray()
        peer.settimeout(5)
        while len(received) < 100_000:  # room in the kernel again, the reactor not run yet
            received += peer.recv(1 << 20)
        peer.setblocking(False)
        writer.write((b"last",), 4)  # queued behind what the transport holds, not ahead
        expected += b"last"

        def drain() -> bool:
            while True:
                try:
                    chunk = peer.recv(1 << 20)
                except BlockingIOError:
                    break
                received.extend(chunk)
            return len(received) >= len(expected)

        await eventually(drain)
        assert bytes(received) == bytes(expected)
        await eventually(lambda: not server.paused)
    finally:
        peer.close()
        await port.stopListening()
        if server.transport is not None:
            server.transport.loseConnection()
