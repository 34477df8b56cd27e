"""Suite-wide fixtures.

* ``observe_errors`` (autouse): fails any test that logged an error through
  ``twisted.logger`` without claiming it, as trial does for free and pytest does not
  (the magic-wormhole client's ``observe_errors`` is the model). A test that provokes
  errors on purpose takes the ``logged_errors`` fixture and calls ``.flush(...)``.
* Hypothesis profiles: ``ci`` (deterministic, bounded) is chosen when ``CI`` is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

settings.register_profile(
    "ci",
    max_examples=200,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


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
