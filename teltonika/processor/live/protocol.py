"""The autobahn adapter: one :class:`LiveServerProtocol` per WebSocket connection.

It only translates. ``onConnect`` runs the handshake checks in the order README.rst
gives (origin, subprotocol, capacity, authentication); ``onOpen`` either starts a
:class:`~teltonika.processor.live.session.LiveSession` or sends the refusal as an
``error`` plus a close code (a browser never sees the HTTP status of a refused upgrade,
only 1006, so refusals after the origin check are made on an open socket). Messages go
to the session; the session's messages come back through :meth:`send`.

Backpressure: the protocol registers itself as the transport's streaming producer. While
the transport is paused, :meth:`send` queues the few replies to the client's own requests
(bounded) and the subscriptions conflate positions; after ``slow_timeout`` seconds paused
the connection is aborted, logged and counted.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from teltonika.processor.live import messages as m
from teltonika.processor.live.handshake import Origin, credential_from_headers, origin_allowed
from teltonika.processor.live.hub import Hub
from teltonika.processor.live.interfaces import (
    IAuthenticator,
    IEventDirectory,
    Unauthenticated,
    UpstreamUnavailable,
    User,
)
from teltonika.processor.live.loader import LatestLoader
from teltonika.processor.live.metrics import LiveMetrics
from teltonika.processor.live.session import Greeting, Limits, LiveSession, SessionParts
from teltonika.processor.live.socketwrite import DirectWriter
from teltonika.units import SECONDS

MAX_QUEUED_BYTES: Final = 4 * 1024 * 1024
"""Replies held for a client that does not read; beyond this it is evicted at once."""
SEND_BUFFER_BYTES: Final = 256 * 1024
"""The kernel send buffer of a live socket. Linux grows it to several MiB by itself; a
bounded one caps the kernel memory a slow client holds and lets backpressure (conflation,
then eviction) start after a quarter MiB rather than after megabytes."""
CLIENT_TIMEOUT_TICKS: Final = 2.4
"""hello's heartbeat.timeout in ticks (60 s for the 25 s tick): a client that heard
nothing for that long reconnects."""


@attrs.frozen
class LiveConfig:
    """The ``--live-*`` settings the connections need."""

    allowed_origins: frozenset[Origin] = frozenset()
    cookie_name: str = "directus_session_token"
    max_connections: int = 10_000
    max_per_user: int = 20
    limits: Limits = attrs.field(factory=Limits)
    slow_timeout: float = 30 * SECONDS
    reauth: float = 600 * SECONDS
    tick: float = 25 * SECONDS
    ping_interval: float = 25 * SECONDS
    ping_timeout: float = 20 * SECONDS
    handshake_timeout: float = 5 * SECONDS
    instance: str = "processor"
    server: str = "teltonika"


@implementer(IPushProducer)
class LiveServerProtocol(WebSocketServerProtocol):
    """See the module docstring."""

    factory: LiveFactory
    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.session: LiveSession | None = None
        self.refusal: tuple[str, int, str, str] | None = None
        """(error code, close code, metric result, message) to send once open."""
        self.user: User | None = None
        self.counted = False
        self.paused = False
        self.queued: list[tuple[bytes, str]] = []
        self.queued_bytes = 0
        self.last_sent = 0.0
        self.writer: DirectWriter | None = None
        self._evict_call: IDelayedCall | None = None

    # -- handshake ---------------------------------------------------------------------
    def onConnect(self, request: ConnectionRequest) -> Any:
        factory = self.factory
        config = factory.config
        headers = request.headers
        if not origin_allowed(headers.get("origin"), headers.get("host"), config.allowed_origins):
            factory.metrics.auth.labels(result="origin_refused").inc()
            self._log.warn(
                "Live handshake refused: origin {origin} not allowed", origin=headers.get("origin")
            )
            raise ConnectionDeny(403, "origin not allowed")
        offered = request.protocols or []
        if offered and m.SUBPROTOCOL not in offered:
            factory.metrics.auth.labels(result="subprotocol_refused").inc()
            raise ConnectionDeny(400, f"only {m.SUBPROTOCOL} is spoken here")
        chosen = m.SUBPROTOCOL if offered else None
        if factory.connection_count >= config.max_connections:
            self.refusal = (
                m.TOO_MANY_CONNECTIONS,
                m.CLOSE_TOO_MANY,
                "too_many_connections",
                "too many connections",
            )
            return chosen
        factory.connection_count += 1
        self.counted = True
        credential = credential_from_headers(headers, config.cookie_name)
        factory.metrics.authenticating.inc()
        d: Deferred[Any] = factory.authenticator.authenticate(credential)
        d.addCallbacks(self._authenticated, self._not_authenticated)

        def answered(result: object) -> str | None:
            factory.metrics.authenticating.dec()
            return chosen

        d.addBoth(answered)
        return d

    def _authenticated(self, user: User) -> None:
        factory = self.factory
        if factory.authenticator.applies_user_limit():
            if factory.per_user.get(user.id, 0) >= factory.config.max_per_user:
                self.refusal = (
                    m.TOO_MANY_CONNECTIONS,
                    m.CLOSE_TOO_MANY,
                    "too_many_for_user",
                    "too many connections for this user",
                )
                return
            factory.per_user[user.id] = factory.per_user.get(user.id, 0) + 1
        self.user = user

    def _not_authenticated(self, failure: Failure) -> None:
        if failure.check(Unauthenticated):
            self.refusal = (
                m.UNAUTHENTICATED,
                m.CLOSE_UNAUTHENTICATED,
                "unauthenticated",
                "not signed in",
            )
        elif failure.check(UpstreamUnavailable):
            self.refusal = (
                m.UPSTREAM_UNAVAILABLE,
                m.CLOSE_GOING_AWAY,
                "upstream_unavailable",
                "the authentication service did not answer",
            )
        else:
            self._log.failure("Live authentication failed unexpectedly", failure=failure)
            self.refusal = (m.INTERNAL, m.CLOSE_INTERNAL, "upstream_unavailable", "internal error")

    def onOpen(self) -> None:
        factory = self.factory
        if self.refusal is not None or self.user is None:
            code, close, result, message = self.refusal or (
                m.INTERNAL,
                m.CLOSE_INTERNAL,
                "upstream_unavailable",
                "internal error",
            )
            factory.metrics.auth.labels(result=result).inc()
            self._log.info("Live connection refused: {code}", code=code)
            self.send(m.encode_error(code, message), "error")
            self.sendClose(close, message)
            return
        factory.metrics.auth.labels(result="ok").inc()
        factory.metrics.connections.inc()
        transport: Any = self.transport
        with contextlib.suppress(AttributeError, OSError):
            transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        transport.unregisterProducer()  # twisted.web's channel, which handed us the socket
        transport.registerProducer(self, True)
        self.writer = DirectWriter(transport)
        self.session = factory.new_session(self, self.user)
        factory.open.add(self)
        self.session.open()

    # -- traffic -----------------------------------------------------------------------
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is not None:
            self.session.received(payload, isBinary)

    def send(self, data: bytes | Sequence[bytes], kind: str) -> None:
        """Outlet API: send one message (bytes, or parts to concatenate) now, or queue it
        while the client does not read."""
        if self.paused:
            joined = data if isinstance(data, bytes) else b"".join(data)
            self.queued.append((joined, kind))
            self.queued_bytes += len(joined)
            if self.queued_bytes > MAX_QUEUED_BYTES:
                self._evict("too much queued")
            return
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        parts = (data,) if isinstance(data, bytes) else tuple(data)
        size = sum(len(part) for part in parts)
        # The frame is written here rather than by autobahn's sendMessage, which would
        # copy the payload twice per client (join, then frame) and apply the inbound
        # message limit to outbound messages too. A server frame is unmasked and we use
        # no extension, so a frame is its header followed by the parts: the positions
        # array encoded once per event goes to every subscriber without a copy, with one
        # sendmsg while nothing is queued (:mod:`~teltonika.processor.live.socketwrite`).
        header = text_frame_header(size)
        if self.writer is not None:
            self.writer.write((header, *parts), len(header) + size)
        else:
            transport: Any = self.transport
            transport.writeSequence((header, *parts))
        self.factory.count_sent(kind, size)
        self.last_sent = self.factory.clock.seconds()

    def close(self, code: int, reason: str) -> None:
        """Connection API"""
        self.sendClose(code, reason)

    # -- IPushProducer -----------------------------------------------------------------
    def pauseProducing(self) -> None:
        if self.paused:
            return
        self.paused = True
        self._evict_call = self.factory.clock.callLater(
            self.factory.config.slow_timeout, self._evict, "not reading"
        )

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self._evict_call is not None and self._evict_call.active():
            self._evict_call.cancel()
        self._evict_call = None
        queued, self.queued, self.queued_bytes = self.queued, [], 0
        for data, kind in queued:
            self.send(data, kind)
        if self.session is not None and not self.paused:
            self.session.resumed()

    def stopProducing(self) -> None:
        pass

    def _evict(self, why: str) -> None:
        self._evict_call = None
        self._log.warn(
            "Live client evicted ({why}): paused for {seconds}s",
            why=why,
            seconds=self.factory.config.slow_timeout,
            peer=str(self.peer),
        )
        self.factory.metrics.evictions.inc()
        self.factory.metrics.closes.labels(reason="slow_client").inc()
        self.queued, self.queued_bytes = [], 0
        if self.session is not None:
            self.session.close()
        transport: Any = self.transport
        transport.abortConnection()

    # -- end ---------------------------------------------------------------------------
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        factory = self.factory
        violation = _VIOLATIONS.get(getattr(self, "localCloseCode", None) or 0)
        if violation is not None and self.session is not None:
            # autobahn closed it for a frame-level violation (it logged the detail)
            self._log.warn(
                "Live client closed for {violation}", violation=violation, peer=str(self.peer)
            )
            factory.metrics.closes.labels(reason=violation).inc()
        if self._evict_call is not None and self._evict_call.active():
            self._evict_call.cancel()
        if self.session is not None:
            self.session.close()
            factory.open.discard(self)
            factory.metrics.connections.dec()
            self.session = None
        if self.counted:
            self.counted = False
            factory.connection_count -= 1
        if self.user is not None and factory.authenticator.applies_user_limit():
            left = factory.per_user.get(self.user.id, 1) - 1
            if left > 0:
                factory.per_user[self.user.id] = left
            else:
                factory.per_user.pop(self.user.id, None)
        self.user = None


class LiveFactory(WebSocketServerFactory):
    """Shared state of every connection: configuration, hub, authorities, counters."""

    protocol = LiveServerProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        config: LiveConfig,
        *,
        hub: Hub,
        authenticator: IAuthenticator,
        directory: IEventDirectory,
        loader: LatestLoader,
        clock: IReactorTime,
        now_ms: Callable[[], int],
        metrics: LiveMetrics,
    ) -> None:
        super().__init__(server=config.server)  # type: ignore[no-untyped-call]
        self.config = config
        self.hub = hub
        self.authenticator = authenticator
        self.directory = directory
        self.loader = loader
        self.clock = clock
        self.now_ms = now_ms
        self.metrics = metrics
        self.session_parts = SessionParts(
            hub, authenticator, directory, loader, clock, now_ms, metrics
        )
        self.connection_count = 0
        self.per_user: dict[str, int] = {}
        self.open: set[LiveServerProtocol] = set()
        self._sent = {kind: metrics.messages.labels(type=kind) for kind in _KINDS}
        # Limits set explicitly rather than trusting autobahn's defaults (which allow
        # unbounded messages). Origins: autobahn's own check is told to let everything
        # through ("*") because "the page's own origin" depends on the request's Host
        # header; onConnect decides (teltonika.processor.live.handshake). autobahn still
        # refuses a "null" origin and a malformed or repeated Origin header by itself.
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            maxFramePayloadSize=config.limits.message_bytes,
            maxMessagePayloadSize=config.limits.message_bytes,
            autoPingInterval=config.ping_interval,
            autoPingTimeout=config.ping_timeout,
            openHandshakeTimeout=config.handshake_timeout,
            closeHandshakeTimeout=5 * SECONDS,
            allowedOrigins=["*"],
            allowNullOrigin=False,
            failByDrop=False,  # a protocol violation gets its close code (1009, 1002)
            trustXForwardedFor=0,
            perMessageCompressionAccept=lambda offers: None,
        )

    def new_session(self, connection: LiveServerProtocol, user: User) -> LiveSession:
        config = self.config
        return LiveSession(
            connection,
            user,
            parts=self.session_parts,
            limits=config.limits,
            greeting=Greeting(
                config.server,
                config.instance,
                config.tick,
                round(config.tick * CLIENT_TIMEOUT_TICKS, 3),
            ),
            reauth=config.reauth,
        )

    def count_sent(self, kind: str, size: int) -> None:
        counter = self._sent.get(kind)
        if counter is None:
            counter = self._sent[kind] = self.metrics.messages.labels(type=kind)
        counter.inc()
        self.metrics.bytes.inc(size)

    def send_ticks(self) -> None:
        """``tick`` to every connection that sent nothing for ``tick`` seconds."""
        now = self.clock.seconds()
        cutoff = now - self.config.tick
        payload = m.encode_tick(self.now_ms())
        for connection in list(self.open):
            if connection.last_sent <= cutoff:
                connection.send(payload, "tick")


def text_frame_header(length: int) -> bytes:
    """The header of one unmasked, final text frame of *length* payload bytes (RFC 6455,
    section 5.2)."""
    if length < 126:
        return bytes((0x81, length))
    if length < 1 << 16:
        return bytes((0x81, 126)) + length.to_bytes(2, "big")
    return bytes((0x81, 127)) + length.to_bytes(8, "big")


_VIOLATIONS: Final = {1009: "oversize", 1002: "protocol_error", 1007: "invalid_utf8"}
"""Close codes autobahn sends when a client breaks the framing rules."""

_KINDS: Final = (
    "hello",
    "snapshot",
    "positions",
    "devices",
    "seen",
    "complete",
    "unsubscribed",
    "pong",
    "tick",
    "error",
)
