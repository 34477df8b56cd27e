"""Wire the command plane into ``twistd teltonika`` (only with ``--redis``).

:func:`command_plane` builds one ``MultiService`` named ``commands`` with three
children: the heartbeat ``TimerService`` (first tick at start), the janitor
``TimerService`` and the :class:`~teltonika.commands.consumer.CommandConsumer`. It also
subscribes a :class:`~teltonika.commands.router.CommandRouter` to the device Factory's
logins and logouts, and puts one step in front of the ingestion service's last shutdown
steps: once every device connection is closed, remove every registry entry that still
names this instance, delete the heartbeat key and close the consumer's connection, and
only then does the shared Redis connection close.

Timers call methods that never fail (they log and count), because a ``TimerService``
whose call fails stops for good.
"""

from __future__ import annotations

from typing import Final

import attrs
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from teltonika.commands.consumer import CommandConsumer, CommandConsumerSettings
from teltonika.commands.janitor import Janitor
from teltonika.commands.messages import InstanceSettings
from teltonika.commands.metrics import CommandMetrics
from teltonika.commands.registry import ConnectionRegistry
from teltonika.commands.router import CommandRouter
from teltonika.protocol.queue import CommandQueue
from teltonika.protocol.tcp import DeviceFactory
from teltonika.redis.connect import SharedConnection
from teltonika.redis.connection import LazyConnection
from teltonika.services.ingestion import IngestionService

_log = Logger()
SETTLE_WAIT: Final = 5.0
"""Seconds the shutdown waits for statuses still being published."""


class CommandPlane(MultiService):
    """The ``commands`` service: heartbeat, janitor, consumer, and the shutdown step.

    :ivar registry: the connection registry.
    :ivar consumer: the command consumer.
    :ivar janitor: the janitor.
    """

    def __init__(
        self,
        registry: ConnectionRegistry,
        consumer: CommandConsumer,
        janitor: Janitor,
        reader: LazyConnection,
        *,
        heartbeat_interval: float,
        janitor_interval: float,
        clock: IReactorTime,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.setName("commands")  # type: ignore[no-untyped-call]
        self.registry = registry
        self.consumer = consumer
        self.janitor = janitor
        self._reader = reader
        heartbeat = TimerService(heartbeat_interval, registry.heartbeat)
        heartbeat.clock = clock
        heartbeat.setName("heartbeat")
        heartbeat.setServiceParent(self)
        sweep = TimerService(janitor_interval, janitor.run)
        sweep.clock = clock
        sweep.setName("janitor")
        sweep.setServiceParent(self)
        consumer.setServiceParent(self)  # type: ignore[no-untyped-call]

    async def shutdown(self) -> None:
        """After the device connections closed: unregister all, drop the heartbeat, close
        the consumer's connection (a closing step of the ingestion service).
        Every step is bounded and none raises, so the shutdown always completes."""
        try:
            if self.running:
                await self.stopService()  # type: ignore[no-untyped-call]
            await self.consumer.when_settled(SETTLE_WAIT)
        except Exception:
            _log.failure("Command plane shutdown step failed")
        # Statuses Redis has not taken by now stay pending (re-read at the next start).
        self.consumer.abandon()
        try:
            await self.registry.unregister_all()
            await self.registry.stop_heartbeat()
            await self._reader.close()
        except Exception:
            _log.failure("Command plane shutdown step failed")


@attrs.frozen
class CommandPlaneSettings:
    """The command plane's options (``--instance-id``, ``--heartbeat-*``,
    ``--janitor-interval``, ``--offline-max-attempts``, ``--command-*``)."""

    instance_id: str
    heartbeat_interval: float
    heartbeat_ttl: float
    janitor_interval: float
    max_attempts: int
    instance: InstanceSettings


def command_plane(
    *,
    factory: DeviceFactory,
    ingestion: IngestionService,
    redis: SharedConnection,
    clock: IReactorTime,
    settings: CommandPlaneSettings,
) -> CommandPlane:
    """The command plane for a server with ``--redis`` (the caller adds it to the service
    tree); its router listens to *factory*'s sessions, and its shutdown runs first among
    *ingestion*'s closing steps (before the shared Redis connection is closed).
    """
    metrics = CommandMetrics.create(factory.metrics.registry)
    instance_id = settings.instance_id

    def now_ms() -> int:
        return int(clock.seconds() * 1000)

    def lookup(imei: str) -> CommandQueue | None:
        session = factory.sessions.get(imei)
        return None if session is None else session.commands

    shared = LazyConnection(redis)
    reader = LazyConnection(redis.connect)
    registry = ConnectionRegistry(
        shared,
        instance_id,
        metrics,
        now_ms=now_ms,
        heartbeat_ttl=settings.heartbeat_ttl,
        clock=clock,
        settings=settings.instance,
    )
    consumer = CommandConsumer(
        reader,
        shared,
        instance_id,
        lookup,
        clock,
        metrics,
        settings=CommandConsumerSettings(max_attempts=settings.max_attempts),
    )
    janitor = Janitor(shared, instance_id, metrics, now_ms, clock=clock)
    plane = CommandPlane(
        registry,
        consumer,
        janitor,
        reader,
        heartbeat_interval=settings.heartbeat_interval,
        janitor_interval=settings.janitor_interval,
        clock=clock,
    )
    factory.session_listeners.append(CommandRouter(registry, consumer))
    ingestion.add_closing_step(lambda: Deferred.fromCoroutine(plane.shutdown()), first=True)
    return plane
