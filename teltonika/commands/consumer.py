"""The command consumer: ``commands:outbound:{instance_id}`` -> the device's CommandQueue.

Each instance reads its own stream through the consumer group ``teltonika`` (consumer
name = instance id), so a restarted instance first re-reads the entries it had read but
not settled (its pending list) and then continues with new ones. Dispatching only
*submits* to the device's :class:`~teltonika.commands.queue.CommandQueue` and attaches
callbacks; it never waits for the device, so the loop (and the device read path, which
it never touches) is never blocked by a slow tracker.

Statuses, all on ``commands:responses`` (fields in :mod:`teltonika.commands.messages`):

* ``delivered`` when the frame's bytes were handed to the socket (progress);
* then exactly one of ``responded`` (the reply text) or ``failed`` with a reason. The
  terminal status, the XACK and the XDEL of the entry are one Lua script (``SETTLE``),
  so an entry is either still pending (and re-read after a restart) or settled, never
  both. Settled entries are deleted, so the stream holds only unsettled commands, which
  is what the janitor fails with ``instance_gone`` if this instance dies.

Across a crash of this instance in the middle of a command the command may be written
to the device again after the restart (at-least-once); a command settled is never
repeated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Final

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
    RESPONDED,
    RESPONSES_MAXLEN,
    RESPONSES_STREAM,
    Command,
    flat,
    offline_command,
    offline_list,
    outbound_stream,
    pairs,
    status_fields,
)
from teltonika.commands.metrics import CommandMetrics
from teltonika.commands.queue import CommandError, CommandQueue, InvalidCommandError
from teltonika.commands.scripts import SETTLE, TAKE_OFFLINE, run_script
from teltonika.wire.records import DeviceMessage

SECONDS: Final = 1.0
DEFAULT_BLOCK: Final = 2 * SECONDS
DEFAULT_BATCH: Final = 100
DEFAULT_MAX_ATTEMPTS: Final = 10
RETRY_DELAY: Final = 1 * SECONDS
STOP_GRACE: Final = 2 * SECONDS

QueueLookup = Callable[[str], CommandQueue | None]
"""IMEI -> the CommandQueue of its live session on this instance, or None."""


class CommandConsumer(Service):
    """Reads this instance's command stream and dispatches to device sockets.

    :param reader: a txredisapi connection used only for the blocking XREADGROUP (a
        blocking read would hold up every other command on a shared connection).
    :param redis: the shared txredisapi connection for everything else.
    :param lookup: finds the device's CommandQueue.
    :param clock: the reactor (retry delays, timestamps).
    :param block: seconds one XREADGROUP waits for new entries.
    :param max_attempts: offline delivery attempts before ``attempts_exhausted``.
    """

    _log = Logger()
    name = "command-consumer"

    def __init__(
        self,
        reader: Any,
        redis: Any,
        instance_id: str,
        lookup: QueueLookup,
        clock: IReactorTime,
        metrics: CommandMetrics,
        *,
        block: float = DEFAULT_BLOCK,
        batch: int = DEFAULT_BATCH,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self._reader = reader
        self._redis = redis
        self.instance_id = instance_id
        self._lookup = lookup
        self._clock = clock
        self._metrics = metrics
        self.block = block
        self.batch = batch
        self.max_attempts = max_attempts
        self.stream = outbound_stream(instance_id)
        self._loop: Deferred[None] | None = None
        self._stopping = False
        self._in_flight: set[Deferred[Any]] = set()

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
                if "NOGROUP" in str(error):
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
                self.dispatch(entry_id, fields)

    async def _ensure_group(self) -> None:
        try:
            await maybeDeferred(
                self._redis.execute_command,
                "XGROUP",
                "CREATE",
                self.stream,
                CONSUMER_GROUP,
                "0",
                "MKSTREAM",
            )
        except Exception as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _read(self, start: str) -> list[tuple[str, dict[str, str]]]:
        args: list[Any] = ["XREADGROUP", "GROUP", CONSUMER_GROUP, self.instance_id]
        args += ["COUNT", str(self.batch)]
        if start == ">":
            args += ["BLOCK", str(int(self.block * 1000))]
        args += ["STREAMS", self.stream, start]
        reply = await maybeDeferred(self._reader.execute_command, *args)
        if not reply:
            return []
        out: list[tuple[str, dict[str, str]]] = []
        for _stream, items in reply:
            for entry_id, values in items:
                if values is None:  # pending entry deleted meanwhile
                    self._ack_only(entry_id)
                    continue
                out.append((entry_id, pairs(list(values))))
        return out

    # -- dispatch ----------------------------------------------------------------------

    def dispatch(self, entry_id: str, fields: dict[str, str]) -> None:
        """Hand one command entry to its device (never waits for the device)."""
        try:
            command = Command.from_fields(fields)
        except InvalidCommandError as error:
            self._log.warn(
                "Invalid command entry {entry_id} in {stream}: {error}",
                entry_id=entry_id,
                stream=self.stream,
                error=str(error),
                reason="invalid_command",
            )
            self._settle(
                entry_id,
                fields.get("offline") == "1",
                fields.get("id", ""),
                fields.get("imei", ""),
                fields.get("codec", ""),
                FAILED,
                reason=InvalidCommandError.reason,
            )
            return
        if command.kind == "flush":
            self._ack_only(entry_id)
            if self._lookup(command.imei) is not None:
                self.take_offline(command.imei)
            return
        if command.expires_at_ms is not None and command.expires_at_ms <= self.now_ms():
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
        handle = queue.submit(
            frame, codec_id_of(command.codec), timeout=command.timeout_s, command_id=command.id
        )
        handle.written.addCallback(self._written, command)
        handle.reply.addCallbacks(
            self._replied,
            self._reply_failed,
            callbackArgs=(entry_id, command),
            errbackArgs=(entry_id, command),
        )

    def _written(self, ok: bool, command: Command) -> None:
        if not ok:
            return
        fields = status_fields(
            command_id=command.id,
            imei=command.imei,
            codec=command.codec,
            status=DELIVERED,
            instance_id=self.instance_id,
            at_ms=self.now_ms(),
            attempt=command.attempt,
        )
        d = maybeDeferred(
            self._redis.execute_command,
            "XADD",
            RESPONSES_STREAM,
            "MAXLEN",
            "~",
            str(RESPONSES_MAXLEN),
            "*",
            *flat(fields),
        )
        self._metrics.commands.labels(status=DELIVERED, reason="").inc()
        self._track(d.addErrback(self._publish_failed, command.id, DELIVERED))

    def _replied(self, message: DeviceMessage, entry_id: str, command: Command) -> None:
        self._settle(
            entry_id,
            command.offline,
            command.id,
            command.imei,
            command.codec,
            RESPONDED,
            response=reply_text(message),
            response_hex=message.payload.hex(),
            attempt=command.attempt,
        )

    def _reply_failed(self, failure: Failure, entry_id: str, command: Command) -> None:
        reason = failure.value.reason if isinstance(failure.value, CommandError) else "error"
        if reason == "error":
            self._log.failure("Command {command_id} failed", failure, command_id=command.id)
        self._fail(entry_id, command, reason)

    def _fail(self, entry_id: str, command: Command, reason: str) -> None:
        self._settle(
            entry_id,
            command.offline,
            command.id,
            command.imei,
            command.codec,
            FAILED,
            reason=reason,
            attempt=command.attempt,
        )

    def _settle(
        self,
        entry_id: str,
        offline: bool,
        command_id: str,
        imei: str,
        codec: str,
        status: str,
        *,
        reason: str = "",
        response: str = "",
        response_hex: str = "",
        attempt: int = 0,
    ) -> Deferred[Any]:
        """Publish the terminal status, XACK and XDEL the entry: one Lua script."""
        fields = status_fields(
            command_id=command_id,
            imei=imei,
            codec=codec,
            status=status,
            instance_id=self.instance_id,
            at_ms=self.now_ms(),
            reason=reason,
            response=response,
            response_hex=response_hex,
            attempt=attempt,
        )
        keys = [
            self.stream,
            RESPONSES_STREAM,
            offline_command(command_id),
            offline_list(imei),
            OFFLINE_EXPIRY_KEY,
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
        d = maybeDeferred(run_script, self._redis, SETTLE, keys, args)

        def published(result: object) -> None:
            final, _, final_reason = str(result or "").partition("|")
            if not final:
                return  # an offline command settled earlier: nothing published
            self._metrics.commands.labels(status=final, reason=final_reason).inc()
            if final == FAILED:
                self._log.info(
                    "Command {command_id} for {imei} failed: {reason}",
                    command_id=command_id,
                    imei=imei,
                    reason=final_reason,
                )

        d.addCallback(published)
        d.addErrback(self._publish_failed, command_id, status)
        self._track(d)
        return d

    def _ack_only(self, entry_id: str) -> None:
        d = maybeDeferred(
            self._redis.execute_command, "XACK", self.stream, CONSUMER_GROUP, entry_id
        )
        d.addCallback(lambda _: self._redis.execute_command("XDEL", self.stream, entry_id))
        self._track(d.addErrback(self._publish_failed, entry_id, "ack"))

    def take_offline(self, imei: str) -> Deferred[Any]:
        """Move *imei*'s waiting offline commands into this instance's stream (at login)."""
        d = maybeDeferred(
            run_script,
            self._redis,
            TAKE_OFFLINE,
            [offline_list(imei), self.stream, RESPONSES_STREAM, OFFLINE_EXPIRY_KEY],
            [self.instance_id, str(self.now_ms()), str(self.max_attempts), str(RESPONSES_MAXLEN)],
        )

        def taken(count: object) -> None:
            if int(str(count)) > 0:
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
