"""Whole ``twistd teltonika`` service trees in this process, on the real reactor."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import reactor

from teltonika.interfaces import IProcessReactor
from teltonika.tap import Options, TeltonikaService, build_service
from tests.servers import free_port


class Instance:
    """One server instance (``build_service`` + ``startService``) with its own id and port."""

    def __init__(self, redis_url: str, instance_id: str, *extra: str) -> None:
        self.redis_url = redis_url
        self.instance_id = instance_id
        self.extra = list(extra)
        self.port = free_port()
        self.service: TeltonikaService | None = None
        self.fatal: list[str] = []

    async def start(self) -> Instance:
        options = Options()
        options.parseOptions(
            [
                "--port",
                f"tcp:{self.port}:interface=127.0.0.1",
                "--redis",
                self.redis_url,
                "--instance-id",
                self.instance_id,
                "--metrics",
                "off",
                "--shutdown-timeout",
                "2",
                *self.extra,
            ]
        )
        global_reactor = cast(IProcessReactor, reactor)  # as twistd's makeService does
        self.service = build_service(options, global_reactor, on_fatal=self.fatal.append)
        self.service.privilegedStartService()
        self.service.startService()
        ingestion: Any = self.service.getServiceNamed("ingestion")
        await ingestion.started
        assert not self.fatal, self.fatal
        return self

    @property
    def server(self) -> Any:
        assert self.service is not None
        return self.service.server

    @property
    def commands(self) -> Any:
        return self.server.commands

    async def stop(self) -> None:
        if self.service is not None and self.service.running:
            await self.service.stopService()

    async def crash(self) -> None:
        """Stop without any cleanup in Redis: listeners and connections drop, the
        consumer stops, but registry entries, heartbeat and stream stay (a SIGKILL as far
        as Redis can tell)."""
        assert self.service is not None
        plane = self.commands
        plane.registry.held.clear()
        plane.registry.stop_heartbeat = _nothing
        plane.registry.unregister = _nothing_for
        await self.stop()


async def _nothing() -> None:
    return None


def _nothing_for(imei: str) -> Any:
    from twisted.internet.defer import succeed

    return succeed(None)
