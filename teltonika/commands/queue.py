"""The per-socket write queue: every byte to a device, and at most one command in flight.

Teltonika's command codecs (docs/protocol.rst, section 'Commands on a live socket') carry
no correlation id, so a reply can only be matched to "the command this socket is waiting
for": one outstanding command per socket is the only safe model (seed 001, invariant 3).
And because the same socket carries AVL ACKs, every write goes through one ordered chain
so that an ACK and a command frame can never interleave (seed 000).

The model is txtorcon's ``TorControlProtocol.queue_command``: callers queue work and each
gets its *own* Deferred; ``_maybe_issue`` starts the next command only when nothing is in
flight; the reply handler fires the in-flight Deferred and issues the next; closing the
socket errbacks everything pending with a dedicated error. On top of that:

* ACKs (:meth:`CommandQueue.write`) go through the same write chain as command frames and
  are *not* held back by an outstanding command: a device keeps sending records while it
  runs a command, and it must get their ACKs (seed 000, "Risks").
* A reply resolves the outstanding command only when its codec matches (12 with 12, 14
  with 14) and its type is a reply (0x06, or 0x11 = codec 14 nACK, a failure). Anything
  else is unsolicited: :meth:`CommandQueue.reply_received` returns False and the caller
  publishes it to the device-messages stream.
* Every command has a timeout on the injected clock (default 30 s); when it fires the
  command fails with :class:`CommandTimeoutError` and the next one is issued.
* Depth (queued + outstanding) is bounded: a warning at ``warn_depth``, and
  :class:`WriteQueueFullError` at ``max_depth``.
* A failed command never poisons the chain: each write step catches its own errors.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika.commands.metrics import CommandMetrics
from teltonika.wire.records import (
    CODEC_12,
    CODEC_14,
    MESSAGE_TYPE_NACK,
    MESSAGE_TYPE_RESPONSE,
    DeviceMessage,
)

SECONDS: Final = 1.0
DEFAULT_COMMAND_TIMEOUT: Final = 30 * SECONDS
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
    timer: IDelayedCall | None = None
    done: bool = False


class CommandQueue:
    """One device socket's ordered writes and its single outstanding command.

    :param writer: the transport.
    :param clock: where timeouts are scheduled (the reactor, or a ``Clock`` in tests).
    :param default_timeout: seconds a command waits for its reply unless it says otherwise.
    :param warn_depth: log a warning when this many commands are queued or outstanding.
    :param max_depth: refuse a command with :class:`WriteQueueFullError` at this depth.
    :param metrics: where the depth gauge lives (``None``: no metrics).
    :param imei: for log events; set :attr:`imei` after login.
    """

    _log = Logger()

    def __init__(
        self,
        writer: IWriter,
        clock: IReactorTime,
        *,
        default_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        warn_depth: int = DEFAULT_WARN_DEPTH,
        max_depth: int = DEFAULT_MAX_DEPTH,
        metrics: CommandMetrics | None = None,
        imei: str = "",
    ) -> None:
        self._writer = writer
        self._clock = clock
        self.default_timeout = default_timeout
        self.warn_depth = warn_depth
        self.max_depth = max_depth
        self._metrics = metrics
        self.imei = imei
        self._chain: Deferred[None] = succeed(None)
        self._waiting: deque[_Pending] = deque()
        self._outstanding: _Pending | None = None
        self._closed = False

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
        """Write raw bytes (an ACK) after everything submitted before; never waits for a reply.

        :return: fires True once written, False when the socket was closed or the write
            raised (logged); it never errbacks, so callers may ignore it.
        """
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
    ) -> CommandHandle:
        """Queue a complete codec 12/14 command frame; it is written when nothing is in flight.

        :param frame: the wrapped frame (``teltonika.wire.encode_command_frame``).
        :param codec_id: 0x0C or 0x0E: only a reply in the same codec resolves it.
        :param timeout: seconds to wait for the reply once written (default: the queue's).
        :param command_id: for log events.
        """
        handle = CommandHandle(Deferred(), Deferred(self._cancel))
        pending = _Pending(
            frame,
            codec_id,
            self.default_timeout if timeout is None else timeout,
            command_id,
            handle,
        )
        if self._closed:
            self._reject(pending, SocketClosedError("the device socket is closed"))
            return handle
        if codec_id not in (CODEC_12, CODEC_14):
            self._reject(pending, InvalidCommandError(f"codec 0x{codec_id:02X} is not 12 or 14"))
            return handle
        depth = self.depth
        if depth >= self.max_depth:
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
        self._waiting.append(pending)
        if self._metrics is not None:
            self._metrics.queue_depth.inc()
        if depth + 1 >= self.warn_depth:
            self._log.warn(
                "{depth} commands queued for {imei}",
                depth=depth + 1,
                imei=self.imei,
                command_id=command_id,
            )
        self._maybe_issue()
        return handle

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
                self._metrics.unsolicited.labels(codec=f"{message.codec_id:d}").inc()
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

    def _maybe_issue(self) -> None:
        while self._outstanding is None and self._waiting and not self._closed:
            pending = self._waiting.popleft()
            self._outstanding = pending
            self.write(pending.frame).addCallback(self._written, pending)

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
            self._metrics.queue_depth.dec()

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
