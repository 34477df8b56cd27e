"""Fixtures for the command tests: txredisapi connections to the throwaway Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_twisted
from prometheus_client import CollectorRegistry

from teltonika.commands.metrics import CommandMetrics
from teltonika.redis.connect import lazy_connection, parse_redis_url


@pytest_twisted.async_yield_fixture
async def connect(redis_url: str) -> AsyncIterator[Callable[[], Any]]:
    """A factory of txredisapi connections (utf-8) to the test's Redis; all are closed."""
    made: list[Any] = []

    def make() -> Any:
        conn = lazy_connection(parse_redis_url(redis_url))
        made.append(conn)
        return conn

    yield make
    for conn in made:
        await conn.disconnect()


@pytest_twisted.async_yield_fixture
async def redis(connect: Callable[[], Any]) -> AsyncIterator[Any]:
    conn = connect()
    await conn.ping()
    yield conn


def fresh_metrics() -> tuple[CommandMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return CommandMetrics.create(registry), registry
