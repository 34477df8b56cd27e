"""One tracker's TCP session: login, frames in order, ACK only after the sink confirmed.

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

* A frame is ACKed only after the sink's Deferred fired successfully (the
  :class:`~teltonika.protocol.publish.Publisher`, shared with UDP). A failure or a timeout
  means no ACK, an error event, a count, and a closed connection, so the device keeps the
  frame and resends it on its next connection.
* Frames of one connection are handled strictly one after another, in arrival order,
  while the read path keeps cutting frames: :meth:`DeviceSession.data_received` never
  waits on the sink. When more than ``max_pending_frames`` frames are waiting, reading is
  paused, so a fast device cannot grow our memory.
* Every byte to the device goes through :meth:`DeviceSession.write_to_device`, that is
  through the connection's :class:`~teltonika.protocol.queue.CommandQueue`, so ACKs and
  command frames keep their order and a command is written only where the device cannot
  take it for an ACK.
* Invalid input is never ACKed: one warn event (hex truncated), one count by ``reason``,
  and the connection is closed (there is no resynchronisation marker in the stream).
  A data frame before the IMEI packet is refused at its header, before its body is read.
* A closed connection gives up its socket: after ``close_grace`` seconds a peer that does
  not read what is left to send (so the close cannot finish) is aborted.

The session is a plain object (the transit relay's ``TransitServerState`` shape): the
:class:`~teltonika.protocol.tcp.DeviceProtocol` turns Twisted's callbacks into calls
on it, and it answers through :class:`~teltonika.interfaces.IDeviceSocket`. Its
lifecycle is one :class:`SessionState`, changed only by :meth:`DeviceSession._enter`
against :data:`TRANSITIONS`; whether reading is paused and whether a frame is being
handled are flow control, kept apart from the lifecycle.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Final

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from teltonika.contract import message_fields
from teltonika.interfaces import ICodec, IDeviceSocket
from teltonika.logs import truncated_hex
from teltonika.protocol.queue import CommandQueue
from teltonika.wire.errors import DecodeError, FramingError, ImeiError
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
    from teltonika.protocol.tcp import DeviceFactory


class SessionState(Enum):
    """Where a device session is in its life."""

    AWAITING_LOGIN = "awaiting_login"
    """Connected and admitted; no IMEI packet handled yet."""
    AUTHORIZING = "authorizing"
    """The IMEI packet is valid and the device authority is deciding; nothing more is
    read meanwhile (a peer not yet admitted holds at most the rest of one read)."""
    LOGGED_IN = "logged_in"
    """Answered ``01``: frames are decoded, stored and ACKed."""
    DRAINING = "draining"
    """The server is shutting down: nothing more is read; the frames already read are
    still handled and ACKed (a login among them is still decided: ``imei`` says whether
    the device is logged in)."""
    CLOSING = "closing"
    """The server closes the connection (or refused it): nothing more is read or handled;
    what was written is flushed, and the socket is aborted after ``close_grace``."""
    CLOSED = "closed"
    """The connection is gone."""

    # The session tests membership in a few state sets on every read and every frame.
    # Enum's __hash__ is a Python function (a call each time); members are singletons
    # compared by identity, so the identity hash is equivalent and costs no call.
    __hash__ = object.__hash__


TRANSITIONS: Final[Mapping[SessionState, frozenset[SessionState]]] = {
    SessionState.AWAITING_LOGIN: frozenset(
        {
            SessionState.AUTHORIZING,
            SessionState.DRAINING,
            SessionState.CLOSING,
            SessionState.CLOSED,
        }
    ),
    SessionState.AUTHORIZING: frozenset(
        {
            SessionState.LOGGED_IN,
            SessionState.DRAINING,
            SessionState.CLOSING,
            SessionState.CLOSED,
        }
    ),
    SessionState.LOGGED_IN: frozenset(
        {SessionState.DRAINING, SessionState.CLOSING, SessionState.CLOSED}
    ),
    SessionState.DRAINING: frozenset({SessionState.CLOSING, SessionState.CLOSED}),
    SessionState.CLOSING: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}
"""Every lifecycle change a session may make; any other one is a bug."""

_ENDING: Final = frozenset({SessionState.CLOSING, SessionState.CLOSED})
_NO_COMMANDS: Final = frozenset({SessionState.DRAINING, *_ENDING})
"""The states in which no command frame is written (nothing the device says is read)."""
_READING: Final = frozenset({SessionState.AWAITING_LOGIN, SessionState.LOGGED_IN})
"""The states in which reading resumes once a backlog has drained."""


class SessionStateError(RuntimeError):
    """A lifecycle change :data:`TRANSITIONS` does not allow: a bug in the server, never
    something a device can cause."""


def _nothing_buffered() -> int:
    return 0


class DeviceSession:
    """One tracker's TCP session: its lifecycle, its ordered frames and its write path.

    :param socket: the connection, as the session sees it.
    :param server: the listener's shared parts (settings, clock, metrics, codecs, sink,
        device authority) and its registry of live sessions.
    :param buffered: bytes of a frame received but not yet complete (the framer's
        count); a device in the middle of a frame is awaiting that frame's ACK, so no
        command may be written then.
    :ivar state: the :class:`SessionState`.
    :ivar imei: the logged-in IMEI, or None before the login.
    :ivar commands: every write to the device, and the one outstanding command
        (docs/design.rst, 'One write path per socket' and 'One outstanding command per
        socket').
    """

    _log = Logger()

    def __init__(
        self,
        socket: IDeviceSocket,
        server: DeviceFactory,
        buffered: Callable[[], int] = _nothing_buffered,
    ) -> None:
        self._socket = socket
        self._server = server
        self._buffered = buffered
        self.state = SessionState.AWAITING_LOGIN
        self.imei: str | None = None
        self._queue: deque[Frame] = deque()
        self._busy = False
        """A frame is being handled (its Deferred has not fired): the frames behind wait."""
        self._paused = False
        """Reading is paused (a backlog, a login being decided, a drain)."""
        self._pumping = False
        self._acked_in_turn = False
        self._login_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self._idle_waiters: list[Deferred[None]] = []
        self._lost_waiters: list[Deferred[None]] = []
        self.commands = CommandQueue(
            _SocketWriter(self),
            server.clock,
            settings=server.command_queue_settings,
            metrics=server.metrics,
            connection_idle=self._idle_for_commands,
        )

    def __repr__(self) -> str:
        return f"<DeviceSession {self.imei or '-'} {self.state.value}>"

    @property
    def peer(self) -> str:
        """The device's address as log events show it, asked of the socket each time:
        behind a PROXY-protocol endpoint (``haproxy:tcp:...``) the transport knows the
        device's address only once the header is parsed, after the connection is made
        (and before the first byte reaches us); until then it gives the balancer's."""
        return self._socket.peer()

    @property
    def closing(self) -> bool:
        """CLOSING or CLOSED: nothing more is read or handled."""
        return self.state in _ENDING

    # -- the lifecycle -----------------------------------------------------------------

    def _enter(self, state: SessionState) -> None:
        """The one place the lifecycle changes; an impossible change raises (and is
        logged at critical level first, in case a caller swallows the exception)."""
        if state not in TRANSITIONS[self.state]:
            self._log.critical(
                "Impossible session transition {old} -> {new} for {imei} ({peer})",
                old=self.state.name,
                new=state.name,
                imei=self.imei,
                peer=self.peer,
            )
            raise SessionStateError(f"{self.state.name} -> {state.name}")
        self.state = state

    # -- what the Protocol reports -----------------------------------------------------

    def connection_made(self) -> None:
        """The connection is open: admit it (or abort it at once) and start its timers."""
        server = self._server
        if not server.connection_opened(self):
            self._enter(SessionState.CLOSING)
            self._socket.abort()
            return
        settings = server.settings
        clock = server.clock
        self._login_timer = clock.callLater(settings.login_timeout, self._login_timed_out)
        if settings.idle_timeout > 0:
            self._idle_timer = clock.callLater(settings.idle_timeout, self._idle_timed_out)

    def data_received(self, data: bytes, frames: Iterator[Frame]) -> None:
        """*data* was read; *frames* are the frames the framer cut from it (consumed here
        only while the session still reads: a closing session ignores its input)."""
        if self.state in _ENDING:
            return
        server = self._server
        self.commands.received()
        server.bytes_in.inc(len(data))
        timer = self._idle_timer
        if timer is not None and timer.active():
            timer.reset(server.settings.idle_timeout)
        queue = self._queue
        try:
            for frame in frames:
                if frame is KEEPALIVE:
                    server.metrics.keepalives.inc()
                    continue
                queue.append(frame)
        except FramingError as error:
            self._reject(error.reason, error, data)
            return
        self._pump()
        if (
            not self._paused
            and self.state not in _ENDING
            and len(queue) >= server.settings.max_pending_frames
        ):
            server.metrics.backlog_pauses.inc()
            self._pause()

    def connection_lost(self) -> None:
        """The connection is gone: stop every timer, fail pending commands, log out."""
        self._enter(SessionState.CLOSED)
        self._queue.clear()
        for timer in (self._login_timer, self._idle_timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._login_timer = self._idle_timer = self._abort_timer = None
        self.commands.close()
        server = self._server
        if self.imei is not None:
            self._log.info(
                "Device {imei} logged out ({peer})",
                imei=self.imei,
                peer=self.peer,
                event="logout",
            )
            server.device_logged_out(self)
        server.connection_closed(self)
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
        if self.state is SessionState.CLOSED:
            return
        self._server.bytes_out.inc(len(data))
        self._socket.write(data)

    def close(self) -> None:
        """Close after what was written is flushed; drop frames not yet handled. A peer
        that does not read the rest within ``close_grace`` seconds is aborted."""
        if self.state in _ENDING:
            return
        self._enter(SessionState.CLOSING)
        self._queue.clear()
        self._socket.close()
        if self._abort_timer is None:
            server = self._server
            self._abort_timer = server.clock.callLater(
                server.settings.close_grace, self._close_timed_out
            )

    def abort(self) -> None:
        """Drop the connection at once, unsent bytes included (the end of a shutdown)."""
        if self.state is not SessionState.CLOSED:
            self._socket.abort()

    # -- flow control ------------------------------------------------------------------

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._socket.pause()

    # -- frame queue -------------------------------------------------------------------

    def _pump(self) -> None:
        """Handle queued frames one at a time; a frame waiting on a Deferred blocks the
        ones behind it (strict order) but never the read path."""
        if self._pumping:
            return
        self._pumping = True
        queue = self._queue
        try:
            while not self._busy and queue and self.state not in _ENDING:
                self._acked_in_turn = False  # this frame is now the one awaiting an ACK
                d = self._handle(queue.popleft())
                if d is not None:
                    self._busy = True
                    d.addBoth(self._frame_done)
        finally:
            self._pumping = False
        if (
            self._paused
            and self.state in _READING
            and len(queue) * 2 < max(self._server.settings.max_pending_frames, 2)
        ):
            self._paused = False
            self._socket.resume()
        if not self._busy and not queue:
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
            and self.state not in _NO_COMMANDS
            and not self._busy
            and not self._queue
            and self._buffered() == 0
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
        server = self._server
        if self.imei is None:
            server.metrics.decode_errors.labels("before_login").inc()
            self._log.warn(
                "Data frame before login from {peer}; closing: {hex}",
                peer=self.peer,
                hex=truncated_hex(frame.raw),
                reason="before_login",
            )
            self.close()
            return None
        try:
            codec, packet = server.codecs.decode_frame(frame.raw)
        except DecodeError as error:
            self._reject(error.reason, error, frame.raw)
            return None
        if isinstance(packet, AVLPacket):
            return self._publish_records(codec, packet)
        assert isinstance(packet, MessagePacket)
        return self._handle_messages(codec, packet)

    # -- login -------------------------------------------------------------------------

    def _handle_login(self, raw: bytes) -> Deferred[None] | None:
        server = self._server
        metrics = server.metrics
        try:
            imei = parse_imei(raw, luhn=server.settings.luhn)
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
        if self.state is SessionState.AWAITING_LOGIN:  # not when a drain began meanwhile
            self._enter(SessionState.AUTHORIZING)
        d: Deferred[bool] = maybeDeferred(server.authority.is_allowed, imei)
        if not d.called:
            # The framer lets data frames through once the IMEI packet is cut, not once
            # the login is accepted: while the authority decides (a Redis lookup), read no
            # more, so a peer not yet admitted holds at most the rest of this one read.
            # _pump resumes reading once the decision is in.
            self._pause()
        return d.addBoth(self._login_decided, imei)

    def _login_decided(self, allowed: bool | Failure, imei: str) -> None:
        if self.state in _ENDING:
            return
        server = self._server
        metrics = server.metrics
        if isinstance(allowed, Failure):
            metrics.logins.labels("error").inc()
            # Once per interval at most: a fleet reconnecting while Redis is down fails
            # one lookup per login.
            server.limited_log.emit(
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
        if self.state is SessionState.AUTHORIZING:  # a drain that began meanwhile stays
            self._enter(SessionState.LOGGED_IN)
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None
        metrics.logins.labels("accepted").inc()
        self.write_to_device(ACCEPT)
        self._log.info(
            "Device {imei} logged in from {peer}", imei=imei, peer=self.peer, event="login"
        )
        server.device_logged_in(self)

    # -- records -----------------------------------------------------------------------

    def _publish_records(self, codec: ICodec, packet: AVLPacket) -> Deferred[None]:
        server = self._server
        now = server.clock.seconds()
        self.commands.frame_received(now)
        assert self.imei is not None
        return server.publisher.publish(
            self.imei,
            codec.name,
            packet.records,
            now,
            codec.acknowledgement(packet),
            self._send_ack,
            self._store_failed,
        )

    def _send_ack(self, ack: bytes) -> bool:
        """Publisher's ``send_ack``: the records are stored; ACK them unless the
        connection is gone."""
        if self.state is SessionState.CLOSED:
            return False
        self.write_to_device(ack)
        self._acked_in_turn = True
        return True

    def _store_failed(self, failure: Failure, count: int) -> None:
        """Publisher's ``failed``: no ACK; close, so the device resends on its next
        connection."""
        self._log.error(
            "Sink {sink} did not store {count} records from {imei}; no ACK, closing: {error}",
            sink=self._server.sink.name,
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
        server = self._server
        server.metrics.messages.labels(codec.name).inc()
        if self.commands.reply_received(message):
            return None  # the outstanding command's reply: its caller publishes it
        received_at_ms = int(server.clock.seconds() * 1000)
        fields = message_fields(
            imei, message, codec.name, received_at_ms, server.settings.instance_id
        )

        def failed(failure: Failure) -> None:
            self._log.error(
                "Sink {sink} did not store a codec {codec} message from {imei}: {error}",
                sink=server.sink.name,
                codec=codec.name,
                imei=imei,
                error=failure.getErrorMessage(),
            )

        return server.publisher.publish_message(imei, fields, failed)

    # -- rejections and timers ---------------------------------------------------------

    def _reject(self, reason: str, error: DecodeError, data: bytes) -> None:
        self._server.metrics.decode_errors.labels(reason).inc()
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
        if self.imei is None and self.state not in _ENDING:
            self._server.metrics.timeouts.labels("login").inc()
            self._log.info("No login from {peer} in time; closing", peer=self.peer)
            self.close()

    def _close_timed_out(self) -> None:
        self._abort_timer = None
        if self.state is SessionState.CLOSED:
            return
        self._server.metrics.timeouts.labels("close").inc()
        self._log.info(
            "Connection from {imei} ({peer}) did not close in time (peer not reading); aborting",
            imei=self.imei,
            peer=self.peer,
        )
        self._socket.abort()

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        if self.state not in _ENDING:
            self._server.metrics.timeouts.labels("idle").inc()
            self._log.info(
                "Connection from {imei} ({peer}) idle; closing", imei=self.imei, peer=self.peer
            )
            self.close()

    # -- shutdown support --------------------------------------------------------------

    def stop_reading(self) -> None:
        """Read no more frames (shutdown); those already queued are still handled."""
        if self.state is SessionState.CLOSED:
            return
        if self.state not in _ENDING and self.state is not SessionState.DRAINING:
            self._enter(SessionState.DRAINING)
        self._pause()

    def when_idle(self) -> Deferred[None]:
        """Fire when no frame is queued or being handled."""
        if self.state is SessionState.CLOSED or (not self._busy and not self._queue):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def when_lost(self) -> Deferred[None]:
        """Fire when the connection is closed."""
        if self.state is SessionState.CLOSED:
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
    """Adapts :meth:`DeviceSession._write_to_socket` to the CommandQueue's writer."""

    def __init__(self, session: DeviceSession) -> None:
        self._session = session

    def write(self, data: bytes) -> None:
        self._session._write_to_socket(data)
