"""Helpers that several test packages share (conftest files hold only fixtures).

Deferred results read synchronously (Twisted's ``successResultOf`` and friends, once for
the suite), frames and records, a controllable sink, device authorities (one that knows a
set, one that decides when the test says), a connected device protocol, command frames,
the error-event collector behind the ``logged_errors`` fixture, the ``teltonika
simulate`` child process, and :func:`eventually` for tests that run real servers.
"""

from __future__ import annotations

import inspect
import queue
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import ILogObserver, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from teltonika.codecs import CodecRegistry
from teltonika.commands.codec import encode_command
from teltonika.interfaces import IDeviceAuthority, IManagedSink, IProcessReactor
from teltonika.metrics import ServerMetrics
from teltonika.protocol.settings import ServerSettings
from teltonika.protocol.tcp import DeviceFactory, DeviceProtocol
from teltonika.redis.connection import RedisConnection
from teltonika.wire import CODEC_8E, CODEC_12, AVLRecord, encode_avl_frame, encode_login
from teltonika.wire.builtin_codecs import BUILTIN_CODECS
from tests.servers import REPO, checkout_env

IMEI = "356307042441013"
OTHER_IMEI = "490154203237518"

_sync = SynchronousTestCase()
successResultOf = _sync.successResultOf  # noqa: N816 (Twisted's name; typed there)


def failureResultOf(deferred: Deferred[Any], *expected: type[BaseException]) -> Failure:
    """Twisted's ``failureResultOf`` with a signature (Twisted leaves it untyped): the
    Failure *deferred* already holds, one of *expected* when any are named; the test fails
    if it holds none, a success, or another error."""
    failure: Failure = _sync.failureResultOf(deferred, *expected)
    return failure


def assertNoResult(deferred: Deferred[Any]) -> None:
    """Twisted's ``assertNoResult`` with a signature (Twisted leaves it untyped): the test
    fails if *deferred* has fired."""
    _sync.assertNoResult(deferred)


def record(n: int = 0, io: tuple[Any, ...] = ((1, 1, 1), (16, 4, 123456))) -> AVLRecord:
    """A plausible record; *n* varies the timestamp so records are distinguishable."""
    return AVLRecord(
        timestamp_ms=1_700_000_000_000 + n * 1000,
        priority=1,
        longitude=25.2797,
        latitude=54.6872,
        altitude=112,
        angle=90,
        satellites=9,
        speed=42,
        event_io_id=0,
        io=io,
    )


def avl_frame(count: int = 1, codec_id: int = CODEC_8E, start: int = 0) -> bytes:
    return encode_avl_frame(codec_id, [record(start + i) for i in range(count)])


LOGIN = encode_login(IMEI)

COMMAND_IMEI = "352093081452251"
"""The device of the command tests (a codec 14 frame carries its IMEI)."""


def command_frame(text: str, codec: int = CODEC_12) -> bytes:
    """The codec 12 (or 14) command frame the server writes for *text*."""
    return encode_command(codec, text.encode(), COMMAND_IMEI)


def process_reactor(reactor: MemoryReactorClock) -> IProcessReactor:
    """*reactor* where a service tree asks for the process's reactor. A memory reactor has
    no UDP and (unless it is a :class:`ThreadedMemoryReactor`) no ``callFromThread``: the
    tests that pass one never reach those."""
    return cast(IProcessReactor, reactor)


def connection_double(double: object) -> RedisConnection:
    """*double* where the code under test takes a :class:`RedisConnection`: a test double
    that answers only the calls that code makes on the path the test drives (a command
    held unanswered, a connection that is down). The whole protocol is exercised against
    a real redis-server elsewhere."""
    return cast(RedisConnection, double)


class ThreadedMemoryReactor(MemoryReactorClock):
    """A MemoryReactorClock that also takes ``callFromThread`` (the file sink's writer
    thread reports through it): the calls wait in a queue until :meth:`run_until`."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.SimpleQueue[tuple[Any, tuple[Any, ...], dict[str, Any]]] = (
            queue.SimpleQueue()
        )

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.from_threads.put((f, args, kwargs))

    def run_until(self, done: Callable[[], object], timeout: float = 10.0) -> None:
        """Run the threads' calls until *done()* is true (at most *timeout* seconds)."""
        deadline = time.monotonic() + timeout
        while not done():
            f, args, kwargs = self.from_threads.get(timeout=max(0.0, deadline - time.monotonic()))
            f(*args, **kwargs)


@implementer(IManagedSink)
class ControlledSink:
    """A sink whose Deferreds the test fires (auto-fires successfully by default), with
    nothing to start or close."""

    name = "test"

    def __init__(self, auto: bool = True) -> None:
        self.auto = auto
        self.calls: list[tuple[str, str, tuple[AVLRecord, ...], int, Deferred[None]]] = []
        self.messages: list[tuple[str, dict[str, str], Deferred[None]]] = []
        self.is_ready = True

    def publish(
        self, imei: str, codec_name: str, records: Any, received_at_ms: int
    ) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.calls.append((imei, codec_name, records, received_at_ms, d))
        if self.auto:
            d.callback(None)
        return d

    def publish_message(self, imei: str, message: dict[str, str]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.messages.append((imei, message, d))
        if self.auto:
            d.callback(None)
        return d

    def ready(self) -> bool:
        return self.is_ready

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@implementer(IDeviceAuthority)
class SetAuthority:
    def __init__(self, allowed: set[str] | None = None, error: Exception | None = None) -> None:
        self.allowed = allowed
        self.error = error

    def is_allowed(self, imei: str) -> Deferred[bool]:
        if self.error is not None:
            return fail(self.error)
        return succeed(self.allowed is None or imei in self.allowed)


@implementer(IDeviceAuthority)
class PendingAuthority:
    """A device authority that decides when the test says (a slow Redis lookup)."""

    def __init__(self) -> None:
        self.pending: list[Deferred[bool]] = []

    def is_allowed(self, imei: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.pending.append(d)
        return d


class Harness:
    """A factory with a Clock, a fresh metrics registry and a controllable sink."""

    def __init__(
        self,
        sink: Any = None,
        authority: Any = None,
        **settings: Any,
    ) -> None:
        self.clock = Clock()
        self.metrics = ServerMetrics.create(CollectorRegistry())
        self.sink = sink if sink is not None else ControlledSink()
        self.factory = DeviceFactory(
            CodecRegistry(BUILTIN_CODECS),
            self.sink,
            authority if authority is not None else SetAuthority(),
            self.metrics,
            self.clock,
            ServerSettings(**settings),
        )

    def connect(self) -> tuple[DeviceProtocol, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def login(self) -> tuple[DeviceProtocol, StringTransport]:
        proto, transport = self.connect()
        proto.dataReceived(LOGIN)
        assert transport.value() == b"\x01"
        transport.clear()
        return proto, transport

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value


@implementer(ILogObserver)
class LoggedErrors:
    """Error-level events logged during one test."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if event.get("log_failure") is not None or level in (LogLevel.error, LogLevel.critical):
            self.events.append(event)

    def flush(self, *formats: str) -> list[dict[str, Any]]:
        """Claim (and return) the logged errors, optionally only those with these formats."""
        if not formats:
            claimed, self.events = self.events, []
            return claimed
        claimed = [e for e in self.events if e.get("log_format") in formats]
        self.events = [e for e in self.events if e.get("log_format") not in formats]
        return claimed


async def simulate(*argv: str) -> tuple[int, str, str]:
    """Run ``python -m teltonika simulate ARGV`` in a child process, without blocking the
    reactor; return its exit status, stdout and stderr."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "teltonika", "simulate", *argv], env=checkout_env(), path=str(REPO)
    )
    return code, out.decode(), err.decode()


async def eventually(
    predicate: Callable[[], object], timeout: float = 10.0, step: float = 0.01
) -> Any:
    """Poll *predicate* (sync, or returning something to await) on the reactor every
    *step* seconds until it gives a truthy value, and return that value; fail after
    *timeout* seconds.

    Only for tests that run real servers (Redis, PostgreSQL, TCP): there is no event to
    wait on across processes.
    """
    waited = 0.0
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await deferLater(reactor, step, lambda: None)
        waited += step
