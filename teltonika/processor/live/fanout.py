"""The fan-out reader: every instance reads the whole stream with a plain ``XREAD``.

Not a consumer group per instance: a group left behind by a dead instance would hold
back ``--trim`` for ever and need a janitor, while ``XREAD`` leaves no state in Redis.
The reader starts at the stream's last id when the processor starts (what is older is in
PostgreSQL and loaded on demand), keeps its cursor across Redis reconnects, and hands
the positions of each reply to the hub in stream order. Positions go live when they are
read, before the writer has committed their rows. With the consumer groups it shares the
error classifier (:func:`teltonika.redis.groups.classify`, for ``XINFO STREAM`` on a
stream that does not exist yet) and the reading of a reply's entries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from teltonika.processor.live.hub import Hub
from teltonika.processor.live.messages import LivePosition, position_from_entry
from teltonika.processor.live.metrics import LiveMetrics
from teltonika.redis.connection import Argument, RedisConnection, Reply, reply_list, reply_text
from teltonika.redis.groups import GroupReply, classify, first_stream
from teltonika.units import SECONDS

RETRY_INITIAL: Final = 0.25 * SECONDS
RETRY_MAX: Final = 5 * SECONDS


def last_generated_id(info: Reply) -> str:
    """``last-generated-id`` from an ``XINFO STREAM`` reply."""
    if isinstance(info, list):
        for key, value in zip(info[0::2], info[1::2], strict=False):
            if reply_text(key) == "last-generated-id":
                return reply_text(value)
    return "0-0"


@attrs.frozen
class FanoutSettings:
    """How a :class:`FanoutReader` reads (the defaults are what production runs with;
    tests shorten them).

    :ivar block_ms: milliseconds one ``XREAD`` waits for new entries.
    :ivar count: entries one ``XREAD`` returns at most.
    :ivar timeout: seconds any command may take (plus the BLOCK time for a read).
    """

    block_ms: int = 1000
    count: int = 1000
    timeout: float = 10 * SECONDS


class FanoutReader:
    """Reads *stream* from its end and feeds *hub* (see the module docstring).

    :param connect: opens the dedicated Redis connection (a blocking read must not hold
        up the writer's commands).
    :param now_ms: the server clock in epoch milliseconds (for the lag metric).
    :param settings: the read's blocking time, size and timeout.
    """

    _log = Logger()

    def __init__(
        self,
        connect: Callable[[], RedisConnection],
        stream: str,
        hub: Hub,
        clock: IReactorTime,
        now_ms: Callable[[], int],
        metrics: LiveMetrics,
        *,
        settings: FanoutSettings = FanoutSettings(),
    ) -> None:
        self.connect = connect
        self.stream = stream
        self.hub = hub
        self.clock = clock
        self.now_ms = now_ms
        self.metrics = metrics
        self.block_ms = settings.block_ms
        self.count = settings.count
        self.timeout = settings.timeout
        self.cursor: str | None = None
        self.redis: RedisConnection | None = None
        self.running = False
        self.ready = False
        self._loop: Deferred[None] | None = None
        self._read: Deferred[Reply] | None = None

    def start(self) -> None:
        self.running = True  # read by the loop, cleared by stop()
        self.redis = self.connect()
        self._loop = Deferred.fromCoroutine(self._run())

    async def stop(self) -> None:
        self.running = False
        if self._read is not None:
            self._read.cancel()
        if self._loop is not None:
            with contextlib.suppress(CancelledError):
                await self._loop
        if self.redis is not None:
            await (self.redis.disconnect() or Deferred.fromCoroutine(_none()))

    def stopped(self) -> bool:
        """True once :meth:`stop` was called (a method, so the loop re-reads it)."""
        return not self.running

    def _command(self, *args: Argument, timeout: float) -> Deferred[Reply]:
        d: Deferred[Reply] = Deferred.fromCoroutine(_execute(self.redis, args))
        d.addTimeout(timeout, self.clock)
        self._read = d
        return d

    async def _run(self) -> None:
        delay = RETRY_INITIAL
        failing = False
        while self.running:
            try:
                if self.cursor is None:
                    self.cursor = await self._tail()
                    self._log.info(
                        "Live fan-out reading {stream} from {cursor}",
                        stream=self.stream,
                        cursor=self.cursor,
                    )
                self.ready = True
                reply = await self._command(
                    "XREAD",
                    "COUNT",
                    self.count,
                    "BLOCK",
                    self.block_ms,
                    "STREAMS",
                    self.stream,
                    self.cursor,
                    timeout=self.timeout + self.block_ms / 1000,
                )
            except CancelledError:
                if self.stopped():
                    return
                reply = None
            except Exception as e:
                if self.stopped():
                    return
                self.metrics.fanout_errors.inc()
                if not failing:
                    self._log.warn(
                        "Live fan-out read failed, retrying: {error}",
                        error=str(e) or type(e).__name__,
                    )
                failing = True
                await deferLater(self.clock, delay, lambda: None)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if failing:
                self._log.info("Live fan-out reading again from {cursor}", cursor=self.cursor)
            failing = False
            delay = RETRY_INITIAL
            if reply:
                self.handle(reply_list(first_stream(reply)))

    async def _tail(self) -> str:
        try:
            info = await self._command("XINFO", "STREAM", self.stream, timeout=self.timeout)
        except Exception as e:
            if classify(e) is GroupReply.NO_SUCH_KEY:
                return "0-0"
            raise
        return last_generated_id(info)

    def handle(self, entries: list[Reply]) -> None:
        """One XREAD reply's entries: positions to the hub, cursor and metrics updated."""
        positions: list[LivePosition] = []
        unusable = 0
        for entry in entries:
            parts = reply_list(entry)
            try:
                position = position_from_entry(reply_text(parts[0]), parts[1])
            except Exception:  # a bug in the check must not stop the reader: skip, say so
                self._log.failure("Live fan-out could not read entry {entry}", entry=parts[0])
                position = None
            if position is None:
                unusable += 1
            else:
                positions.append(position)
        if not entries:
            return
        last = reply_text(reply_list(entries[-1])[0])
        self.cursor = last
        self.metrics.fanout_entries.inc(len(entries))
        if unusable:
            self.metrics.fanout_skipped.inc(unusable)
        ms = last.partition("-")[0]
        if ms.isdigit():
            self.metrics.fanout_lag.set(max(0.0, (self.now_ms() - int(ms)) / 1000))
        self.hub.receive(positions)


async def _execute(connection: RedisConnection | None, args: tuple[Argument, ...]) -> Reply:
    if connection is None:
        raise RuntimeError("the fan-out reader was not started")
    return await connection.execute_command(*args)


async def _none() -> None:
    return None
