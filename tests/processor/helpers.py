"""Helpers for the processor tests: entry builders using the ingestion side's own
encoder, polling on the reactor, SQL and HTTP shortcuts, the processor's options, a group
of in-process processor services, and the stream and metric readings several test
modules check (the fixtures are in conftest.py)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import psycopg
import redis
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from teltonika.contract import TELEMETRY_STREAM, entry_fields
from teltonika.interfaces import IProcessReactor
from teltonika.processor.tap import Options, makeService
from teltonika.wire.records import NX, AVLRecord
from tests import helpers

BASE_MS = 1_700_000_000_000


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


eventually = partial(helpers.eventually, timeout=15.0, step=0.05)
"""The shared :func:`tests.helpers.eventually`, paced for the processor: its predicates
query Redis and PostgreSQL with blocking clients that hold the reactor while they run, so
they poll less often (and a processor test may take longer)."""


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


DEAD = "telemetry:teltonika:dead"


def pending(rds: redis.Redis, group: str = "processor") -> int | None:
    """Pending count of the group (None while the group does not exist yet)."""
    try:
        pending: int = rds.xpending(TELEMETRY_STREAM, group)["pending"]
        return pending
    except redis.ResponseError:
        return None


def sample(service: Any, name: str, **labels: str) -> float:
    value = service.processor.consumer.metrics.registry.get_sample_value(name, labels)
    return float(value or 0)


def count(dsn: str) -> int | None:
    """Rows in positions (None before the migrations created the table)."""
    try:
        rows: int = query(dsn, "select count(*) from positions")[0][0]
        return rows
    except psycopg.errors.UndefinedTable:
        return None


__all__ = [
    "BASE_MS",
    "DEAD",
    "NX",
    "count",
    "entry",
    "eventually",
    "execute",
    "http_status",
    "imei",
    "pending",
    "query",
    "record",
    "sample",
    "xadd",
    "xrange",
]
