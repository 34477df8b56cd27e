"""Fixtures for the live broadcast: ``live_env`` (a Redis and a fresh PostgreSQL
database per test module, and the live processors started on them) and ``clients``
(the WebSocket clients a test opened, dropped at teardown). The helpers are in
tests/processor/live/helpers.py."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
import pytest_twisted
from twisted.internet.interfaces import ITCPTransport

from tests.processor.live.helpers import Client, Env, sleep
from tests.servers import RedisServer

_databases = itertools.count()


@pytest.fixture(scope="module")
def live_env(postgres_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    server = RedisServer().start()
    name = f"live_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    env = Env(server, postgres_server.dsn(name), tmp_path_factory.mktemp("live"))
    try:
        yield env
    finally:
        env.close()
        server.cleanup()
        with psycopg.connect(postgres_server.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest_twisted.async_yield_fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Clients opened by a test; dropped at teardown."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        if client.transport is not None:
            ITCPTransport(client.transport).abortConnection()
    await sleep(0.01)
