"""The per-socket write queue: every byte to a device, and at most one command in flight.

Teltonika's command codecs (docs/protocol.rst, section 'Commands on a live socket') carry
no correlation id, so a reply can only be matched to "the command this socket is waiting
for": one outstanding command per socket is the only safe model. And because the same
socket carries AVL ACKs, every write goes through one ordered chain so that an ACK and a
command frame can never interleave.

The model is txtorcon's ``TorControlProtocol.queue_command``: callers queue work and each
gets its *own* Deferred; ``_maybe_issue`` starts the next command only when nothing is in
flight; the reply handler fires the in-flight Deferred and issues the next; closing the
socket errbacks everything pending with a dedicated error. On top of that:

* ACKs (:meth:`CommandQueue.write`) go through the same write chain as command frames and
  are *never* held back: a device keeps sending records while it runs a command, and it
  must get their ACKs, or it resends them and may fail over to a backup server.
* **A command frame never arrives where the device expects an ACK.** A tracker is
  strictly sequential: after writing an AVL frame it reads the next four bytes as that
  frame's ACK, and a command frame starts with four zero bytes, which it would read as
  "ACK 0" (resend), and the rest as garbage. So a command is written only

  a. right after an ACK, in the same reactor turn (:meth:`CommandQueue.ack_written`): the
     device reads the command together with its ACK, before it sends its next frame; or
  b. when nothing was received for ``quiet`` seconds (:meth:`CommandQueue.received`
     marks each read) *and* nothing but a command was written for ``quiet`` seconds
     either: an ACK or the login's ``01`` is what makes a device send its next frame
     (or its backlog), so each one starts the interval again. Except while the
     device's next frame is due: a device that
     reports periodically sends its next frame about one period (the last interval
     between two of its frames, :meth:`CommandQueue.frame_received`) after its last one,
     so within ``due_margin`` (at most half a period) of that moment only an ACK lets a
     command out: from half a period to one and a half periods after the last frame of
     a device reporting every 10 s or faster, from 5 s before to 5 s after its next
     frame is due for a slower one. Without that, a device whose period is close to
     ``quiet`` would regularly get a command just as its frame is on the way. The margin
     is bounded so that the wait is too: a command waits at most ``quiet`` plus twice
     ``due_margin`` for a write moment (plus a store in progress), which is what a
     sender's default expiry allows for (the command client's ``write_window``, on
     the command plane's side, reads these bounds; this module knows nothing of it).

  and in both cases only while the connection is idle (the ``connection_idle`` predicate
  the protocol supplies: no frame queued or being stored, no partial frame buffered; a
  device that pipelined a second frame is awaiting that frame's ACK). "No frame being
  stored" alone is not enough: a frame can be in the kernel's buffer, unread; the quiet
  interval is what makes that unlikely, and nothing can make it impossible (README,
  "Commands", limits). The login's ``01`` is not an opportunity: a device with a backlog
  starts sending at once (it starts the quiet interval, like an ACK).
* A reply resolves the outstanding command only when its codec matches (12 with 12, 14
  with 14) and its type is a reply (0x06, or 0x11 = codec 14 nACK, a failure). Anything
  else is unsolicited: :meth:`CommandQueue.reply_received` returns False and the caller
  publishes it to the device-messages stream.
* Every command has a timeout on the injected clock (default 30 s); when it fires the
  command fails with :class:`CommandTimeoutError`. The next command then waits ``settle``
  seconds more, so that a late reply to the first one arrives while nothing is
  outstanding (it is unsolicited) instead of being taken for the second one's reply.
* A command may carry an expiry: it is checked again at the moment the frame would be
  written, and a timer fails a command still waiting when its expiry passes
  (:class:`CommandExpiredError`). A command is never written after its expiry.
* Depth (queued + outstanding) is bounded: a warning at ``warn_depth``, and
  :class:`WriteQueueFullError` at ``max_depth``.
* A failed command never poisons the chain: each write step catches its own errors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika.metrics import ServerMetrics
from teltonika.units import SECONDS
from teltonika.wire.records import (
    CODEC_12,
    CODEC_14,
    MESSAGE_TYPE_NACK,
    MESSAGE_TYPE_RESPONSE,
    DeviceMessage,
)

DEFAULT_COMMAND_TIMEOUT: Final = 30 * SECONDS
DEFAULT_COMMAND_QUIET: Final = 1 * SECONDS
"""Seconds without a received byte after which an idle connection may get a command."""
DEFAULT_COMMAND_SETTLE: Final = 2 * SECONDS
"""Seconds after a command timed out before the next command may be written."""
FRAME_DUE_MARGIN: Final = 5 * SECONDS
"""Most seconds either side of a periodic device's next frame in which only an ACK lets
a command out (half the period for a device reporting more often than every 10 s)."""
MIN_RECHECK: Final = 0.05 * SECONDS
"""Shortest wait before looking again at a busy connection (with a quiet interval of 0)."""
DEFAULT_WARN_DEPTH: Final = 5
DEFAULT_MAX_DEPTH: Final = 20


class CommandError(Exception):
    """A command failed; :attr:`reason` is the ``reason`` of its ``failed`` status."""

    reason: str = "error"


class CommandTimeoutError(CommandError):
    """The device did not answer the outstanding command within its timeout."""

    reason = "timeout"


class WriteQueueFullError(CommandError):
    """The socket already has ``max_depth`` commands queued or outstanding."""

    reason = "queue_full"


class SocketClosedError(CommandError):
    """The device's socket closed before the command was answered."""

    reason = "socket_closed"


class CommandNackError(CommandError):
    """The device answered a codec 14 command with type 0x11: the IMEI is not its own."""

    reason = "nack"


class CommandExpiredError(CommandError):
    """The command's expiry passed before its frame could be written; it never was."""

    reason = "expired"


class InvalidCommandError(CommandError):
    """The command cannot be encoded (bad codec, empty or oversized payload, bad IMEI)."""

    reason = "invalid_command"


class IWriter(Protocol):
    """What the queue writes to: an ``ITransport`` in production, StringTransport in tests."""

    def write(self, data: bytes) -> None: ...


@attrs.define(eq=False)
class CommandHandle:
    """The caller's view of one submitted command: two Deferreds of its own.

    :ivar written: fires True when the frame's bytes were handed to the transport, or
        False when the command ended before that (never errbacks).
    :ivar reply: fires with the device's :class:`DeviceMessage` (type 0x06), or fails
        with a :class:`CommandError` subclass (or ``CancelledError`` if the caller
        cancels it).
    """

    written: Deferred[bool]
    reply: Deferred[DeviceMessage]


@attrs.define(eq=False)
class _Pending:
    frame: bytes
    codec_id: int
    timeout: float
    command_id: str
    handle: CommandHandle
    expires_at: float | None = None
    """Clock time after which the frame must not be written (None: never expires)."""
    timer: IDelayedCall | None = None
    """While waiting: the expiry timer; once written: the reply timeout."""
    done: bool = False


def _always_idle() -> bool:
    return True


@attrs.frozen
class CommandQueueSettings:
    """How one socket's :class:`CommandQueue` paces and bounds commands, from the
    ``--command-*`` options (the factory builds it once with
    :meth:`~teltonika.protocol.settings.ServerSettings.command_queue` and hands the same
    value to every session).

    :ivar default_timeout: seconds a command waits for its reply unless it says otherwise.
    :ivar warn_depth: log a warning when this many commands are queued or outstanding.
    :ivar max_depth: refuse a command with :class:`WriteQueueFullError` at this depth.
    :ivar quiet: seconds without a received byte after which an idle connection may get
        a command (see the module docstring); 0 writes as soon as the connection is idle.
    :ivar settle: seconds after a timeout before the next command may be written.
    """

    default_timeout: float = DEFAULT_COMMAND_TIMEOUT
    warn_depth: int = DEFAULT_WARN_DEPTH
    max_depth: int = DEFAULT_MAX_DEPTH
    quiet: float = DEFAULT_COMMAND_QUIET
    settle: float = DEFAULT_COMMAND_SETTLE


class CommandQueue:
    """One device socket's ordered writes and its single outstanding command.

    :param writer: the transport.
    :param clock: where timeouts are scheduled (the reactor, or a ``Clock`` in tests).
    :param settings: the reply timeout, the depth limits and the write gate's intervals.
    :param metrics: where the depth gauge and the unsolicited-reply counter live
        (``None``: no metrics).
    :param imei: for log events; set :attr:`imei` after login.
    :param connection_idle: True when no frame of the connection is queued, being
        stored or partly received (the protocol's state; default: always idle).
    """

    _log = Logger()

    def __init__(
        self,
        writer: IWriter,
        clock: IReactorTime,
        *,
        settings: CommandQueueSettings = CommandQueueSettings(),
        metrics: ServerMetrics | None = None,
        imei: str = "",
        connection_idle: Callable[[], bool] = _always_idle,
    ) -> None:
        self._writer = writer
        self._clock = clock
        self.settings = settings
        """Shared by every socket of a listener (one reference, not five copied fields
        per connection)."""
        self._metrics = metrics
        self.imei = imei
        self._connection_idle = connection_idle
        self._chain: Deferred[None] = succeed(None)
        self._waiting: deque[_Pending] = deque()
        self._outstanding: _Pending | None = None
        self._closed = False
        self._quiet_since = clock.seconds()
        """The last byte received, or the last ACK / login reply written."""
        self._last_frame: float | None = None
        self._frame_gap: float | None = None
        self._settle_until = 0.0
        self._wake: IDelayedCall | None = None

    @property
    def depth(self) -> int:
        """Commands queued plus the outstanding one."""
        return len(self._waiting) + (self._outstanding is not None)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def outstanding_codec(self) -> int | None:
        """The codec id of the command awaiting its reply, or None."""
        return None if self._outstanding is None else self._outstanding.codec_id

    def write(self, data: bytes) -> Deferred[bool]:
        """Write raw bytes (an ACK, the login's reply) after everything submitted before;
        never waits for a reply. The device answers such bytes with its next frame, so the
        quiet interval starts again once they are written.

        :return: fires True once written, False when the socket was closed or the write
            raised (logged); it never errbacks, so callers may ignore it.
        """
        return self._write(data, prompts_device=True)

    def _write(self, data: bytes, *, prompts_device: bool) -> Deferred[bool]:
        """Append *data* to the write chain. *prompts_device*: the bytes (an ACK, the
        login's reply) make the device send its next frame, so the quiet interval starts
        again when they are written."""
        done: Deferred[bool] = Deferred()

        def step(_: object) -> None:
            # Every step swallows its own errors, so one bad write never poisons the chain.
            if self._closed:
                done.callback(False)
                return None
            try:
                self._writer.write(data)
            except Exception:
                self._log.failure("Write to device {imei} failed", imei=self.imei)
                done.callback(False)
                return None
            if prompts_device:
                self._quiet_since = self._clock.seconds()
            done.callback(True)
            return None

        self._chain.addCallback(step)
        return done

    def submit(
        self,
        frame: bytes,
        codec_id: int,
        *,
        timeout: float | None = None,
        command_id: str = "",
        expires_in: float | None = None,
    ) -> CommandHandle:
        """Queue a complete codec 12/14 command frame; it is written when nothing is in
        flight and the device cannot mistake it for an ACK (see the module docstring).

        :param frame: the wrapped frame (``teltonika.wire.encode_command_frame``).
        :param codec_id: 0x0C or 0x0E: only a reply in the same codec resolves it.
        :param timeout: seconds to wait for the reply once written (default: the queue's).
        :param command_id: for log events.
        :param expires_in: seconds from now after which the frame must not be written
            (None: no expiry); a command still waiting then fails with
            :class:`CommandExpiredError`.
        """
        handle = CommandHandle(Deferred(), Deferred(self._cancel))
        now = self._clock.seconds()
        pending = _Pending(
            frame,
            codec_id,
            self.settings.default_timeout if timeout is None else timeout,
            command_id,
            handle,
            None if expires_in is None else now + expires_in,
        )
        if self._closed:
            self._reject(pending, SocketClosedError("the device socket is closed"))
            return handle
        if codec_id not in (CODEC_12, CODEC_14):
            self._reject(pending, InvalidCommandError(f"codec 0x{codec_id:02X} is not 12 or 14"))
            return handle
        depth = self.depth
        if depth >= self.settings.max_depth:
            self._log.warn(
                "Command {command_id} refused: {depth} commands already queued for {imei}",
                command_id=command_id,
                depth=depth,
                imei=self.imei,
            )
            self._reject(
                pending, WriteQueueFullError(f"{depth} commands already queued for this device")
            )
            return handle
        if expires_in is not None and expires_in <= 0:
            self._reject(pending, CommandExpiredError("the command expired before it was queued"))
            return handle
        self._waiting.append(pending)
        if expires_in is not None:
            pending.timer = self._clock.callLater(expires_in, self._expired, pending)
        if self._metrics is not None:
            self._metrics.command_queue_depth.inc()
        if depth + 1 >= self.settings.warn_depth:
            self._log.warn(
                "{depth} commands queued for {imei}",
                depth=depth + 1,
                imei=self.imei,
                command_id=command_id,
            )
        self._maybe_issue()
        return handle

    def received(self) -> None:
        """The protocol read bytes from the device: the quiet interval starts again."""
        self._quiet_since = self._clock.seconds()

    def frame_received(self, at: float) -> None:
        """The device sent an AVL frame (received at clock time *at*): the interval since
        its previous one is its current period."""
        if self._last_frame is not None:
            self._frame_gap = at - self._last_frame
        self._last_frame = at

    def _quiet_from(self, now: float) -> float:
        """The earliest time from *now* on when the quiet path may write a command: after
        ``quiet`` seconds without a byte received or an ACK written, and outside the
        window in which the device's next periodic frame is due (``due_margin``, at most
        half a period, either side of one period after its last frame)."""
        at = max(now, self._quiet_since + self.settings.quiet)
        gap, last = self._frame_gap, self._last_frame
        if gap is None or last is None:
            return at
        margin = min(gap / 2, FRAME_DUE_MARGIN)
        due = last + gap
        if at <= due - margin or at >= due + margin:
            return at
        return due + margin

    def ack_written(self) -> None:
        """The protocol just wrote an ACK and the connection is idle: the one moment a
        command frame reaches the device together with its ACK, before its next frame.
        Call it in the same reactor turn as the ACK write."""
        if self._waiting and self._outstanding is None:
            self._maybe_issue(after_ack=True)

    def reply_received(self, message: DeviceMessage) -> bool:
        """Offer a decoded codec 12/14 device message to the outstanding command.

        :return: True if it resolved the outstanding command; False if it is unsolicited
            (no command in flight, another codec, or not a reply type), in which case the
            caller publishes it as a device message.
        """
        pending = self._outstanding
        if pending is None or pending.codec_id != message.codec_id:
            return self._unsolicited(message)
        if message.message_type == MESSAGE_TYPE_RESPONSE:
            self._finish(pending, message)
            return True
        if message.message_type == MESSAGE_TYPE_NACK and message.codec_id == CODEC_14:
            self._log.warn(
                "Device {imei} refused codec 14 command {command_id}: IMEI mismatch (nACK)",
                imei=self.imei,
                command_id=pending.command_id,
                nack_imei=message.imei,
            )
            self._finish(pending, Failure(CommandNackError("the device answered nACK (0x11)")))
            return True
        return self._unsolicited(message)

    def _unsolicited(self, message: DeviceMessage) -> bool:
        """Log and count a codec 12/14 reply that answers nothing (serial-port data in
        TCP link mode, or a reply after its command timed out); always False."""
        if message.codec_id in (CODEC_12, CODEC_14) and message.message_type in (
            MESSAGE_TYPE_RESPONSE,
            MESSAGE_TYPE_NACK,
        ):
            if self._metrics is not None:
                self._metrics.unsolicited_replies.labels(codec=f"{message.codec_id:d}").inc()
            self._log.info(
                "Unsolicited codec {codec} reply from {imei} (no matching command)",
                codec=message.codec_id,
                imei=self.imei,
                message_type=message.message_type,
            )
        return False

    def close(self) -> None:
        """The socket closed: fail every queued and outstanding command with SocketClosedError."""
        if self._closed:
            return
        self._closed = True
        self._disarm()
        pending = ([self._outstanding] if self._outstanding is not None else []) + list(
            self._waiting
        )
        self._outstanding = None
        self._waiting.clear()
        for item in pending:
            self._settle(item)
            if not item.handle.written.called:
                item.handle.written.callback(False)
            item.handle.reply.errback(SocketClosedError("the device socket closed"))

    # -- internals -------------------------------------------------------------------

    def _maybe_issue(self, *, after_ack: bool = False) -> None:
        """Write the next waiting command if this is a moment the device cannot misread
        it: after an ACK (*after_ack*) or after the quiet interval, the connection idle,
        no settle interval running. Otherwise make sure a timer looks again later."""
        if self._outstanding is not None or not self._waiting or self._closed:
            self._disarm()
            return
        now = self._clock.seconds()
        if now < self._settle_until:
            self._arm(self._settle_until - now)
            return
        quiet_at = self._quiet_from(now)
        if not after_ack and now < quiet_at:
            self._arm(quiet_at - now)
            return
        if not self._connection_idle():
            if not after_ack:
                # A frame is queued, being stored or partly received: its ACK (or more
                # bytes) will come; look again after another quiet interval regardless.
                self._arm(max(self.settings.quiet, MIN_RECHECK))
            return
        while self._waiting:
            pending = self._waiting.popleft()
            if pending.expires_at is not None and pending.expires_at <= now:
                self._expired(pending, waiting=False)
                continue
            self._disarm()
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()  # the expiry timer: from now on the reply timeout
            pending.timer = None
            self._outstanding = pending
            self._write(pending.frame, prompts_device=False).addCallback(self._written, pending)
            return
        self._disarm()

    def _arm(self, delay: float) -> None:
        """(Re)schedule the look at the waiting commands *delay* seconds from now."""
        wake = self._wake
        if wake is not None and wake.active():
            wake.reset(delay)
            return
        self._wake = self._clock.callLater(delay, self._woken)

    def _disarm(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and wake.active():
            wake.cancel()

    def _woken(self) -> None:
        self._wake = None
        self._maybe_issue()

    def _expired(self, pending: _Pending, *, waiting: bool = True) -> None:
        """*pending*'s expiry passed before its frame was written: fail it, never write it."""
        if pending.done:
            return
        if waiting:
            self._waiting.remove(pending)
        self._log.info(
            "Command {command_id} for {imei} expired before it could be written",
            command_id=pending.command_id,
            imei=self.imei,
        )
        self._settle(pending)
        pending.handle.written.callback(False)
        pending.handle.reply.errback(CommandExpiredError("the command expired before delivery"))

    def _written(self, ok: bool, pending: _Pending) -> None:
        if pending.done:
            return
        if not ok:
            self._finish(pending, Failure(SocketClosedError("the frame could not be written")))
            return
        pending.timer = self._clock.callLater(pending.timeout, self._timed_out, pending)
        pending.handle.written.callback(True)

    def _timed_out(self, pending: _Pending) -> None:
        pending.timer = None
        # A late reply to this command must not resolve the next one: keep the socket
        # free of commands for a while, so such a reply finds nothing outstanding.
        self._settle_until = self._clock.seconds() + self.settings.settle
        self._log.warn(
            "Device {imei} did not answer command {command_id} within {timeout} s",
            imei=self.imei,
            command_id=pending.command_id,
            timeout=pending.timeout,
        )
        self._finish(
            pending,
            Failure(CommandTimeoutError(f"no reply within {pending.timeout} s")),
        )

    def _finish(self, pending: _Pending, result: DeviceMessage | Failure) -> None:
        """End *pending* (outstanding) with *result*, then issue the next command."""
        if pending.done:
            return
        self._settle(pending)
        if self._outstanding is pending:
            self._outstanding = None
        if not pending.handle.written.called:
            pending.handle.written.callback(False)
        if isinstance(result, Failure):
            pending.handle.reply.errback(result)
        else:
            pending.handle.reply.callback(result)
        self._maybe_issue()

    def _settle(self, pending: _Pending) -> None:
        """Mark *pending* done: stop its timer and take it off the depth gauge."""
        pending.done = True
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
        if self._metrics is not None:
            self._metrics.command_queue_depth.dec()

    def _reject(self, pending: _Pending, error: CommandError) -> None:
        """Fail a command that never entered the queue (not counted in the depth)."""
        pending.done = True
        pending.handle.written.callback(False)
        pending.handle.reply.errback(error)

    def _cancel(self, reply: Deferred[DeviceMessage]) -> None:
        """The caller cancelled its reply Deferred: drop the command, issue the next."""
        for item in [self._outstanding, *self._waiting]:
            if item is not None and item.handle.reply is reply and not item.done:
                self._settle(item)
                if item is self._outstanding:
                    self._outstanding = None
                else:
                    self._waiting.remove(item)
                if not item.handle.written.called:
                    item.handle.written.callback(False)
                self._maybe_issue()
                return
