"""The ingestion service: listeners, sink and device authority, started and stopped in order.

``MultiService.stopService`` stops children in reverse order without waiting between
them, but a safe shutdown is a sequence, so :class:`IngestionService` runs it in its own
``stopService`` and returns one Deferred that twistd waits for:

1. stop listening on TCP and stop reading UDP datagrams: no new devices or data;
2. stop reading on every connection and let the frames already received finish and be
   ACKed, the datagrams already received too (bounded by ``shutdown_timeout``);
3. close every connection (ACKs already written are flushed first), then the UDP port;
4. flush and close the sink (a last group commit / pipeline), then stop the authority.

Start-up: the listeners bind in ``privilegedStartService`` (so a taken port makes twistd
exit at once with the bind error); the sink then checks its store (``--redis-durability``)
and, when it cannot give what was asked, the server refuses to run via ``on_fatal``.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import FrameType
from typing import Final

import attrs
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger

from teltonika.authority import FileAuthority
from teltonika.exits import exit_now
from teltonika.interfaces import IManagedSink, IProcessReactor
from teltonika.protocol.tcp import DeviceFactory
from teltonika.protocol.udp import DeviceDatagramProtocol
from teltonika.units import SECONDS

DEFAULT_SHUTDOWN_TIMEOUT: Final = 10 * SECONDS
FATAL_EXIT_GRACE: Final = 5 * SECONDS
"""A refused start exits at the latest this long after the decision, even when some
service's stopService never finishes."""


FatalHandler = Callable[[str], None]
"""Called with a sentence when the server cannot run (it must stop the process)."""

ClosingStep = Callable[[], Awaitable[object] | None]
"""A last shutdown step: returns None when it is done, or a Deferred or coroutine to
wait for (within ``shutdown_timeout``)."""

SignalHandler = Callable[[int, FrameType | None], object] | int | None
"""What ``signal.signal`` returns: a handler, ``SIG_DFL``/``SIG_IGN``, or None."""


def exit_on_fatal(reactor: IProcessReactor) -> FatalHandler:
    """A :data:`FatalHandler` for twistd: log critically, stop the reactor, exit status 1.

    twistd itself has no way to set an exit status from a running service, so the
    process exits with status 1 right after the reactor shut down.
    """
    log = Logger(namespace="teltonika.services.ingestion")

    def fatal(message: str) -> None:
        log.critical("Refusing to start: {message}", message=message)

        def hard_exit() -> None:
            exit_now(1)

        reactor.addSystemEventTrigger("after", "shutdown", hard_exit)
        reactor.callLater(FATAL_EXIT_GRACE, hard_exit)
        if reactor.running:
            reactor.stop()

    return fatal


@attrs.frozen
class IngestionSettings:
    """How long the ingestion service's shutdown steps may take, and whether it freezes
    its start-up objects (the tap fills it from options).

    :ivar shutdown_timeout: seconds each shutdown step may take (``--shutdown-timeout``).
    :ivar freeze_gc: once the sink started, move every object built so far out of the
        garbage collector's sight (``gc.freeze``: a full collection then scans only
        per-connection and per-frame objects); the twistd plugin sets it, tests do not.
    """

    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    freeze_gc: bool = False


@attrs.frozen
class ReloadableAuthority:
    """The file device authority (``--devices file:PATH``) and the reactor through which
    a SIGHUP reloads it: a signal handler may run in the middle of any reactor code, so
    it only hands the reload to the reactor with ``callFromThread``.

    :ivar authority: started and stopped with the service, reloaded on SIGHUP.
    :ivar reactor: takes the reload from the signal handler.
    """

    authority: FileAuthority
    reactor: IReactorFromThreads


class IngestionService(Service):
    """Owns the device listeners, the sink lifecycle and the ordered shutdown.

    :param listeners: services that bind TCP device ports (strports services).
    :param udp: the UDP listener service and its protocol, when ``--udp-port`` is given;
        the port stays open until the datagrams already received are answered.
    :param on_fatal: called when the sink cannot start.
    :param settings: the bound of each shutdown step, and whether to freeze the GC.
    :param file_authority: the file device authority to run and reload on SIGHUP, if any.
    """

    _log = Logger()

    def __init__(
        self,
        factory: DeviceFactory,
        sink: IManagedSink,
        listeners: Sequence[IService],
        *,
        udp: tuple[IService, DeviceDatagramProtocol] | None = None,
        clock: IReactorTime,
        on_fatal: FatalHandler,
        settings: IngestionSettings = IngestionSettings(),
        file_authority: ReloadableAuthority | None = None,
    ) -> None:
        self.factory = factory
        self.sink = sink
        self.listeners = list(listeners)
        self.udp = udp
        self.clock = clock
        self.on_fatal = on_fatal
        self.shutdown_timeout = settings.shutdown_timeout
        self.file_authority = None if file_authority is None else file_authority.authority
        self.reactor = None if file_authority is None else file_authority.reactor
        self._closing_steps: list[ClosingStep] = []
        self.freeze_gc = settings.freeze_gc
        self.started: Deferred[None] | None = None
        self._old_sighup: SignalHandler = None

    def add_closing_step(self, step: ClosingStep, *, first: bool = False) -> None:
        """Run *step* after the sink closed, each step bounded by ``shutdown_timeout``;
        *first* puts it before the steps given so far (a part that still talks to Redis
        stops before the connection it uses is closed)."""
        if first:
            self._closing_steps.insert(0, step)
        else:
            self._closing_steps.append(step)

    def _all_listeners(self) -> list[IService]:
        return self.listeners + ([self.udp[0]] if self.udp is not None else [])

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        for listener in self._all_listeners():
            try:
                listener.privilegedStartService()
            except CannotListenError as error:
                # One plain line instead of twistd's traceback, and a failing exit status.
                self._log.critical("Cannot listen for devices: {error}", error=str(error))
                raise SystemExit(1) from None

    def startService(self) -> None:
        Service.startService(self)
        for listener in self._all_listeners():
            listener.startService()
        if self.file_authority is not None:
            self.file_authority.start()
            self._install_sighup()
        self.started = Deferred.fromCoroutine(self._start_sink())

    async def _start_sink(self) -> None:
        try:
            await self.sink.start()
        except Exception as error:
            self.on_fatal(f"the {self.sink.name} sink cannot start: {error}")
            return
        if self.freeze_gc:
            # Everything built so far (modules, plugins, metrics) lives as long as the
            # process: move it out of the collector's sight, so a full collection scans
            # only per-connection and per-frame objects. Without this the occasional
            # gen-2 pass over ~100k start-up objects shows as ACK latency spikes.
            gc.collect()
            gc.freeze()

    def _install_sighup(self) -> None:
        authority = self.file_authority
        reactor = self.reactor
        if authority is None or reactor is None:
            return

        def on_sighup(signum: int, frame: FrameType | None) -> None:
            reactor.callFromThread(authority.reload)

        try:
            self._old_sighup = signal.signal(signal.SIGHUP, on_sighup)
        except ValueError:  # not the main thread (tests): the change check still works
            self._old_sighup = None

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        factory = self.factory
        self._log.info("Shutting down: no new connections, finishing in-flight frames")
        for listener in reversed(self.listeners):
            if listener.running:
                await _maybe(listener.stopService())
        if self.udp is not None:
            self.udp[1].stop_reading()
        factory.stop_accepting()
        udp_drained = Deferred.fromCoroutine(self._drain_datagrams())
        await factory.drain(self.shutdown_timeout)
        await udp_drained
        await factory.close_all(self.shutdown_timeout)
        if self.udp is not None and self.udp[0].running:
            await _maybe(self.udp[0].stopService())
        try:
            await _within(self.sink.close(), self.shutdown_timeout, self.clock)
        except Exception as error:
            self._log.error(
                "Closing the {sink} sink failed: {error}", sink=self.sink.name, error=str(error)
            )
        if self.file_authority is not None:
            self.file_authority.stop()
            if self._old_sighup is not None:
                signal.signal(signal.SIGHUP, self._old_sighup)
        for callback in self._closing_steps:
            try:
                await _within(callback(), self.shutdown_timeout, self.clock)
            except Exception as error:
                self._log.warn("A shutdown step failed: {error}", error=str(error))
        self._log.info("Shutdown complete")

    async def _drain_datagrams(self) -> None:
        """Wait (at most ``shutdown_timeout``) until every datagram already received is
        answered; those left are never ACKed and their devices send them again."""
        if self.udp is None:
            return
        datagrams = self.udp[1]
        try:
            await _within(datagrams.when_idle(), self.shutdown_timeout, self.clock)
        except Exception:
            self._log.warn(
                "{count} datagrams still waited for the sink at shutdown; not ACKed, their "
                "devices resend them",
                count=datagrams.in_flight,
            )


async def _within(result: Awaitable[object] | None, timeout: float, clock: IReactorTime) -> None:
    """Await *result* (a coroutine or a Deferred; None is done already) for at most
    *timeout* seconds: a shutdown step must never hang the process."""
    if isinstance(result, Coroutine):
        result = Deferred.fromCoroutine(result)
    if isinstance(result, Deferred):
        result.addTimeout(timeout, clock)
    if result is not None:
        await result


async def _maybe(result: Awaitable[object] | None) -> None:
    """Await what a ``stopService`` returned (a Deferred or None)."""
    if result is not None:
        await result
