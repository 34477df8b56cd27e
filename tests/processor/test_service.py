"""ProcessorService shutdown, driven by a Clock (no servers)."""

from __future__ import annotations

import sys
from typing import cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from teltonika.processor.service import (
    SWITCH_INTERVAL,
    ExitPolicy,
    Housekeeping,
    ProcessorService,
)
from tests.helpers import LoggedErrors, connection_double


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
        self.crashed: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        return self.ended

    def stop(self) -> Deferred[None]:
        return self.stopping


class FakeRedis:
    def __init__(self) -> None:
        self.closed = False

    def disconnect(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


def fake(service: ProcessorService) -> FakeConsumer:
    """The FakeConsumer that make() gave the service (typed as its real consumer)."""
    return cast(FakeConsumer, service.consumer)


def make(stopping: Deferred[None]) -> tuple[ProcessorService, Clock, list[str], FakeRedis]:
    clock = Clock()
    exits: list[str] = []
    redis = FakeRedis()
    service = ProcessorService(
        FakeConsumer(stopping),  # type: ignore[arg-type]  # the service calls start and stop
        [connection_double(redis)],
        clock,
        housekeeping=Housekeeping(stats_interval=1000),
        exits=ExitPolicy(
            shutdown_timeout=15,
            force_exit=lambda: exits.append("exit"),
            crash_exit=lambda: exits.append("crash"),
        ),
    )
    service.startService()
    return service, clock, exits, redis


def test_clean_shutdown_closes_everything_and_cancels_the_backstop() -> None:
    """When the batch in flight finishes, Redis and the database close and the backstop
    never fires."""
    finished: Deferred[None] = Deferred()
    service, clock, exits, redis = make(finished)
    done = service.stopService()
    assert done.called == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    finished.callback(None)
    assert done.called and redis.closed and fake(service).database.stopped
    clock.advance(60)
    assert exits == []


def test_backstop_forces_the_exit(logged_errors: LoggedErrors) -> None:
    """A batch that never finishes: after --shutdown-timeout the exit is forced (logged at
    error level)."""
    service, clock, exits, _ = make(Deferred())
    service.stopService()
    clock.advance(14.9)
    assert exits == []
    clock.advance(0.2)
    assert exits == ["exit"]
    assert len(logged_errors.flush()) == 1


def test_switch_interval_is_restored_at_stop() -> None:
    """The process-wide GIL switch interval is shortened while the processor runs and put
    back as it was once it stopped."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        finished: Deferred[None] = Deferred()
        service, _, _, _ = make(finished)
        assert sys.getswitchinterval() == SWITCH_INTERVAL
        service.stopService()
        finished.callback(None)
        assert sys.getswitchinterval() == 0.004
    finally:
        sys.setswitchinterval(before)


def test_switch_interval_is_restored_once_by_the_last_service() -> None:
    """Two processor services in one process: the interval is restored to the original
    (not to the one the first service set) when the last one stops, never while one
    still runs; a service restarted, or stopped twice, counts once."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        first, _, _, _ = make(succeed(None))
        second, _, _, _ = make(succeed(None))
        assert sys.getswitchinterval() == SWITCH_INTERVAL
        first.stopService()
        first.stopService()
        assert sys.getswitchinterval() == SWITCH_INTERVAL  # the second still runs
        first.startService()
        first.stopService()
        assert sys.getswitchinterval() == SWITCH_INTERVAL
        second.stopService()
        assert sys.getswitchinterval() == 0.004
        first.startService()
        assert sys.getswitchinterval() == SWITCH_INTERVAL
        first.stopService()
        assert sys.getswitchinterval() == 0.004
    finally:
        sys.setswitchinterval(before)


def test_a_crashed_consumer_makes_the_process_exit(logged_errors: LoggedErrors) -> None:
    """When the consumer's loop ends because it crashed, the service logs it as critical and
    asks for the non-zero exit; a loop that ended normally asks for nothing."""
    service, _, exits, _ = make(Deferred())
    consumer = fake(service)
    consumer.crashed = Failure(RuntimeError("boom"))
    consumer.ended.callback(None)
    assert exits == ["crash"]
    (event,) = logged_errors.flush()
    assert "exiting with status {status}" in event["log_format"] and event["status"] == 70

    service.stopService()

    service, _, exits, _ = make(Deferred())
    fake(service).ended.callback(None)
    assert exits == []
    service.stopService()
