"""The processor as a Twisted service: start-up, periodic stats and trimming, shutdown.

Shutdown order (seed 003): stop reading, finish the batch in flight (commit and XACK),
close Redis, close the database thread. A backstop (``--shutdown-timeout``, 15 s by
default) forces the exit when something hangs, because a thread stuck in a database call
would otherwise keep the process alive after the reactor stopped.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from teltonika.processor.consumer import Consumer
from teltonika.processor.trim import trim_stream

SWITCH_INTERVAL = 0.0005
"""Seconds: the GIL switch interval the processor runs with (see startService)."""


def hard_exit() -> None:
    """The backstop's last resort: leave now, whatever threads are still running."""
    sys.stderr.flush()
    os._exit(70)


class ProcessorService(Service):
    """Runs a :class:`Consumer` plus a stats/trim timer.

    :param redis: the txredisapi connections to close at shutdown.
    :param connect: opens the Redis connections when the service starts (building the
        service must not touch the network): returns (commands, reader), which become
        the consumer's ``streams.redis`` and ``streams.reader``.
    :param trim: trim the stream every *trim_interval* seconds (``--trim``).
    :param force_exit: called when shutdown exceeds *shutdown_timeout* seconds.
    """

    _log = Logger()

    def __init__(
        self,
        consumer: Consumer,
        redis: Sequence[Any],
        clock: IReactorTime,
        *,
        connect: Callable[[], tuple[Any, Any]] | None = None,
        trim: bool = False,
        trim_interval: float = 60.0,
        stats_interval: float = 5.0,
        shutdown_timeout: float = 15.0,
        force_exit: Callable[[], None] = hard_exit,
        description: str = "",
    ) -> None:
        self.consumer = consumer
        self.redis = list(redis)
        self.connect = connect
        self.clock = clock
        self.trim = trim
        self.trim_interval = trim_interval
        self.stats_interval = stats_interval
        self.shutdown_timeout = shutdown_timeout
        self.force_exit = force_exit
        self.description = description
        self._next_trim = 0.0
        self._timer: LoopingCall | None = None
        self._backstop: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        # The database thread makes ~5 round trips per batch (BEGIN, COPY, INSERT, COMMIT)
        # and needs the GIL back after each; with the default 5 ms switch interval it
        # waits up to 5 ms each time while the reactor thread decodes the next batch.
        # A shorter interval cut that convoy (benchmarks/processor.py); this process is
        # ours, so the interpreter-wide setting is acceptable.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._log.info("Processor starting: {description}", description=self.description)
        if self.connect is not None:
            commands, reader = self.connect()
            self.consumer.streams.redis = commands
            self.consumer.streams.reader = reader
            self.redis = [reader, commands]
        self.consumer.database.start()
        self.consumer.start()
        self._next_trim = self.clock.seconds() + self.trim_interval
        self._timer = LoopingCall(self._tick)
        self._timer.clock = self.clock
        self._timer.start(self.stats_interval, now=False)

    async def _tick_async(self) -> None:
        consumer = self.consumer
        streams = consumer.streams
        metrics = consumer.metrics
        metrics.devices.set(len(consumer.state))
        if not consumer.joined:
            return
        for group in await streams.groups():
            if group.name == streams.group:
                metrics.pending.set(group.pending)
                if group.lag is not None:
                    metrics.lag.set(group.lag)
        if self.trim and self.clock.seconds() >= self._next_trim:
            self._next_trim = self.clock.seconds() + self.trim_interval
            await self.trim_now()

    async def trim_now(self) -> int:
        """Trim the stream once (safely, see :mod:`teltonika.processor.trim`)."""
        min_id, removed = await trim_stream(self.consumer.streams)
        if removed:
            self.consumer.metrics.trimmed.inc(removed)
            self._log.info(
                "Trimmed {removed} entries below {min_id}", removed=removed, min_id=min_id
            )
        return removed

    def _tick(self) -> Deferred[None]:
        """Never fails: a failing tick would stop the LoopingCall for good."""
        d: Deferred[None] = Deferred.fromCoroutine(self._tick_async())

        def failed(failure: Any) -> None:
            self._log.warn("Stats/trim tick failed: {error}", error=failure.getErrorMessage())

        d.addErrback(failed)
        return d

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._backstop = self.clock.callLater(self.shutdown_timeout, self._force)
        d: Deferred[None] = Deferred.fromCoroutine(self._shutdown())
        return d

    def _force(self) -> None:
        self._log.error(
            "Shutdown did not finish within {timeout}s: forcing the exit "
            "(unacknowledged entries stay pending and are redelivered)",
            timeout=self.shutdown_timeout,
        )
        self.force_exit()

    async def _shutdown(self) -> None:
        self._log.info("Processor stopping: finishing the batch in flight")
        try:
            await self.consumer.stop()
            for connection in self.redis:
                await (connection.disconnect() or succeed(None))
            self.consumer.database.stop()
            self._log.info("Processor stopped")
        finally:
            if self._backstop is not None and self._backstop.active():
                self._backstop.cancel()
