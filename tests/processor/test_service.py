"""ProcessorService shutdown, driven by a Clock (no servers)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from teltonika.processor.service import ProcessorService


class FakeDatabase:
    def __init__(self) -> None:
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True


class FakeConsumer:
    def __init__(self, stopping: Deferred[None]) -> None:
        self.database = FakeDatabase()
        self.stopping = stopping
        self.joined = False

    def start(self) -> Deferred[None]:
        return Deferred()

    def stop(self) -> Deferred[None]:
        return self.stopping


class FakeRedis:
    def __init__(self) -> None:
        self.closed = False

    def disconnect(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


def make(stopping: Deferred[None]) -> tuple[ProcessorService, Clock, list[str], FakeRedis]:
    clock = Clock()
    exits: list[str] = []
    redis = FakeRedis()
    service = ProcessorService(
        FakeConsumer(stopping),
        [redis],
        clock,
        stats_interval=1000,  # type: ignore[arg-type]
        shutdown_timeout=15,
        force_exit=lambda: exits.append("exit"),
    )
    service.startService()
    return service, clock, exits, redis


def test_clean_shutdown_closes_everything_and_cancels_the_backstop():
    """When the batch in flight finishes, Redis and the database close and the backstop
    never fires."""
    finished: Deferred[None] = Deferred()
    service, clock, exits, redis = make(finished)
    done = service.stopService()
    assert not done.called
    finished.callback(None)
    assert done.called and redis.closed and service.consumer.database.stopped
    clock.advance(60)
    assert exits == []


def test_backstop_forces_the_exit(logged_errors):
    """A batch that never finishes: after --shutdown-timeout the exit is forced (logged at
    error level)."""
    service, clock, exits, _ = make(Deferred())
    service.stopService()
    clock.advance(14.9)
    assert exits == []
    clock.advance(0.2)
    assert exits == ["exit"]
    assert len(logged_errors.flush()) == 1
