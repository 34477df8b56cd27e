"""Fixtures for the processor: a throwaway PostgreSQL cluster per session, a fresh
database per test, entry builders using the ingestion side's own encoder, and a
running in-process processor service.

A missing PostgreSQL fails the session (tests/servers.py raises), it is never skipped.
"""

from __future__ import annotations

import itertools
import os
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, cast

import psycopg
import pytest
import pytest_twisted
import redis
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from teltonika.contract import TELEMETRY_STREAM, entry_fields
from teltonika.interfaces import IProcessReactor
from teltonika.processor.tap import Options, makeService
from teltonika.wire.records import NX, AVLRecord

BASE_MS = 1_700_000_000_000
_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    from tests.servers import PostgresServer

    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_dsn(postgres_server: Any) -> Iterator[str]:
    """A fresh, empty database for this test."""
    name = f"test_{next(_databases)}"
    if not postgres_server.running():
        postgres_server.start()
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres_server.dsn(name)
    if not postgres_server.running():
        postgres_server.start()
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def rds(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def record(
    ts_offset_ms: int = 0,
    *,
    latitude: float = 54.6872,
    longitude: float = 25.2797,
    io: tuple[Any, ...] = ((1, 1, 1), (66, 2, 12480), (16, 4, 123456)),
    speed: int = 42,
) -> AVLRecord:
    return AVLRecord(
        timestamp_ms=BASE_MS + ts_offset_ms,
        priority=0,
        longitude=longitude,
        latitude=latitude,
        altitude=112,
        angle=270,
        satellites=9,
        speed=speed,
        event_io_id=0,
        io=io,
    )


def entry(
    imei: str = "356307042441013",
    rec: AVLRecord | None = None,
    codec: str = "8E",
    received_at_ms: int | None = None,
) -> list[bytes]:
    rec = rec or record()
    return entry_fields(imei, codec, rec, received_at_ms or rec.timestamp_ms + 1500, "ingest-test")


def xadd(client: redis.Redis, fields: Sequence[bytes | str], stream: str = TELEMETRY_STREAM) -> str:
    """XADD a flat field/value list (as entry_fields returns it)."""
    flat = list(fields)
    mapping: dict[Any, Any] = {}
    pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    for name, value in pairs:
        mapping[name] = value
    # the rds client decodes responses (str); a pipeline answers itself, and the tests that
    # queue on one ignore what this returns
    return cast(str, client.xadd(stream, mapping))


def xrange(
    client: redis.Redis,
    stream: str = TELEMETRY_STREAM,
    min: str = "-",
    count: int | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """XRANGE typed as the ``rds`` client returns it: that client decodes responses, so ids
    and fields are ``str`` (redis-py's own types allow bytes, and None, for any client)."""
    return cast("list[tuple[str, dict[str, str]]]", client.xrange(stream, min=min, count=count))


def imei(n: int) -> str:
    return f"35630704{n:07d}"


async def eventually(
    predicate: Callable[[], Any], timeout: float = 15.0, step: float = 0.05
) -> Any:
    """Poll *predicate* (sync) on the reactor until it returns a truthy value."""
    waited = 0.0
    while True:
        value = predicate()
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await deferLater(reactor, step, lambda: None)
        waited += step


async def http_status(port: int, path: str) -> int:
    """GET on the ops endpoint (in a thread: the server side runs on this reactor)."""

    def get() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    status: int = await deferToThread(get)
    return status


def execute(dsn: str, sql: str, *params: Any) -> None:
    """Run one statement that returns no rows (DDL, DML) in autocommit."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql, params or None)


def slow_inserts(dsn: str, seconds: float, *, each: str = "STATEMENT") -> None:
    """Make every INSERT into positions sleep *seconds* first: once per statement, or
    (``each="ROW"``) once per row; the rows are still written."""
    returned = "NEW" if each == "ROW" else "NULL"
    execute(
        dsn,
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN {returned}; END $$",
    )
    execute(
        dsn,
        f"CREATE TRIGGER slow BEFORE INSERT ON positions FOR EACH {each} EXECUTE FUNCTION slow()",
    )


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params or None).fetchall()


def processor_options(redis_url: str, dsn: str, *extra: str) -> Options:
    options = Options()
    options.parseOptions(
        [
            "--redis",
            redis_url,
            "--postgres",
            dsn,
            "--metrics",
            "off",
            "--consumer",
            "c1",
            "--block-ms",
            "100",
            "--retry-max",
            "0.5",
            "--stats-interval",
            "0.5",
            *extra,
        ]
    )
    return options


class Processors:
    """Start in-process processor services; all are stopped at teardown."""

    def __init__(self, redis_url: str, dsn: str) -> None:
        self.redis_url = redis_url
        self.dsn = dsn
        self.running: list[Any] = []
        self.exits: list[Any] = []
        """Services that asked for the process to exit non-zero (a crash, a refused start)."""

    def start(self, *extra: str) -> Any:
        options = processor_options(self.redis_url, self.dsn, *extra)
        service = makeService(options, cast(IProcessReactor, reactor))  # as twistd does
        service.processor.force_exit = lambda: None
        service.processor.crash_exit = lambda: self.exits.append(service)
        service.startService()
        self.running.append(service)
        return service

    async def stop(self, service: Any) -> None:
        if service in self.running:
            self.running.remove(service)
            await service.stopService()

    async def stop_all(self) -> None:
        for service in list(self.running):
            await self.stop(service)


@pytest_twisted.async_yield_fixture
async def processors(redis_url: str, pg_dsn: str) -> AsyncIterator[Processors]:
    group = Processors(redis_url, pg_dsn)
    try:
        yield group
    finally:
        await group.stop_all()


__all__ = [
    "BASE_MS",
    "NX",
    "entry",
    "eventually",
    "execute",
    "http_status",
    "imei",
    "query",
    "record",
    "xadd",
    "xrange",
]


if os.environ.get("TELTONIKA_TEST_LOG"):
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
    from zope.interface import provider

    @provider(ILogObserver)
    def print_event(event: LogEvent) -> None:
        print("LOG", formatEvent(event), file=sys.stderr)

    globalLogPublisher.addObserver(print_event)
