"""Device authorities: open, file (reload on change / SIGHUP), bounded Redis lookups and
spec parsing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from teltonika.authority import (
    AuthorityBusyError,
    AuthoritySpecError,
    AuthorityTimeoutError,
    AuthorityUnavailableError,
    FileAuthority,
    OpenAuthority,
    RedisSetAuthority,
    parse_authority_spec,
)
from teltonika.metrics import ServerMetrics
from tests.helpers import (
    IMEI,
    LOGIN,
    OTHER_IMEI,
    Harness,
    connection_double,
    failureResultOf,
    successResultOf,
)


def test_open() -> None:
    assert successResultOf(OpenAuthority().is_allowed(IMEI)) is True


def test_spec() -> None:
    assert parse_authority_spec("open") == ("open", "")
    assert parse_authority_spec("file:/etc/x") == ("file", "/etc/x")
    assert parse_authority_spec("redis:fleet:allowed") == ("redis", "fleet:allowed")
    for bad in ("", "file:", "redis", "other:x"):
        with pytest.raises(AuthoritySpecError):
            parse_authority_spec(bad)


def test_file_reloaded_on_change(tmp_path: Path) -> None:
    """A changed file is picked up by the periodic check without a restart."""
    path = tmp_path / "devices"
    path.write_text(IMEI + "\n")
    clock = Clock()
    authority = FileAuthority(path, clock, poll_interval=5)
    authority.start()
    assert successResultOf(authority.is_allowed(IMEI)) is True
    assert successResultOf(authority.is_allowed(OTHER_IMEI)) is False
    path.write_text(f"{IMEI}\n{OTHER_IMEI}\n")
    os.utime(path, ns=(1, 1))  # a distinct mtime even on coarse filesystems
    clock.advance(5)
    assert successResultOf(authority.is_allowed(OTHER_IMEI)) is True
    authority.stop()
    assert clock.getDelayedCalls() == []


def test_file_unreadable_keeps_old_list(tmp_path: Path, logged_errors: Any) -> None:
    """A reload that fails keeps the previous list and logs an error."""
    path = tmp_path / "devices"
    path.write_text(IMEI + "\n")
    authority = FileAuthority(path, Clock())
    path.write_bytes(b"\xff\xfe\n")
    authority.reload()
    assert authority.allowed == {IMEI}
    assert len(logged_errors.flush()) == 1


class _SilentRedis:
    """A connection whose commands never get an answer (Redis down, txredisapi queueing)."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> Deferred[Any]:
        self.commands.append(args)
        return Deferred()


def _redis_authority(**kwargs: Any) -> tuple[RedisSetAuthority, _SilentRedis, Clock, ServerMetrics]:
    redis, clock, metrics = _SilentRedis(), Clock(), ServerMetrics.create(CollectorRegistry())
    authority = RedisSetAuthority(
        lambda: connection_double(redis), "fleet", clock, metrics, **kwargs
    )
    return authority, redis, clock, metrics


def _failures(metrics: ServerMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "teltonika_authority_failures_total", {"reason": reason}
    )
    return value or 0.0


def test_redis_lookup_times_out() -> None:
    """A lookup Redis does not answer fails after the timeout and frees its slot."""
    authority, _redis, clock, metrics = _redis_authority(timeout=5.0)
    d = authority.is_allowed(IMEI)
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    failureResultOf(d, AuthorityTimeoutError)
    assert authority.in_flight == 0
    assert _failures(metrics, "timeout") == 1


def test_redis_lookups_in_flight_are_bounded() -> None:
    """Beyond max_in_flight lookups a new one fails at once, without a command to Redis."""
    authority, redis, clock, metrics = _redis_authority(max_in_flight=2, timeout=5.0)
    waiting = [authority.is_allowed(IMEI), authority.is_allowed(OTHER_IMEI)]
    failureResultOf(authority.is_allowed(IMEI), AuthorityBusyError)
    assert len(redis.commands) == 2
    assert _failures(metrics, "busy") == 1
    clock.advance(5.0)
    for d in waiting:
        failureResultOf(d, AuthorityTimeoutError)
    assert not authority.is_allowed(IMEI).called  # a slot is free again


def test_redis_lookup_refused_at_once_while_redis_is_unavailable() -> None:
    """While the sink finds Redis unreachable, nothing is sent (txredisapi would queue it
    until Redis is back) and the lookup fails at once."""
    authority, redis, _clock, metrics = _redis_authority(available=lambda: False)
    failureResultOf(authority.is_allowed(IMEI), AuthorityUnavailableError)
    assert redis.commands == []
    assert _failures(metrics, "unavailable") == 1


def test_tcp_login_refused_with_00_when_the_lookup_times_out(logged_errors: Any) -> None:
    """Over TCP a lookup that times out refuses the login: 00, then the connection closes
    (long before the login timeout)."""
    redis = _SilentRedis()
    h = Harness(login_timeout=30.0)
    h.factory.authority = RedisSetAuthority(
        lambda: connection_double(redis), "fleet", h.clock, h.metrics, timeout=5.0
    )
    proto, transport = h.connect()
    proto.dataReceived(LOGIN)
    assert transport.value() == b""
    h.clock.advance(5.0)
    assert transport.value() == b"\x00"
    assert transport.disconnecting
    assert h.sample("teltonika_logins_total", result="error") == 1
    assert h.sample("teltonika_authority_failures_total", reason="timeout") == 1
    assert len(logged_errors.flush()) == 1
