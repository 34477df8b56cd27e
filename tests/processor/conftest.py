"""Fixtures for the processor: a throwaway PostgreSQL cluster per session, a fresh
database per test, a redis-py client, and running in-process processor services (the
helpers are in tests/processor/helpers.py).

A missing PostgreSQL fails the session (tests/servers.py raises), it is never skipped.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
import pytest_twisted
import redis

from tests.processor.helpers import Processors

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


@pytest_twisted.async_yield_fixture
async def processors(redis_url: str, pg_dsn: str) -> AsyncIterator[Processors]:
    group = Processors(redis_url, pg_dsn)
    try:
        yield group
    finally:
        await group.stop_all()


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
