"""The live broadcast as a Twisted service inside the processor.

:func:`live_service` builds it from the parsed options (it starts nothing). Start: the
database thread, the listeners, the fan-out reader and the timers (ticks, ``seen``,
re-reading watched events). Stop (SIGTERM): stop listening, then close the sockets with
``complete SHUTDOWN`` and 4503 spread over ``--live-drain`` seconds (so thousands of
clients do not reconnect to the other instances in the same instant), then stop the
reader and the database thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from teltonika import __version__
from teltonika.interfaces import IProcessReactor
from teltonika.processor.live import messages as m
from teltonika.processor.live.fanout import FanoutReader
from teltonika.processor.live.hub import Hub
from teltonika.processor.live.interfaces import Forbidden, IAuthenticator, IEventDirectory, User
from teltonika.processor.live.latest import LatestMap
from teltonika.processor.live.loader import LatestLoader
from teltonika.processor.live.metrics import LiveMetrics
from teltonika.processor.live.options import LiveOptions
from teltonika.processor.live.protocol import LiveConfig, LiveFactory
from teltonika.processor.live.session import Limits
from teltonika.processor.live.site import PageConfig, live_site
from teltonika.redis.connection import RedisConnection
from teltonika.units import SECONDS

if TYPE_CHECKING:  # psycopg is the processor's extra: imported when the service is built
    from teltonika.processor.database import Database

DRAIN_STEPS: Final = 20
TICK_CHECKS: Final = 5
"""How many times per tick interval silent connections are looked for."""


class LiveService(MultiService):
    """Listeners (children) plus the reader, the timers and the drain."""

    _log = Logger()

    def __init__(
        self,
        factory: LiveFactory,
        reader: FanoutReader,
        database: Database,
        clock: IReactorTime,
        *,
        drain: float,
        seen_interval: float,
        resolve_interval: float,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.factory = factory
        self.reader = reader
        self.database = database
        self.clock = clock
        self.drain = drain
        self.seen_interval = seen_interval
        self.resolve_interval = resolve_interval
        self._timers: list[LoopingCall] = []

    def startService(self) -> None:
        self.database.start()
        super().startService()  # type: ignore[no-untyped-call]
        self.reader.start()
        hub = self.factory.hub
        for interval, work in (
            (self.factory.config.tick / TICK_CHECKS, self.factory.send_ticks),
            (self.seen_interval, hub.flush_seen),
            (self.resolve_interval, self._resolve),
        ):
            timer = LoopingCall(_guarded(work))
            timer.clock = self.clock
            timer.start(interval, now=False)
            self._timers.append(timer)
        self._log.info("Live broadcast started")

    def _resolve(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._resolve_events())

    async def _resolve_events(self) -> None:
        """Re-read every watched event's devices; changes become ``devices`` messages."""
        factory = self.factory
        for event in list(factory.hub.events):
            try:
                members = await factory.directory.members(event)
                await factory.loader.ensure([member.device for member in members])
            except Exception as e:
                self._log.warn(
                    "Live: re-reading the devices of an event failed: {error}",
                    error=str(e) or type(e).__name__,
                )
                continue
            factory.hub.update_members(event, members)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for timer in self._timers:
            if timer.running:
                timer.stop()
        await super().stopService()  # type: ignore[no-untyped-call]  # stop listening
        await self._drain()
        await self.reader.stop()
        self.database.stop()
        self._log.info("Live broadcast stopped")

    async def _drain(self) -> None:
        connections = list(self.factory.open)
        if not connections:
            return
        self._log.info(
            "Live: closing {count} connections over {seconds}s",
            count=len(connections),
            seconds=self.drain,
        )
        per_step = max(1, math.ceil(len(connections) / DRAIN_STEPS))
        pause = self.drain / DRAIN_STEPS
        for start in range(0, len(connections), per_step):
            for connection in connections[start : start + per_step]:
                if connection.session is not None:
                    connection.session.shutdown()
                    self.factory.metrics.closes.labels(reason="shutdown").inc()
                connection.close(m.CLOSE_GOING_AWAY, "server going away")
            if start + per_step < len(connections):
                await deferLater(self.clock, pause, lambda: None)
        # give the closing handshakes a moment, bounded; stragglers are cut by the exit
        waited = 0.0
        while self.factory.open and waited < 5 * SECONDS:
            await deferLater(self.clock, 0.05, lambda: None)
            waited += 0.05


def _guarded(work: Callable[[], Any]) -> Callable[[], Any]:
    """A LoopingCall stops for good when its callable fails: log and carry on."""
    log = Logger()

    def run() -> Any:
        try:
            result = work()
        except Exception:
            log.failure("Live timer {work} failed", work=getattr(work, "__name__", work))
            return None
        if isinstance(result, Deferred):
            result.addErrback(lambda f: log.failure("Live timer failed", failure=f))
        return result

    return run


def live_service(
    options: LiveOptions,
    registry: CollectorRegistry,
    reactor: IProcessReactor,
    *,
    connect_redis: Callable[[], RedisConnection],
    stream: str,
    instance: str,
    state_size: int,
) -> LiveService:
    """Build the live service from the processor's parsed *options* (starts nothing)."""
    from teltonika.processor.database import Database

    metrics = LiveMetrics.create(registry)

    def now_ms() -> int:
        return int(reactor.seconds() * 1000)

    latest = LatestMap(state_size, int(float(options["live-max-future"]) * 1000))
    hub = Hub(latest, reactor, metrics, now_ms, float(options["live-flush-interval"]))
    database = Database(options["postgres"], reactor, application_name="teltonika-processor-live")
    loader = LatestLoader(latest, database.run, now_ms, metrics)
    authenticator, directory = authorities(options, reactor, metrics)
    limits = Limits(
        subscriptions=int(options["live-max-subscriptions"]),
        devices=int(options["live-max-devices"]),
        message_bytes=int(options["live-max-message"]),
        rate=float(options["live-max-rate"]),
    )
    config = LiveConfig(
        allowed_origins=options.get("live-origins") or frozenset(),
        cookie_name=options["live-session-cookie"],
        max_connections=int(options["live-max-connections"]),
        max_per_user=int(options["live-max-per-user"]),
        limits=limits,
        slow_timeout=float(options["live-slow-timeout"]),
        reauth=float(options["live-reauth"]),
        tick=float(options["live-tick"]),
        ping_interval=float(options["live-ping-interval"]),
        ping_timeout=float(options["live-ping-timeout"]),
        handshake_timeout=float(options["live-directus-timeout"]) + 2 * SECONDS,
        instance=instance,
        server=f"teltonika/{__version__}",
    )
    factory = LiveFactory(
        config,
        hub=hub,
        authenticator=authenticator,
        directory=directory,
        loader=loader,
        clock=reactor,
        now_ms=now_ms,
        metrics=metrics,
    )
    reader = FanoutReader(connect_redis, stream, hub, reactor, now_ms, metrics)
    page = PageConfig(
        tiles=options["live-tiles"],
        attribution=options["live-tiles-attribution"],
        trail_minutes=float(options["live-trail-minutes"]),
    )
    service = LiveService(
        factory,
        reader,
        database,
        reactor,
        drain=float(options["live-drain"]),
        seen_interval=float(options["live-seen-interval"]),
        resolve_interval=float(options["live-resolve-interval"]),
    )
    site = live_site(factory, page)
    for endpoint in options["live"]:
        strports.service(endpoint, site, reactor=reactor).setServiceParent(service)
    return service


def authorities(
    options: LiveOptions, reactor: IProcessReactor, metrics: LiveMetrics
) -> tuple[IAuthenticator, IEventDirectory]:
    """The authenticator and event directory ``--live-auth`` and ``--live-events`` name."""
    from teltonika.processor.live.local import (
        FileEventDirectory,
        NoAuthenticator,
        NoEventDirectory,
        TokenFileAuthenticator,
    )

    kind, _, argument = str(options["live-auth"]).partition(":")
    events = options["live-events"]
    authenticator: IAuthenticator
    directory: IEventDirectory
    if kind == "directus":
        from teltonika.processor.live.directus import (
            DirectusAuthenticator,
            DirectusClient,
            DirectusEventDirectory,
            DirectusSettings,
            directus_devices_check,
            no_cookie_client,
        )

        token = None
        if options["live-directus-token-file"]:
            with open(options["live-directus-token-file"], encoding="utf-8") as f:
                token = f.read().strip() or None
        settings = DirectusSettings(
            url=argument,
            service_token=token,
            timeout=float(options["live-directus-timeout"]),
            event_collection=options["live-event-collection"],
            entry_collection=options["live-entry-collection"],
            entry_event_field=options["live-entry-event-field"],
            entry_imei_field=options["live-entry-imei-field"],
            entry_label_field=options["live-entry-label-field"],
            device_collection=options["live-device-collection"],
        )
        client = DirectusClient(settings, reactor, no_cookie_client(reactor), metrics)
        authenticator = DirectusAuthenticator(client, reactor, metrics)
        if events and events.startswith("file:"):

            def devices_check(user: User, devices: Sequence[str]) -> Deferred[None]:
                if user.credential is None:
                    return fail(Forbidden("no credential"))
                return Deferred.fromCoroutine(
                    directus_devices_check(client, user.credential, devices)
                )

            directory = FileEventDirectory(events[len("file:") :], devices_check)
        else:
            directory = DirectusEventDirectory(
                client, reactor, metrics, float(options["live-resolve-interval"])
            )
        return authenticator, directory
    authenticator = TokenFileAuthenticator(argument) if kind == "token-file" else NoAuthenticator()
    if events and events.startswith("file:"):
        directory = FileEventDirectory(events[len("file:") :])
    else:
        directory = NoEventDirectory()
    return authenticator, directory
