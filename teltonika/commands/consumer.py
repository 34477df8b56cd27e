"""The command consumer: ``commands:outbound:{instance_id}`` -> the device's CommandQueue.

Each instance reads its own stream through the consumer group ``teltonika`` (consumer
name = instance id), so a restarted instance first re-reads the entries it had read but
not settled (its pending list) and then continues with new ones. Dispatching only
*submits* to the device's :class:`~teltonika.protocol.queue.CommandQueue` and attaches
callbacks; it never waits for the device, so the loop (and the device read path, which
it never touches) is never blocked by a slow tracker.

Statuses, all on ``commands:responses`` (fields in :mod:`teltonika.commands.messages`):

* ``delivered`` when the frame's bytes were handed to the socket (progress), retried
  like the terminal statuses below (a sender that gives up tells from it whether the
  device may have run the command) but only while the entry is not settled, so it never
  follows the terminal status and is published once per entry (script ``DELIVERED``);
* then exactly one of ``responded`` (the reply text) or ``failed`` with a reason. The
  terminal status, the XACK and the XDEL of the entry are one Lua script (``SETTLE``),
  so an entry is either still pending (and re-read after a restart) or settled, never
  both. Settled entries are deleted, so the stream holds only unsettled commands, which
  is what the janitor fails with ``instance_gone`` if this instance dies.
* A failed ``SETTLE`` call (Redis blipped, the connection dropped mid-call) is retried
  with a bounded backoff until Redis takes it or the instance shuts down: dropping it
  would leave the sender without a status and the entry pending, to be written to the
  device again after a restart although the device answered. The script acts only on
  a pending entry, so a retry after a first run whose reply was lost publishes nothing.
* Any entry, whatever its fields or bytes, ends in exactly one terminal status: one
  that cannot be parsed fails with ``invalid_command``, and the loop goes on.

Across a crash of this instance in the middle of a command the command may be written
to the device again after the restart (at-least-once); a command settled is never
repeated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Final

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika.commands.codec import codec_id_of, encode_command, reply_text
from teltonika.commands.messages import (
    CONSUMER_GROUP,
    DELIVERED,
    FAILED,
    OFFLINE_EXPIRY_KEY,
    REQUEUED,
    RESPONDED,
    RESPONSES_MAXLEN,
    RESPONSES_STREAM,
    SESSION_GONE,
    Command,
    Outcome,
    delivered_marks,
    flat,
    offline_command,
    offline_list,
    outbound_stream,
    text_of,
)
from teltonika.commands.metrics import CommandMetrics
from teltonika.commands.scripts import DELIVERED as DELIVERED_SCRIPT
from teltonika.commands.scripts import SETTLE, TAKE_OFFLINE, run_script
from teltonika.protocol.queue import CommandError, CommandQueue, InvalidCommandError
from teltonika.redis.connection import RedisConnection
from teltonika.redis.groups import ConsumerGroup, GroupReply, classify
from teltonika.units import SECONDS
from teltonika.wire.records import DeviceMessage

DEFAULT_BLOCK: Final = 2 * SECONDS
DEFAULT_BATCH: Final = 100
DEFAULT_MAX_ATTEMPTS: Final = 10
RETRY_DELAY: Final = 1 * SECONDS
STOP_GRACE: Final = 2 * SECONDS
UPDATE_RETRY_FIRST: Final = 0.1 * SECONDS
UPDATE_RETRY_MAX: Final = 5 * SECONDS
"""Backoff between attempts of a status that Redis did not take (doubling, capped)."""

QueueLookup = Callable[[str], CommandQueue | None]
"""IMEI -> the CommandQueue of its live session on this instance, or None."""


@attrs.frozen
class CommandConsumerSettings:
    """How a :class:`CommandConsumer` reads and retries (the command plane fills it from
    ``--offline-max-attempts``; the rest keep their defaults in production).

    :ivar block: seconds one XREADGROUP waits for new entries (a stop waits this long at
        most for the read in progress).
    :ivar batch: entries one XREADGROUP returns at most.
    :ivar max_attempts: offline delivery attempts before ``attempts_exhausted``.
    """

    block: float = DEFAULT_BLOCK
    batch: int = DEFAULT_BATCH
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


class CommandConsumer(Service):
    """Reads this instance's command stream and dispatches to device sockets.

    :param reader: a txredisapi connection used only for the blocking XREADGROUP (a
        blocking read would hold up every other command on a shared connection).
    :param redis: the shared txredisapi connection for everything else.
    :param lookup: finds the device's CommandQueue.
    :param clock: the reactor (retry delays, timestamps).
    :param settings: the read's blocking time and size, and the offline attempts.
    """

    _log = Logger()
    name = "command-consumer"

    def __init__(
        self,
        reader: RedisConnection,
        redis: RedisConnection,
        instance_id: str,
        lookup: QueueLookup,
        clock: IReactorTime,
        metrics: CommandMetrics,
        *,
        settings: CommandConsumerSettings = CommandConsumerSettings(),
    ) -> None:
        self._reader = reader
        self._redis = redis
        self.instance_id = instance_id
        self._lookup = lookup
        self._clock = clock
        self._metrics = metrics
        self.block = settings.block
        self.batch = settings.batch
        self.max_attempts = settings.max_attempts
        self.stream = outbound_stream(instance_id)
        self.group = ConsumerGroup(self.stream, CONSUMER_GROUP, instance_id)
        self._loop: Deferred[None] | None = None
        self._stopping = False
        self._abandoned = False
        self._in_flight: set[Deferred[Any]] = set()
        self._retry_waits: set[Deferred[None]] = set()

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # -- service -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        self._loop = Deferred.fromCoroutine(self._run())

    def stopService(self) -> Deferred[None]:
        """Stop reading; wait for the current read to end (``block`` seconds at most, or
        the read is cancelled: with Redis down a read waits for the reconnect)."""
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        loop, self._loop = self._loop, None
        if loop is None or loop.called:
            return Deferred.fromCoroutine(self._noop())
        loop.addTimeout(self.block + STOP_GRACE, self._clock)
        stopped: Deferred[None] = loop.addErrback(lambda _: None)
        return stopped

    @staticmethod
    async def _noop() -> None:
        return None

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        # First our own pending entries (read before a restart but never settled), from
        # the start of the pending list onwards, then new entries (">").
        backlog = True
        cursor = "0"
        while not self._stopping:
            try:
                if backlog and cursor == "0":
                    await self._ensure_group()
                entries = await self._read(cursor if backlog else ">")
            except CancelledError:
                return
            except Exception as error:
                if not self.running:
                    return
                if classify(error) is GroupReply.NO_GROUP:
                    # Redis lost the group (restarted without persistence): make it
                    # again; entries in flight here are still settled by their callbacks.
                    backlog, cursor = False, ">"
                    with contextlib.suppress(Exception):
                        await self._ensure_group()
                self._log.error(
                    "Reading {stream} failed; retrying: {error}",
                    stream=self.stream,
                    error=str(error),
                )
                try:
                    await deferLater(self._clock, RETRY_DELAY, lambda: None)
                except CancelledError:
                    return
                continue
            if backlog:
                if not entries:
                    backlog = False
                    continue
                cursor = entries[-1][0]
            for entry_id, fields in entries:
                try:
                    self.dispatch(entry_id, fields)
                except Exception:  # dispatch settles its own errors; never stop the loop
                    self._log.failure("Dispatching {entry_id} failed", entry_id=entry_id)

    async def _ensure_group(self) -> None:
        await self.group.create(self._redis)

    async def _read(self, start: str) -> list[tuple[str, dict[Any, Any]]]:
        block = int(self.block * 1000) if start == ">" else None
        out: list[tuple[str, dict[Any, Any]]] = []
        for entry in await self.group.read(self._reader, start, self.batch, block):
            values = entry.fields
            if values is None:  # pending entry deleted meanwhile
                self._ack_only(entry.entry_id)
                continue
            # Names and values may be bytes (not UTF-8): dispatch() refuses those.
            out.append((entry.entry_id, dict(zip(values[::2], values[1::2], strict=False))))
        return out

    # -- dispatch ----------------------------------------------------------------------

    def dispatch(self, entry_id: str, fields: dict[Any, Any]) -> None:
        """Hand one command entry to its device (never waits for the device).

        Every entry ends in exactly one terminal status, whatever its fields: one that
        does not parse fails with ``invalid_command``; nothing here raises.
        """
        try:
            command = Command.from_fields(fields)
        except InvalidCommandError as error:
            self._invalid(entry_id, fields, str(error))
            return
        if command.kind == "flush":
            self._ack_only(entry_id)
            if self._lookup(command.imei) is not None:
                self.take_offline(command.imei)
            return
        now_ms = self.now_ms()
        if command.expires_at_ms is not None and command.expires_at_ms <= now_ms:
            self._fail(entry_id, command, "expired")
            return
        queue = self._lookup(command.imei)
        if queue is None:
            self._fail(entry_id, command, "device_not_connected")
            return
        try:
            frame = encode_command(codec_id_of(command.codec), command.payload, command.imei)
        except InvalidCommandError as error:
            self._log.warn(
                "Command {command_id} cannot be encoded: {error}",
                command_id=command.id,
                error=str(error),
                reason="invalid_command",
            )
            self._fail(entry_id, command, InvalidCommandError.reason)
            return
        expires_in = (
            None if command.expires_at_ms is None else (command.expires_at_ms - now_ms) / 1000
        )
        handle = queue.submit(
            frame,
            codec_id_of(command.codec),
            timeout=command.timeout_s,
            command_id=command.id,
            expires_in=expires_in,
        )
        handle.written.addCallback(self._written, entry_id, command)
        handle.reply.addCallbacks(
            self._replied,
            self._reply_failed,
            callbackArgs=(entry_id, command),
            errbackArgs=(entry_id, command, queue),
        )

    def _invalid(self, entry_id: str, fields: dict[Any, Any], error: str) -> None:
        """A malformed entry: one ``failed``/``invalid_command`` status with whatever id,
        IMEI and codec it carries (as text); a malformed ``flush`` is only acknowledged
        (it is no command, and its id may be a real offline command's)."""
        self._log.warn(
            "Invalid command entry {entry_id} in {stream}: {error}",
            entry_id=entry_id,
            stream=self.stream,
            error=error,
            reason="invalid_command",
        )
        if fields.get("kind") == "flush":
            self._ack_only(entry_id)
            return
        outcome = Outcome(
            text_of(fields.get("id", "")),
            text_of(fields.get("imei", "")),
            text_of(fields.get("codec", "")),
            FAILED,
            reason=InvalidCommandError.reason,
        )
        self._settle(entry_id, outcome, offline=fields.get("offline") == "1")

    def _written(self, ok: bool, entry_id: str, command: Command) -> None:
        """The frame was handed to the socket: publish ``delivered``, retried until Redis
        takes it, the entry is settled (then the terminal status says more) or the
        instance shuts down."""
        if not ok:
            return
        fields = Outcome.of(command, DELIVERED).fields(
            instance_id=self.instance_id, at_ms=self.now_ms()
        )
        keys = [self.stream, RESPONSES_STREAM, delivered_marks(self.instance_id)]
        args = [entry_id, str(RESPONSES_MAXLEN), *flat(fields)]

        def published(result: object) -> None:
            if result is not None and int(str(result)) == 1:
                self._metrics.commands.labels(status=DELIVERED, reason="").inc()

        d = Deferred.fromCoroutine(
            self._until_redis_takes(
                lambda: run_script(self._redis, DELIVERED_SCRIPT, keys, args),
                what=DELIVERED,
                subject=command.id,
            )
        )
        d.addCallback(published)
        self._track(d.addErrback(self._publish_failed, command.id, DELIVERED))

    def _replied(self, message: DeviceMessage, entry_id: str, command: Command) -> None:
        outcome = Outcome(
            command.id,
            command.imei,
            command.codec,
            RESPONDED,
            response=reply_text(message),
            response_hex=message.payload.hex(),
            attempt=command.attempt,
        )
        self._settle(entry_id, outcome, offline=command.offline)

    def _reply_failed(
        self, failure: Failure, entry_id: str, command: Command, queue: CommandQueue
    ) -> None:
        reason = failure.value.reason if isinstance(failure.value, CommandError) else "error"
        if reason == "error":
            self._log.failure("Command {command_id} failed", failure, command_id=command.id)

        def settled(final: str) -> None:
            # An offline command back in the waiting list while the device is logged in
            # here on a newer session than the attempt's (the old socket timed out
            # half-open while the device logged in again, and that login collected the
            # list before the command was back): take the list again, now. The settle
            # script asks another instance to flush itself; this one is ours to do.
            current = self._lookup(command.imei)
            if final == REQUEUED and current is not None and current is not queue:
                self.take_offline(command.imei)

        retake = command.offline and reason not in SESSION_GONE  # those: the script flushes
        self._fail(entry_id, command, reason, then=settled if retake else None)

    def _fail(
        self,
        entry_id: str,
        command: Command,
        reason: str,
        *,
        then: Callable[[str], None] | None = None,
    ) -> None:
        outcome = Outcome.of(command, FAILED, reason=reason)
        self._settle(entry_id, outcome, offline=command.offline, then=then)

    def _settle(
        self,
        entry_id: str,
        outcome: Outcome,
        *,
        offline: bool,
        then: Callable[[str], None] | None = None,
    ) -> Deferred[Any]:
        """Publish the terminal status *outcome*, XACK and XDEL the entry: one Lua script.

        :param offline: the entry is an offline command (a retryable failure puts it back
            to wait for the next login instead, ``requeued``).
        :param then: called with the status the script published (``requeued`` for an
            offline command put back to wait), not when it published nothing.
        """
        command_id, imei = outcome.command_id, outcome.imei
        fields = outcome.fields(instance_id=self.instance_id, at_ms=self.now_ms())
        keys = [
            self.stream,
            RESPONSES_STREAM,
            offline_command(command_id),
            offline_list(imei),
            OFFLINE_EXPIRY_KEY,
            delivered_marks(self.instance_id),
        ]
        args = [
            CONSUMER_GROUP,
            entry_id,
            "1" if offline else "",
            str(self.now_ms()),
            str(self.max_attempts),
            str(RESPONSES_MAXLEN),
            *flat(fields),
        ]

        def published(result: object) -> None:
            final, _, final_reason = str(result or "").partition("|")
            if not final:
                return  # settled before (an earlier attempt, a janitor): nothing published
            self._metrics.commands.labels(status=final, reason=final_reason).inc()
            if then is not None:
                then(final)
            if final == FAILED:
                self._log.info(
                    "Command {command_id} for {imei} failed: {reason}",
                    command_id=command_id,
                    imei=imei,
                    reason=final_reason,
                )

        d = Deferred.fromCoroutine(
            self._until_redis_takes(
                lambda: run_script(self._redis, SETTLE, keys, args),
                what="settle",
                subject=command_id,
            )
        )
        d.addCallback(published)
        d.addErrback(self._publish_failed, command_id, outcome.status)
        self._track(d)
        return d

    async def _until_redis_takes(
        self,
        call: Callable[[], Any],
        *,
        what: str,
        subject: str,
        wanted: Callable[[], bool] | None = None,
    ) -> Any:
        """Run *call* (an idempotent Redis update) until it succeeds, waiting a doubling
        delay (:data:`UPDATE_RETRY_FIRST` to :data:`UPDATE_RETRY_MAX`) between attempts.

        Gives up (returns None) when the instance shuts down (:meth:`abandon`) or when
        *wanted* says the update is no longer needed. One error event on the first
        failure, one info event when it finally went through.
        """
        delay = UPDATE_RETRY_FIRST
        attempt = 1
        while True:
            try:
                result = await maybeDeferred(call)
            except Exception as error:
                if self._abandoned:
                    self._log.error(
                        "Redis update ({what}) for {subject} abandoned at shutdown: {error}",
                        what=what,
                        subject=subject,
                        error=str(error),
                    )
                    return None
                self._metrics.update_retries.labels(update=what).inc()
                if attempt == 1:
                    self._log.error(
                        "Redis update ({what}) for {subject} failed; retrying until Redis "
                        "takes it: {error}",
                        what=what,
                        subject=subject,
                        error=str(error),
                    )
            else:
                if attempt > 1:
                    self._log.info(
                        "Redis update ({what}) for {subject} went through at attempt {attempt}",
                        what=what,
                        subject=subject,
                        attempt=attempt,
                    )
                return result
            if wanted is not None and not wanted():
                return None
            wait = deferLater(self._clock, delay, lambda: None)
            self._retry_waits.add(wait)
            try:
                await wait
            except CancelledError:
                return None
            finally:
                self._retry_waits.discard(wait)
            delay = min(delay * 2, UPDATE_RETRY_MAX)
            attempt += 1

    def abandon(self) -> None:
        """Shutdown: stop retrying Redis updates (the waits end now; a call still running
        ends with the connection). Entries not settled stay pending for the next start."""
        self._abandoned = True
        for wait in list(self._retry_waits):
            wait.cancel()

    def _ack_only(self, entry_id: str) -> None:
        d = maybeDeferred(
            self._redis.execute_command, "XACK", self.stream, CONSUMER_GROUP, entry_id
        )
        d.addCallback(lambda _: self._redis.execute_command("XDEL", self.stream, entry_id))
        self._track(d.addErrback(self._publish_failed, entry_id, "ack"))

    def take_offline(self, imei: str) -> Deferred[Any]:
        """Move *imei*'s waiting offline commands into this instance's stream (at login,
        or on a ``flush`` entry). Retried while the device is still connected here (the
        script is idempotent: a second run finds the list empty)."""
        keys = [offline_list(imei), self.stream, RESPONSES_STREAM, OFFLINE_EXPIRY_KEY]

        def take() -> Any:
            args = [
                self.instance_id,
                str(self.now_ms()),
                str(self.max_attempts),
                str(RESPONSES_MAXLEN),
            ]
            return run_script(self._redis, TAKE_OFFLINE, keys, args)

        d = Deferred.fromCoroutine(
            self._until_redis_takes(
                take,
                what="take_offline",
                subject=imei,
                wanted=lambda: self._lookup(imei) is not None,
            )
        )

        def taken(count: object) -> None:
            if count is not None and int(str(count)) > 0:
                self._log.info(
                    "Delivering {count} offline commands to {imei}", count=count, imei=imei
                )

        d.addCallback(taken)
        d.addErrback(self._publish_failed, imei, "take_offline")
        self._track(d)
        return d

    def _publish_failed(self, failure: Failure, subject: str, what: str) -> None:
        self._log.error(
            "Redis update ({what}) for {subject} failed: {error}",
            what=what,
            subject=subject,
            error=failure.getErrorMessage(),
        )

    def _track(self, d: Deferred[Any]) -> None:
        self._in_flight.add(d)
        d.addBoth(lambda _: self._in_flight.discard(d))

    def when_settled(self, timeout: float | None = None) -> Deferred[Any]:
        """Fire when every Redis update started so far has finished (tests, shutdown),
        or after *timeout* seconds; never fails."""
        from twisted.internet.defer import DeferredList

        d: Deferred[Any] = DeferredList(list(self._in_flight), consumeErrors=True)
        if timeout is not None:
            d.addTimeout(timeout, self._clock)
        return d.addErrback(lambda _: None)
