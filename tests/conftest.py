"""Suite-wide fixtures.

* ``observe_errors`` (autouse): fails any test that logged an error through
  ``twisted.logger`` without claiming it, as trial does for free and pytest does not
  (the magic-wormhole client's ``observe_errors`` is the model). A test that provokes
  errors on purpose takes the ``logged_errors`` fixture and calls ``.flush(...)``.
* ``redis_server`` (one throwaway redis-server per session) and ``redis_url`` (emptied for
  each test); ``connect`` (a factory of txredisapi connections to it, all closed at
  teardown) and ``redis`` (one such connection).
* Hypothesis profiles: ``ci`` (deterministic, bounded) is chosen when ``CI`` is set.

Helpers are in importable modules (``tests/helpers.py`` and the packages' ``helpers``),
never in a conftest: no test module imports a conftest or another test module.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, settings
from twisted.logger import formatEvent, globalLogPublisher

from teltonika.redis.connect import lazy_connection, parse_redis_url
from tests.helpers import LoggedErrors

settings.register_profile(
    "ci",
    max_examples=200,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def logged_errors(observe_errors: LoggedErrors) -> LoggedErrors:
    """Claim errors a test provokes on purpose; see the module docstring."""
    return observe_errors


@pytest.fixture(autouse=True)
def observe_errors() -> Iterator[LoggedErrors]:
    observed = LoggedErrors()
    globalLogPublisher.addObserver(observed)
    try:
        yield observed
    finally:
        globalLogPublisher.removeObserver(observed)
    if observed.events:
        lines = []
        for event in observed.events:
            failure = event.get("log_failure")
            text = formatEvent(event)
            if failure is not None:
                text += "\n" + failure.getTraceback()
            lines.append(text)
        pytest.fail("errors were logged during the test:\n" + "\n".join(lines))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """One throwaway redis-server for the whole session (see tests/servers.py)."""
    from tests.servers import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    """The session's Redis, emptied for this test (tests run one at a time)."""
    redis_server.cli("FLUSHALL")
    url: str = redis_server.url
    return url


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
