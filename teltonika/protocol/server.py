"""The device connection: login, frames in order, ACK only after the sink confirmed.

The exchange (docs/protocol.rst, sections 'The TCP session', 'AVL data frame' and 'Reply
summary')::

    device                                  server
      | -- 000F + 15 ASCII digits (login) --> |  validate, ask the device authority
      | <-------- 01 accept / 00 reject ----- |  (00 is followed by a close)
      | -- AVL frame (codec 8 / 8E / 16) ---> |  decode -> sink.publish(...)
      | <-------- 00 00 00 NN (ACK) --------- |  only when the publish Deferred fired
      | -- codec 12/13/14 message ----------> |  -> message_received(): never ACKed
      | -- FF (keepalive, anywhere) --------> |  nothing

Invariants:

* A frame is ACKed only after the sink's Deferred fired successfully. A failure or a
  timeout means no ACK, an error event, a count, and a closed connection, so the device
  keeps the frame and resends it on its next connection.
* Frames of one connection are handled strictly one after another, in arrival order,
  while the read path keeps cutting frames: :meth:`DeviceProtocol.dataReceived` never
  waits on the sink. When more than ``max_pending_frames`` frames are waiting the
  transport is paused (no more reads), so a fast device cannot grow our memory.
* Every byte to the device goes through :meth:`DeviceProtocol.write_to_device` (the
  command queue hooks in there).
* Invalid input is never ACKed: one warn event (hex truncated), one count by ``reason``,
  and the connection is closed (there is no resynchronisation marker in the stream).
  A data frame before the IMEI packet is refused at its header, before its body is read.
* A closed connection gives up its socket: after ``close_grace`` seconds a peer that does
  not read what is left to send (so the close cannot finish) is aborted.

The Protocol holds only per-connection state; decoding is the codec registry's job,
cutting the stream the pure :class:`~teltonika.wire.framer.Framer`'s, storing the sink's.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Final

import attrs
from prometheus_client import Counter
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from teltonika.commands.metrics import CommandMetrics
from teltonika.commands.queue import (
    DEFAULT_COMMAND_QUIET,
    DEFAULT_COMMAND_SETTLE,
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_MAX_DEPTH,
    DEFAULT_WARN_DEPTH,
    CommandQueue,
)
from teltonika.contract import message_fields
from teltonika.interfaces import ICodec, IDeviceAuthority, ISessionListener, ISink
from teltonika.logs import RateLimitedLog
from teltonika.metrics import ServerMetrics
from teltonika.wire.errors import DecodeError, FramingError, ImeiError
from teltonika.wire.framer import DEFAULT_MAX_FRAME, Framer
from teltonika.wire.login import ACCEPT, REJECT, parse_imei
from teltonika.wire.records import (
    KEEPALIVE,
    AVLPacket,
    DataFrame,
    DeviceMessage,
    Frame,
    ImeiFrame,
    MessagePacket,
)

if TYPE_CHECKING:
    from teltonika.codecs import CodecRegistry

SECONDS: Final = 1.0
MINUTE: Final = 60 * SECONDS

DEFAULT_LOGIN_TIMEOUT: Final = 30 * SECONDS
DEFAULT_IDLE_TIMEOUT: Final = 20 * MINUTE
DEFAULT_SINK_TIMEOUT: Final = 15 * SECONDS
"""Well inside the device's default 30 s response timeout (docs/protocol.rst, section
'Device timers')."""
DEFAULT_MAX_CONNECTIONS: Final = 20_000
DEFAULT_MAX_PENDING_FRAMES: Final = 8
DEFAULT_CLOSE_GRACE: Final = 5 * SECONDS
"""How long a closing connection may take to flush what is left to write (a last ACK, a
``00``) before it is aborted: a peer that stops reading would otherwise keep its socket
and its ``--max-connections`` slot for ever."""
HEX_LOG_BYTES: Final = 64
"""Bytes of a rejected frame shown (as hex) in its log event."""


@attrs.frozen
class ServerSettings:
    """The limits of the TCP server (all from ``twistd teltonika`` options).

    :ivar instance_id: names this server in every record it publishes.
    :ivar max_frame: largest data frame in bytes, framing included.
    :ivar login_timeout: seconds from connect to a successful login.
    :ivar idle_timeout: seconds without any byte (keepalives count) before closing; 0 = off.
    :ivar max_connections: open device connections beyond which new ones are closed at once.
    :ivar luhn: require a valid Luhn check digit in IMEIs.
    :ivar max_pending_frames: frames waiting on one connection before it stops reading.
    :ivar sink_timeout: seconds a sink may take before the frame counts as failed.
    :ivar command_timeout: seconds a command waits for the device's reply by default.
    :ivar command_queue_warn: queued commands on one socket that log a warning.
    :ivar command_queue_max: queued commands on one socket beyond which commands are refused.
    :ivar command_quiet: seconds without a received byte after which an idle connection
        may get a command (otherwise only right after an ACK).
    :ivar command_settle: seconds after a command timed out before the next is written.
    :ivar close_grace: seconds a closing connection may take before it is aborted.
    """

    instance_id: str = "teltonika"
    max_frame: int = DEFAULT_MAX_FRAME
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    luhn: bool = False
    max_pending_frames: int = DEFAULT_MAX_PENDING_FRAMES
    sink_timeout: float = DEFAULT_SINK_TIMEOUT
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    command_queue_warn: int = DEFAULT_WARN_DEPTH
    command_queue_max: int = DEFAULT_MAX_DEPTH
    command_quiet: float = DEFAULT_COMMAND_QUIET
    command_settle: float = DEFAULT_COMMAND_SETTLE
    close_grace: float = DEFAULT_CLOSE_GRACE


def truncated_hex(data: bytes, limit: int = HEX_LOG_BYTES) -> str:
    """*data* as hex, cut to *limit* bytes with a marker saying how much was left out."""
    if len(data) <= limit:
        return data.hex()
    return f"{data[:limit].hex()}...(+{len(data) - limit} bytes)"


class DeviceProtocol(Protocol):
    """One tracker's TCP connection.

    :ivar imei: the logged-in IMEI, or None before the login.
    """

    _log = Logger()

    def __init__(self, factory: DeviceFactory) -> None:
        self.factory = factory
        self.imei: str | None = None
        self._framer = Framer(factory.settings.max_frame, login_first=True)
        self._queue: deque[Frame] = deque()
        self._busy = False
        self._pumping = False
        self._paused = False
        self._draining = False
        self._awaiting_login = False
        self._closing = False
        self._login_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self._idle_waiters: list[Deferred[None]] = []
        self._lost_waiters: list[Deferred[None]] = []
        self._lost = False
        self._acked_in_turn = False
        settings = factory.settings
        self.commands = CommandQueue(
            _SocketWriter(self),
            factory.clock,
            default_timeout=settings.command_timeout,
            warn_depth=settings.command_queue_warn,
            max_depth=settings.command_queue_max,
            metrics=factory.command_metrics,
            quiet=settings.command_quiet,
            settle=settings.command_settle,
            connection_idle=self._idle_for_commands,
        )
        """Every write to the device, and the one outstanding command (docs/design.rst,
        'One write path per socket' and 'One outstanding command per socket')."""

    @property
    def peer(self) -> str:
        """The device's address as log events show it, asked of the transport each time:
        behind a PROXY-protocol endpoint (``haproxy:tcp:...``) the transport knows the
        device's address only once the header is parsed, after ``connectionMade`` (and
        before the first byte reaches us); until then it gives the balancer's."""
        transport = self.transport
        return _describe(transport.getPeer()) if transport is not None else ""

    # -- Twisted callbacks -------------------------------------------------------------

    def connectionMade(self) -> None:
        if not self.factory.connection_opened(self):
            self._closing = True
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        settings = self.factory.settings
        clock = self.factory.clock
        self._login_timer = clock.callLater(settings.login_timeout, self._login_timed_out)
        if settings.idle_timeout > 0:
            self._idle_timer = clock.callLater(settings.idle_timeout, self._idle_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.commands.received()
        self.factory.tcp_bytes_in.inc(len(data))
        timer = self._idle_timer
        if timer is not None and timer.active():
            timer.reset(self.factory.settings.idle_timeout)
        queue = self._queue
        try:
            for frame in self._framer.feed(data):
                if frame is KEEPALIVE:
                    self.factory.metrics.keepalives.inc()
                    continue
                queue.append(frame)
        except FramingError as error:
            self._reject(error.reason, error, data)
            return
        self._pump()
        if (
            not self._paused
            and not self._closing
            and len(queue) >= self.factory.settings.max_pending_frames
        ):
            self._paused = True
            self.factory.metrics.backlog_pauses.inc()
            assert self.transport is not None
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._closing = True
        self._lost = True
        self._queue.clear()
        for timer in (self._login_timer, self._idle_timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._login_timer = self._idle_timer = self._abort_timer = None
        self.commands.close()
        if self.imei is not None:
            self._log.info(
                "Device {imei} logged out ({peer})",
                imei=self.imei,
                peer=self.peer,
                event="logout",
            )
            self.factory.device_logged_out(self)
        self.factory.connection_closed(self)
        self._fire_idle()
        lost, self._lost_waiters = self._lost_waiters, []
        for d in lost:
            if not d.called:
                d.callback(None)

    # -- the one write path ------------------------------------------------------------

    def write_to_device(self, data: bytes) -> None:
        """Send *data* to the device. Everything goes through the connection's
        CommandQueue, so ACKs and command frames keep their order and never interleave."""
        self.commands.write(data)

    def _write_to_socket(self, data: bytes) -> None:
        """The CommandQueue's writer: the only place that writes to the socket."""
        transport = self.transport
        if transport is None or self._lost:
            return
        self.factory.tcp_bytes_out.inc(len(data))
        transport.write(data)

    def close(self) -> None:
        """Close after what was written is flushed; drop frames not yet handled. A peer
        that does not read the rest within ``close_grace`` seconds is aborted."""
        if self._lost:
            return
        self._closing = True
        self._queue.clear()
        if self.transport is not None:
            self.transport.loseConnection()
            if self._abort_timer is None:
                self._abort_timer = self.factory.clock.callLater(
                    self.factory.settings.close_grace, self._close_timed_out
                )

    # -- frame queue -------------------------------------------------------------------

    def _pump(self) -> None:
        """Handle queued frames one at a time; a frame waiting on a Deferred blocks the
        ones behind it (strict order) but never the read path."""
        if self._pumping:
            return
        self._pumping = True
        try:
            queue = self._queue
            while not self._busy and queue and not self._closing:
                self._acked_in_turn = False  # this frame is now the one awaiting an ACK
                d = self._handle(queue.popleft())
                if d is not None:
                    self._busy = True
                    d.addBoth(self._frame_done)
        finally:
            self._pumping = False
        if (
            self._paused
            and not self._closing
            and not self._draining
            and not self._awaiting_login
            and len(self._queue) * 2 < max(self.factory.settings.max_pending_frames, 2)
        ):
            self._paused = False
            assert self.transport is not None
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        if not self._busy and not self._queue:
            self._fire_idle()
            if self._acked_in_turn:
                # The ACK just written is the one moment a command cannot be misread.
                self._acked_in_turn = False
                self.commands.ack_written()

    def _idle_for_commands(self) -> bool:
        """Whether a command frame may follow: logged in, no frame queued or being
        handled, and no partial frame buffered (a device that sent one more frame is
        awaiting that frame's ACK). Never while the connection drains or closes: what
        the device sends is no longer read (its reply would be lost, and a frame it is
        sending would go unnoticed by the quiet interval), and a command the device ran
        but whose reply was never read would be failed (an offline one run again)."""
        return (
            self.imei is not None
            and not self._closing
            and not self._draining
            and not self._busy
            and not self._queue
            and self._framer.buffered == 0
        )

    def _frame_done(self, result: object) -> None:
        self._busy = False
        if isinstance(result, Failure):  # pragma: no cover - handlers catch their errors
            self._log.failure("Unexpected error handling a frame", result)
            self.close()
        self._pump()

    def _handle(self, frame: Frame) -> Deferred[None] | None:
        if isinstance(frame, ImeiFrame):
            return self._handle_login(frame.raw)
        assert isinstance(frame, DataFrame)
        if self.imei is None:
            self.factory.metrics.decode_errors.labels("before_login").inc()
            self._log.warn(
                "Data frame before login from {peer}; closing: {hex}",
                peer=self.peer,
                hex=truncated_hex(frame.raw),
                reason="before_login",
            )
            self.close()
            return None
        try:
            codec, packet = self.factory.codecs.decode_frame(frame.raw)
        except DecodeError as error:
            self._reject(error.reason, error, frame.raw)
            return None
        if isinstance(packet, AVLPacket):
            return self._publish_records(codec, packet)
        assert isinstance(packet, MessagePacket)
        return self._handle_messages(codec, packet)

    # -- login -------------------------------------------------------------------------

    def _handle_login(self, raw: bytes) -> Deferred[None] | None:
        metrics = self.factory.metrics
        try:
            imei = parse_imei(raw, luhn=self.factory.settings.luhn)
        except ImeiError as error:
            metrics.logins.labels("invalid").inc()
            self._log.warn(
                "Invalid IMEI packet from {peer}: {error}",
                peer=self.peer,
                error=str(error),
                reason="invalid_imei",
            )
            self.write_to_device(REJECT)
            self.close()
            return None
        if self.imei is not None:
            if imei == self.imei:
                self.write_to_device(ACCEPT)
                return None
            metrics.decode_errors.labels("imei_changed").inc()
            self._log.warn(
                "Device {imei} sent a different IMEI {other} mid-session; closing",
                imei=self.imei,
                other=imei,
                peer=self.peer,
                reason="imei_changed",
            )
            self.write_to_device(REJECT)
            self.close()
            return None
        d: Deferred[bool] = maybeDeferred(self.factory.authority.is_allowed, imei)
        if not d.called:
            # The framer lets data frames through once the IMEI packet is cut, not once
            # the login is accepted: while the authority decides (a Redis lookup), read no
            # more, so a peer not yet admitted holds at most the rest of this one read.
            # _pump resumes reading once the decision is in.
            self._awaiting_login = True
            if not self._paused:
                self._paused = True
                assert self.transport is not None
                self.transport.pauseProducing()  # type: ignore[attr-defined]
        return d.addBoth(self._login_decided, imei)

    def _login_decided(self, allowed: bool | Failure, imei: str) -> None:
        self._awaiting_login = False
        if self._closing:
            return
        metrics = self.factory.metrics
        if isinstance(allowed, Failure):
            metrics.logins.labels("error").inc()
            # Once per interval at most: a fleet reconnecting while Redis is down fails
            # one lookup per login.
            self.factory.limited_log.emit(
                LogLevel.error,
                "Device authority failed for {imei}; refusing the login: {error} "
                "({suppressed} more left out)",
                imei=imei,
                peer=self.peer,
                error=allowed.getErrorMessage(),
            )
            allowed = False
        if not allowed:
            metrics.logins.labels("rejected").inc()
            self._log.info(
                "Device {imei} refused by the device authority ({peer})",
                imei=imei,
                peer=self.peer,
                event="login_rejected",
            )
            self.write_to_device(REJECT)
            self.close()
            return
        self.imei = imei
        self.commands.imei = imei
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None
        metrics.logins.labels("accepted").inc()
        self.write_to_device(ACCEPT)
        self._log.info(
            "Device {imei} logged in from {peer}", imei=imei, peer=self.peer, event="login"
        )
        self.factory.device_logged_in(self)

    # -- records -----------------------------------------------------------------------

    def _publish_records(self, codec: ICodec, packet: AVLPacket) -> Deferred[None]:
        factory = self.factory
        clock = factory.clock
        count = len(packet.records)
        frames, records = factory.codec_counters(codec.name)
        frames.inc()
        records.inc(count)
        started = clock.seconds()
        self.commands.frame_received(started)
        assert self.imei is not None
        d: Deferred[None] = maybeDeferred(
            factory.sink.publish, self.imei, codec.name, packet.records, int(started * 1000)
        )
        d.addTimeout(factory.settings.sink_timeout, clock)
        ack = codec.acknowledgement(packet)
        return d.addCallbacks(
            self._stored,
            self._store_failed,
            callbackArgs=(ack, count, started),
            errbackArgs=(count,),
        )

    def _stored(self, _: object, ack: bytes | None, count: int, started: float) -> None:
        factory = self.factory
        factory.sink_latency.observe(factory.clock.seconds() - started)
        if ack is None or self._lost:
            return
        self.write_to_device(ack)
        self._acked_in_turn = True
        factory.tcp_acks.inc()
        factory.metrics.acked_records.inc(count)

    def _store_failed(self, failure: Failure, count: int) -> None:
        sink = self.factory.sink
        self.factory.metrics.sink_failures.labels(sink.name).inc()
        self._log.error(
            "Sink {sink} did not store {count} records from {imei}; no ACK, closing: {error}",
            sink=sink.name,
            count=count,
            imei=self.imei,
            error=failure.getErrorMessage(),
        )
        self.close()

    # -- device messages ---------------------------------------------------------------

    def _handle_messages(self, codec: ICodec, packet: MessagePacket) -> Deferred[None]:
        assert self.imei is not None
        imei = self.imei
        ds = [
            d
            for d in (self.message_received(imei, codec, m) for m in packet.messages)
            if d is not None
        ]
        if not ds:
            return succeed(None)
        return DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)

    def message_received(
        self, imei: str, codec: ICodec, message: DeviceMessage
    ) -> Deferred[None] | None:
        """A codec 12/13/14 message from the device: never ACKed.

        A reply to this socket's outstanding command (same codec, type 0x06, or 0x11 for
        codec 14) resolves it and is published by the command consumer on
        ``commands:responses``; every other message is unsolicited and goes to the
        device messages stream (``teltonika.contract.MESSAGES_STREAM``). A failure is
        logged and counted; the connection stays open (the device would not resend a
        message anyway).
        """
        factory = self.factory
        factory.metrics.messages.labels(codec.name).inc()
        if self.commands.reply_received(message):
            return None  # the outstanding command's reply: its caller publishes it
        received_at_ms = int(factory.clock.seconds() * 1000)
        fields = message_fields(
            imei, message, codec.name, received_at_ms, factory.settings.instance_id
        )
        d: Deferred[None] = maybeDeferred(factory.sink.publish_message, imei, fields)
        d.addTimeout(factory.settings.sink_timeout, factory.clock)

        def failed(failure: Failure) -> None:
            factory.metrics.sink_failures.labels(factory.sink.name).inc()
            self._log.error(
                "Sink {sink} did not store a codec {codec} message from {imei}: {error}",
                sink=factory.sink.name,
                codec=codec.name,
                imei=imei,
                error=failure.getErrorMessage(),
            )

        return d.addErrback(failed)

    # -- rejections and timers ---------------------------------------------------------

    def _reject(self, reason: str, error: DecodeError, data: bytes) -> None:
        self.factory.metrics.decode_errors.labels(reason).inc()
        self._log.warn(
            "Rejected frame from {imei} ({peer}), reason {reason}: {error}; closing. Bytes: {hex}",
            imei=self.imei,
            peer=self.peer,
            reason=reason,
            error=str(error),
            hex=truncated_hex(data),
            event="rejected_frame",
        )
        self.close()

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self.imei is None and not self._closing:
            self.factory.metrics.timeouts.labels("login").inc()
            self._log.info("No login from {peer} in time; closing", peer=self.peer)
            self.close()

    def _close_timed_out(self) -> None:
        self._abort_timer = None
        if self._lost or self.transport is None:
            return
        self.factory.metrics.timeouts.labels("close").inc()
        self._log.info(
            "Connection from {imei} ({peer}) did not close in time (peer not reading); aborting",
            imei=self.imei,
            peer=self.peer,
        )
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        if not self._closing:
            self.factory.metrics.timeouts.labels("idle").inc()
            self._log.info(
                "Connection from {imei} ({peer}) idle; closing", imei=self.imei, peer=self.peer
            )
            self.close()

    # -- shutdown support --------------------------------------------------------------

    def stop_reading(self) -> None:
        """Read no more frames (shutdown); those already queued are still handled."""
        self._draining = True
        if not self._paused and not self._lost and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def when_idle(self) -> Deferred[None]:
        """Fire when no frame is queued or being handled."""
        if self._lost or (not self._busy and not self._queue):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def when_lost(self) -> Deferred[None]:
        """Fire when the connection is closed."""
        if self._lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def _fire_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            if not d.called:  # a bounded wait may have cancelled it
                d.callback(None)


class _SocketWriter:
    """Adapts :meth:`DeviceProtocol._write_to_socket` to the CommandQueue's writer."""

    def __init__(self, protocol: DeviceProtocol) -> None:
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        self._protocol._write_to_socket(data)


def _describe(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if ":" in host:  # IPv6: brackets keep the port apart
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class DeviceFactory(Factory):
    """Builds :class:`DeviceProtocol` instances and knows every live connection.

    :ivar sessions: IMEI -> the logged-in protocol on this instance. A second login of
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
        self.connections: set[DeviceProtocol] = set()
        self.sessions: dict[str, DeviceProtocol] = {}
        self.session_listeners: list[ISessionListener] = []
        self.command_metrics = CommandMetrics.create(metrics.registry)
        self.limited_log = RateLimitedLog(DeviceProtocol._log, clock)
        """For events every connection can repeat at once (a failing device lookup)."""
        self.accepting = True
        # The labelled children of the metrics every frame touches, looked up once:
        # ``labels()`` takes a lock and hashes its arguments on each call, which cost
        # about 5 % of a frame's CPU (profile in README.rst, "Benchmarks").
        self.tcp_bytes_in = metrics.bytes_in.labels("tcp")
        self.tcp_bytes_out = metrics.bytes_out.labels("tcp")
        self.tcp_acks = metrics.acks.labels("tcp")
        self.sink_latency = metrics.sink_latency.labels(sink.name)
        self._codec_counters: dict[str, tuple[Counter, Counter]] = {}

    def codec_counters(self, codec_name: str) -> tuple[Counter, Counter]:
        """The frames and records counters of *codec_name* (labelled children, cached)."""
        counters = self._codec_counters.get(codec_name)
        if counters is None:
            metrics = self.metrics
            counters = (metrics.frames.labels(codec_name), metrics.records.labels(codec_name))
            self._codec_counters[codec_name] = counters
        return counters

    def buildProtocol(self, addr: IAddress | None) -> DeviceProtocol:
        return DeviceProtocol(self)

    # -- bookkeeping called by the protocol --------------------------------------------

    def connection_opened(self, protocol: DeviceProtocol) -> bool:
        """Admit *protocol*, or return False when it must be closed at once."""
        if not self.accepting:
            self.metrics.connections_refused.labels("shutdown").inc()
            return False
        limit = self.settings.max_connections
        if limit and len(self.connections) >= limit:
            self.metrics.connections_refused.labels("max_connections").inc()
            self._log.warn(
                "Refused connection from {peer}: {limit} connections are open",
                peer=protocol.peer,
                limit=limit,
                reason="max_connections",
            )
            return False
        self.connections.add(protocol)
        self.metrics.connections.inc()
        self.metrics.connections_open.inc()
        return True

    def connection_closed(self, protocol: DeviceProtocol) -> None:
        if protocol in self.connections:
            self.connections.discard(protocol)
            self.metrics.connections_open.dec()

    def device_logged_in(self, protocol: DeviceProtocol) -> None:
        imei = protocol.imei
        assert imei is not None
        older = self.sessions.get(imei)
        self.sessions[imei] = protocol
        if older is not None and older is not protocol:
            self.metrics.logins.labels("replaced").inc()
            self._log.info(
                "Device {imei} logged in again from {peer}; closing the older connection "
                "from {older}",
                imei=imei,
                peer=protocol.peer,
                older=older.peer,
            )
            self._notify("device_logged_out", imei, older)
            older.close()
        self._notify("device_logged_in", imei, protocol)

    def device_logged_out(self, protocol: DeviceProtocol) -> None:
        imei = protocol.imei
        if imei is not None and self.sessions.get(imei) is protocol:
            del self.sessions[imei]
            self._notify("device_logged_out", imei, protocol)

    def _notify(self, method: str, imei: str, protocol: DeviceProtocol) -> None:
        for listener in list(self.session_listeners):
            try:
                getattr(listener, method)(imei, protocol)
            except Exception:
                self._log.failure("Session listener {listener} failed", listener=listener)

    # -- shutdown ----------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Close any connection that arrives from now on."""
        self.accepting = False

    def drain(self, timeout: float) -> Deferred[None]:
        """Stop reading on every connection and wait (at most *timeout* s) until the
        frames already received are handled and ACKed."""
        for protocol in list(self.connections):
            protocol.stop_reading()
        return _bounded([p.when_idle() for p in list(self.connections)], timeout, self.clock)

    def close_all(self, timeout: float) -> Deferred[None]:
        """Close every connection (flushing written ACKs); abort what is still open after
        *timeout* seconds."""
        protocols = list(self.connections)
        waits = [p.when_lost() for p in protocols]
        for protocol in protocols:
            protocol.close()

        def abort(_: object) -> None:
            for protocol in protocols:
                if not protocol._lost and protocol.transport is not None:
                    protocol.transport.abortConnection()  # type: ignore[attr-defined]

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
