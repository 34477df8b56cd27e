"""A tiny in-test Teltonika server: just enough protocol to drive the simulator.

It is deliberately naive (no sink, no limits) and configurable to misbehave, so tests can
prove the simulator notices each broken promise.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Factory, Protocol

from teltonika.codecs import load_codecs
from teltonika.wire import (
    ACCEPT,
    REJECT,
    AVLPacket,
    DataFrame,
    DecodeError,
    Framer,
    FramingError,
    ImeiFrame,
    MessagePacket,
    parse_imei,
    tcp_ack,
)

CODECS = load_codecs()


class FakeServerProtocol(Protocol):
    """Login, ACK every valid AVL frame with its count, ``00000000`` for a bad CRC.

    :ivar ack_count: override the count written in ACKs (a function of the true count).
    :ivar accept_login: reply ``01`` (True) or ``00``.
    :ivar silent: never ACK (to provoke ACK timeouts).
    """

    def __init__(self, factory: FakeServerFactory) -> None:
        self.factory = factory
        self.framer = Framer()
        self.imei: str | None = None

    def _transport(self) -> ITransport:
        assert self.transport is not None  # connected: only called from dataReceived
        return self.transport

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            for frame in self.framer.feed(data):
                self.handle(frame)
        except FramingError:
            self._transport().loseConnection()

    def handle(self, frame: object) -> None:
        factory = self.factory
        if isinstance(frame, ImeiFrame):
            self.imei = parse_imei(frame.raw)
            factory.logins.append(self.imei)
            self._transport().write(ACCEPT if factory.accept_login else REJECT)
            return
        if not isinstance(frame, DataFrame):
            factory.keepalives += 1
            return
        try:
            _codec, packet = CODECS.decode_frame(frame.raw)
        except DecodeError:
            factory.bad_frames += 1
            if factory.close_on_bad:
                self._transport().loseConnection()
            else:
                self._transport().write(tcp_ack(0))
            return
        if isinstance(packet, MessagePacket):
            factory.replies.extend(packet.messages)
            return
        assert isinstance(packet, AVLPacket)
        factory.frames.append((self.imei, packet))
        if factory.silent:
            return
        self._transport().write(tcp_ack(factory.ack_count(len(packet.records))))


class FakeServerFactory(Factory):
    noisy = False

    def __init__(self) -> None:
        self.connections: list[FakeServerProtocol] = []
        self.logins: list[str] = []
        self.frames: list[tuple[str | None, AVLPacket]] = []
        self.replies: list[object] = []
        self.keepalives = 0
        self.bad_frames = 0
        self.accept_login = True
        self.silent = False
        self.close_on_bad = False
        self.ack_count: Callable[[int], int] = lambda n: n

    def buildProtocol(self, addr: object) -> FakeServerProtocol:
        return FakeServerProtocol(self)
