"""One ``--instance-id`` per Redis per host (``teltonika/services/instance_lock.py``).

The twistd processes refusing a duplicate end to end: ``tests/deploy/test_scale_out.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock

from teltonika.services.instance_lock import (
    InstanceLock,
    InstanceLockService,
    InstanceTaken,
    lock_name,
    redis_target,
)
from teltonika.tap import Options, build_service
from tests.helpers import LoggedErrors, process_reactor

URL = "redis://:secret@10.0.0.5:6379/0"


@pytest.fixture
def locks() -> Iterator[list[InstanceLock]]:
    held: list[InstanceLock] = []
    yield held
    for lock in held:
        lock.release()


def _lock(locks: list[InstanceLock], instance_id: str, url: str = URL) -> InstanceLock:
    lock = InstanceLock(instance_id, url)
    locks.append(lock)
    return lock


def test_redis_target_drops_credentials_and_keeps_hosts_and_path() -> None:
    assert redis_target(URL) == "redis://10.0.0.5:6379/0"
    assert redis_target("redis://user:pw@Host:1") == "redis://host:1/0"
    assert (
        redis_target("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/2")
        == "redis+sentinel://s1:26379,s2:26379/mymaster/2"
    )


@given(st.text(min_size=1, max_size=300), st.text(max_size=300))
def test_lock_name_is_a_bounded_abstract_name(instance_id: str, url: str) -> None:
    name = lock_name(instance_id, "redis://" + url)
    assert name.startswith(b"\0") and len(name) < 108  # sun_path


def test_a_second_holder_of_the_same_id_and_redis_is_refused(locks: list[InstanceLock]) -> None:
    assert _lock(locks, "edge-1").acquire()
    with pytest.raises(InstanceTaken, match="--instance-id 'edge-1'") as taken:
        _lock(locks, "edge-1", "redis://10.0.0.5:6379/0").acquire()  # no password: same Redis
    assert "secret" not in str(taken.value)
    assert "redis://10.0.0.5:6379/0" in str(taken.value)


def test_other_ids_and_other_redis_deployments_are_independent(locks: list[InstanceLock]) -> None:
    assert _lock(locks, "edge-1").acquire()
    assert _lock(locks, "edge-2").acquire()
    assert _lock(locks, "edge-1", "redis://10.0.0.6:6379/0").acquire()
    assert _lock(locks, "edge-1", "redis://10.0.0.5:6379/1").acquire()


def test_release_frees_the_name(locks: list[InstanceLock]) -> None:
    first = _lock(locks, "edge-1")
    first.acquire()
    first.release()
    assert _lock(locks, "edge-1").acquire()


def test_service_exits_with_one_critical_line(
    locks: list[InstanceLock], logged_errors: LoggedErrors
) -> None:
    _lock(locks, "edge-1").acquire()
    service = InstanceLockService(_lock(locks, "edge-1"))
    with pytest.raises(SystemExit) as exited:
        service.privilegedStartService()
    assert exited.value.code == 1
    [event] = logged_errors.flush("Refusing to start: {error}")
    assert "give every process its own --instance-id" in event["error"]


def test_service_takes_the_lock_once_and_releases_it(locks: list[InstanceLock]) -> None:
    lock = _lock(locks, "edge-1")
    service = InstanceLockService(lock)
    service.privilegedStartService()
    service.startService()  # twistd calls both: taken once
    with pytest.raises(InstanceTaken):
        _lock(locks, "edge-1").acquire()
    service.release()
    assert _lock(locks, "edge-1").acquire()


def test_make_service_adds_the_lock_first_with_redis_only(tmp_path: object) -> None:
    options = Options()
    options.parseOptions(["--redis", "redis://127.0.0.1:1/0", "--metrics", "off"])
    service = build_service(
        options, process_reactor(MemoryReactorClock()), on_fatal=lambda message: None
    )
    names = [child.name for child in service]
    assert names[0] == "instance-lock" and names[1] == "ingestion"
    options = Options()
    options.parseOptions(["--output", f"{tmp_path}/r.jsonl", "--metrics", "off"])
    service = build_service(
        options, process_reactor(MemoryReactorClock()), on_fatal=lambda message: None
    )
    assert "instance-lock" not in [child.name for child in service]
