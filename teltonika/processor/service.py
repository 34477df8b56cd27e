"""The processor as a Twisted service: start-up, periodic stats and trimming, shutdown.

Shutdown order (docs/operations.rst, 'Upgrade'): stop reading, finish the batch in flight
(commit and XACK), close Redis, close the database thread. A backstop
(``--shutdown-timeout``, 15 s by default) forces the exit when something hangs, because a
thread stuck in a database call would otherwise keep the process alive after the reactor
stopped.

A consumer that crashed (or refused to start: a schema it cannot write) must not leave a
process that answers ``/readyz`` and reads nothing: the service stops the reactor and the
process exits with :data:`EXIT_SOFTWARE`, so its supervisor restarts it. twistd itself
only ever exits 0 after a clean reactor stop, hence the ``atexit`` hook
(:func:`exit_after_shutdown`): the shutdown still runs in order, then the status is set.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Final

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall, IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika.exits import exit_now
from teltonika.processor.consumer import Consumer
from teltonika.processor.defaults import SHUTDOWN_TIMEOUT, STATS_INTERVAL, TRIM_INTERVAL
from teltonika.processor.trim import trim_stream
from teltonika.redis.connection import RedisConnection

SWITCH_INTERVAL = 0.0005
"""Seconds: the GIL switch interval the processor runs with (see startService)."""


class _SwitchInterval:
    """The process-wide GIL switch interval, shortened while at least one processor
    service runs, and put back exactly once, to the value it had before the first one
    started, when the last one stops. Two services in one process (or one restarted)
    never restore the interval one of them set, or restore it while another still runs.
    Used on the reactor thread only."""

    def __init__(self) -> None:
        self.users = 0
        self.original: float | None = None

    def acquire(self) -> None:
        if self.users == 0:
            self.original = sys.getswitchinterval()
            sys.setswitchinterval(min(self.original, SWITCH_INTERVAL))
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.original is not None:
            sys.setswitchinterval(self.original)
            self.original = None


switch_interval = _SwitchInterval()


EXIT_SOFTWARE: Final = 70
"""Exit status after a crash, a refused start or a forced shutdown (``EX_SOFTWARE``)."""


def hard_exit() -> None:
    """The backstop's last resort: leave now, whatever threads are still running."""
    exit_now(EXIT_SOFTWARE)


def exit_after_shutdown(reactor: IReactorCore) -> Callable[[], None]:
    """A function that stops *reactor* (running the ordered shutdown) and makes the process
    exit with :data:`EXIT_SOFTWARE` once twistd is done (an ``atexit`` hook)."""

    def exit_nonzero() -> None:
        atexit.register(exit_now, EXIT_SOFTWARE)
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    return exit_nonzero


@attrs.frozen
class Housekeeping:
    """What the processor's timer does besides the stats, and how often.

    :ivar stats_interval: seconds between two ticks (``--stats-interval``).
    :ivar trim: trim the stream every *trim_interval* seconds (``--trim``).
    :ivar retire_idle: every tick, delete the group's consumers with nothing pending that
        have been idle longer than this many seconds (0: never;
        ``--retire-idle-consumers``).
    """

    stats_interval: float = STATS_INTERVAL
    trim: bool = False
    trim_interval: float = TRIM_INTERVAL
    retire_idle: float = 0.0


@attrs.frozen
class ExitPolicy:
    """When and how the processor's process leaves on its own (the tap fills it from
    ``--shutdown-timeout``; tests record the calls instead of exiting).

    :ivar shutdown_timeout: seconds a shutdown may take before the backstop fires.
    :ivar force_exit: the backstop: called when a shutdown exceeds *shutdown_timeout*.
    :ivar crash_exit: called once the consumer crashed or refused to start
        (:func:`exit_after_shutdown` in production; None only stops reading).
    """

    shutdown_timeout: float = SHUTDOWN_TIMEOUT
    force_exit: Callable[[], None] = hard_exit
    crash_exit: Callable[[], None] | None = None


class ProcessorService(Service):
    """Runs a :class:`Consumer` plus a stats/trim timer.

    :param redis: the txredisapi connections to close at shutdown.
    :param connect: opens the Redis connections when the service starts (building the
        service must not touch the network): returns (commands, reader), handed to the
        consumer's streams (:meth:`~teltonika.processor.streams.Streams.use`).
    :param housekeeping: the timer's interval, trimming and retiring of idle consumers.
    :param exits: the shutdown's bound and backstop, and what a crash calls.
    """

    _log = Logger()

    def __init__(
        self,
        consumer: Consumer,
        redis: Sequence[RedisConnection],
        clock: IReactorTime,
        *,
        connect: Callable[[], tuple[RedisConnection, RedisConnection]] | None = None,
        housekeeping: Housekeeping = Housekeeping(),
        exits: ExitPolicy = ExitPolicy(),
        description: str = "",
    ) -> None:
        self.consumer = consumer
        self.redis = list(redis)
        self.connect = connect
        self.clock = clock
        self.trim = housekeeping.trim
        self.trim_interval = housekeeping.trim_interval
        self.stats_interval = housekeeping.stats_interval
        self.shutdown_timeout = exits.shutdown_timeout
        self.retire_idle = housekeeping.retire_idle
        self.force_exit = exits.force_exit
        self.crash_exit = exits.crash_exit
        self.description = description
        self._holds_switch_interval = False
        self._next_trim = 0.0
        self._timer: LoopingCall | None = None
        self._backstop: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        # The database thread makes ~5 round trips per batch (BEGIN, COPY, INSERT, COMMIT)
        # and needs the GIL back after each; with the default 5 ms switch interval it
        # waits up to 5 ms each time while the reactor thread decodes the next batch.
        # A shorter interval cut that convoy (benchmarks/processor.py); this process is
        # ours, so the interpreter-wide setting is acceptable (restored in stopService,
        # by the last processor service of the process to stop).
        if not self._holds_switch_interval:
            switch_interval.acquire()
            self._holds_switch_interval = True
        self._log.info("Processor starting: {description}", description=self.description)
        if self.connect is not None:
            commands, reader = self.connect()
            self.consumer.streams.use(commands, reader)
            self.redis = [reader, commands]
        self.consumer.database.start()
        self.consumer.start().addCallback(self._consumer_ended)
        self._next_trim = self.clock.seconds() + self.trim_interval
        self._timer = LoopingCall(self._tick)
        self._timer.clock = self.clock
        self._timer.start(self.stats_interval, now=False)

    def _consumer_ended(self, _: object) -> None:
        if self.consumer.crashed is None:
            return
        self._log.critical(
            "The processor cannot go on: exiting with status {status} so that its "
            "supervisor restarts it",
            status=EXIT_SOFTWARE,
        )
        if self.crash_exit is not None:
            self.crash_exit()

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
        if self.retire_idle:
            await self.retire_now()
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

    async def retire_now(self) -> list[tuple[str, int]]:
        """Delete the group's idle consumers with nothing pending (never ours)."""
        consumer = self.consumer
        retired = await consumer.streams.retire_idle_consumers(round(self.retire_idle * 1000))
        for name, idle_ms in retired:
            consumer.metrics.consumers_retired.inc()
            self._log.info(
                "Retired consumer {name} from group {group}: idle {idle:.0f}s, nothing pending",
                name=name,
                group=consumer.streams.group,
                idle=idle_ms / 1000,
            )
        return retired

    def _tick(self) -> Deferred[None]:
        """Never fails: a failing tick would stop the LoopingCall for good."""
        d: Deferred[None] = Deferred.fromCoroutine(self._tick_async())

        def failed(failure: Failure) -> None:
            self._log.warn("Stats/trim tick failed: {error}", error=failure.getErrorMessage())

        d.addErrback(failed)
        return d

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._holds_switch_interval:
            switch_interval.release()
            self._holds_switch_interval = False
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
