"""The TCP listener: the device Protocol and its Factory.

:class:`DeviceProtocol` is an adapter, as the transit relay's ``TransitConnection`` is:
Twisted's callbacks become calls on the connection's
:class:`~teltonika.protocol.session.DeviceSession`, which holds every decision (login,
frame order, publish then ACK, flow control, timers, close), and the session reaches the
socket only through :class:`~teltonika.interfaces.IDeviceSocket`. The Protocol owns the
transport and the receive buffer (the pure :class:`~teltonika.wire.framer.Framer`).

:class:`DeviceFactory` holds what every session shares (settings, clock, metrics, codec
registry, sink, device authority) and knows every live session: it admits connections,
keeps the IMEI -> session map (a second login of an IMEI wins), tells the session
listeners about logins and logouts, and drains and closes all sessions at shutdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IAddress, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from teltonika.interfaces import IDeviceAuthority, IDeviceSocket, ISessionListener, ISink
from teltonika.logs import RateLimitedLog
from teltonika.metrics import ServerMetrics
from teltonika.protocol.publish import Publisher
from teltonika.protocol.session import DeviceSession
from teltonika.protocol.settings import ServerSettings
from teltonika.wire.framer import Framer

if TYPE_CHECKING:
    from teltonika.codecs import CodecRegistry


class IDeviceTransport(ITCPTransport, IPushProducer):
    """What :class:`DeviceProtocol` needs of its transport: a TCP connection (which can
    be aborted) that is also a push producer (which can be paused), as each of Twisted's
    TCP transports is."""


class DeviceProtocol(Protocol):
    """One tracker's TCP connection, handed to its :class:`DeviceSession`.

    :ivar session: the connection's session (from ``connectionMade`` on).
    """

    transport: IDeviceTransport | None
    session: DeviceSession

    def __init__(self, factory: DeviceFactory) -> None:
        self.factory = factory
        self._framer = Framer(factory.settings.max_frame, login_first=True)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.session = DeviceSession(TransportSocket(self.transport), self.factory, self._buffered)
        self.session.connection_made()

    def dataReceived(self, data: bytes) -> None:
        self.session.data_received(data, self._framer.feed(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.session.connection_lost()

    def _buffered(self) -> int:
        return self._framer.buffered


class SocketTransport(TypingProtocol):
    """What :class:`TransportSocket` calls on its transport (an :class:`IDeviceTransport`
    in production; ``StringTransport``, which has the same methods, in tests)."""

    def write(self, data: bytes) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...


@implementer(IDeviceSocket)
class TransportSocket:
    """:class:`~teltonika.interfaces.IDeviceSocket` over a Twisted TCP transport."""

    def __init__(self, transport: SocketTransport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        """IDeviceSocket API"""
        self._transport.write(data)

    def pause(self) -> None:
        """IDeviceSocket API"""
        self._transport.pauseProducing()

    def resume(self) -> None:
        """IDeviceSocket API"""
        self._transport.resumeProducing()

    def close(self) -> None:
        """IDeviceSocket API"""
        self._transport.loseConnection()

    def abort(self) -> None:
        """IDeviceSocket API"""
        self._transport.abortConnection()

    def peer(self) -> str:
        """IDeviceSocket API"""
        return _describe(self._transport.getPeer())


def _describe(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if ":" in host:  # IPv6: brackets keep the port apart
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class DeviceFactory(Factory):
    """Builds :class:`DeviceProtocol` instances; holds what their sessions share and
    knows every live session.

    :ivar connections: every admitted session whose connection is open.
    :ivar sessions: IMEI -> the logged-in session on this instance. A second login of
        the same IMEI wins; the older connection is closed.
    :ivar session_listeners: :class:`~teltonika.interfaces.ISessionListener` providers
        told about every login and logout.
    """

    protocol = DeviceProtocol
    noisy = False
    _log = Logger()

    def __init__(
        self,
        codecs: CodecRegistry,
        sink: ISink,
        authority: IDeviceAuthority,
        metrics: ServerMetrics,
        clock: IReactorTime,
        settings: ServerSettings | None = None,
    ) -> None:
        self.codecs = codecs
        self.sink = sink
        self.authority = authority
        self.metrics = metrics
        self.clock = clock
        self.settings = settings if settings is not None else ServerSettings()
        self.command_queue_settings = self.settings.command_queue()
        self.connections: set[DeviceSession] = set()
        self.sessions: dict[str, DeviceSession] = {}
        self.session_listeners: list[ISessionListener] = []
        self.publisher = Publisher(sink, metrics, clock, self.settings.sink_timeout, "tcp")
        """Publish, then ACK, for every connection."""
        self.bytes_in = metrics.bytes_in.labels("tcp")
        self.bytes_out = metrics.bytes_out.labels("tcp")
        """The byte counters every read and write touches, looked up once (``labels()``
        takes a lock and hashes its arguments on each call)."""
        self.limited_log = RateLimitedLog(DeviceSession._log, clock)
        """For events every connection can repeat at once (a failing device lookup)."""
        self.accepting = True

    def buildProtocol(self, addr: IAddress | None) -> DeviceProtocol:
        return DeviceProtocol(self)

    # -- bookkeeping called by the sessions --------------------------------------------

    def connection_opened(self, session: DeviceSession) -> bool:
        """Admit *session*, or return False when it must be closed at once."""
        if not self.accepting:
            self.metrics.connections_refused.labels("shutdown").inc()
            return False
        limit = self.settings.max_connections
        if limit and len(self.connections) >= limit:
            self.metrics.connections_refused.labels("max_connections").inc()
            self._log.warn(
                "Refused connection from {peer}: {limit} connections are open",
                peer=session.peer,
                limit=limit,
                reason="max_connections",
            )
            return False
        self.connections.add(session)
        self.metrics.connections.inc()
        self.metrics.connections_open.inc()
        return True

    def connection_closed(self, session: DeviceSession) -> None:
        if session in self.connections:
            self.connections.discard(session)
            self.metrics.connections_open.dec()

    def device_logged_in(self, session: DeviceSession) -> None:
        imei = session.imei
        assert imei is not None
        older = self.sessions.get(imei)
        self.sessions[imei] = session
        if older is not None and older is not session:
            self.metrics.logins.labels("replaced").inc()
            self._log.info(
                "Device {imei} logged in again from {peer}; closing the older connection "
                "from {older}",
                imei=imei,
                peer=session.peer,
                older=older.peer,
            )
            self._notify("device_logged_out", imei, older)
            older.close()
        self._notify("device_logged_in", imei, session)

    def device_logged_out(self, session: DeviceSession) -> None:
        imei = session.imei
        if imei is not None and self.sessions.get(imei) is session:
            del self.sessions[imei]
            self._notify("device_logged_out", imei, session)

    def _notify(self, method: str, imei: str, session: DeviceSession) -> None:
        for listener in list(self.session_listeners):
            try:
                getattr(listener, method)(imei, session)
            except Exception:
                self._log.failure("Session listener {listener} failed", listener=listener)

    # -- shutdown ----------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Close any connection that arrives from now on."""
        self.accepting = False

    def drain(self, timeout: float) -> Deferred[None]:
        """Stop reading on every connection and wait (at most *timeout* s) until the
        frames already received are handled and ACKed."""
        for session in list(self.connections):
            session.stop_reading()
        return _bounded([s.when_idle() for s in list(self.connections)], timeout, self.clock)

    def close_all(self, timeout: float) -> Deferred[None]:
        """Close every connection (flushing written ACKs); abort what is still open after
        *timeout* seconds."""
        sessions = list(self.connections)
        waits = [s.when_lost() for s in sessions]
        for session in sessions:
            session.close()

        def abort(_: object) -> None:
            for session in sessions:
                session.abort()

        return _bounded(waits, timeout, self.clock).addCallback(abort)


def _bounded(ds: list[Deferred[None]], timeout: float, clock: IReactorTime) -> Deferred[None]:
    """Fire when all *ds* fired or *timeout* passed, whichever is first; never fails."""
    if not ds:
        return succeed(None)
    done: Deferred[None] = Deferred()
    gathered: Deferred[Any] = DeferredList(ds, consumeErrors=True)
    gathered.addTimeout(timeout, clock)
    gathered.addBoth(lambda _: done.callback(None))
    return done
