"""Faults: PostgreSQL stopped mid-run, a processor SIGKILLed between COMMIT and XACK,
SIGTERM. Real servers, real twistd processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import cast

import attrs
import psycopg
import pytest
import pytest_twisted
import redis
from twisted.internet.defer import Deferred

from teltonika.contract import TELEMETRY_STREAM
from tests.helpers import LoggedErrors
from tests.processor.helpers import (
    Processors,
    count,
    entry,
    eventually,
    execute,
    http_status,
    imei,
    pending,
    query,
    record,
    sample,
    slow_inserts,
    xadd,
)
from tests.servers import PostgresServer, RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest_twisted.ensureDeferred
async def test_postgres_stopped_mid_run(
    processors: Processors,
    rds: redis.Redis,
    pg_dsn: str,
    postgres_server: PostgresServer,
    logged_errors: LoggedErrors,
) -> None:
    """While PostgreSQL is down nothing is acknowledged, /readyz answers 503, at most two
    batches are held (nothing more is read), and everything is written once it is back."""
    port = free_port()
    service = processors.start("--metrics", f"tcp:{port}:interface=127.0.0.1", "--batch-size", "5")
    consumer = service.processor.consumer
    for i in range(5):
        xadd(rds, entry(imei=imei(i), rec=record(i)))
    await eventually(lambda: count(pg_dsn) == 5 and pending(rds) == 0)
    assert await http_status(port, "/readyz") == 200

    postgres_server.stop("immediate")
    for i in range(5, 10):
        xadd(rds, entry(imei=imei(i), rec=record(i)))
    await eventually(
        lambda: sample(service, "teltonika_processor_postgres_errors_total", kind="connection") >= 3
    )
    for i in range(10, 60):  # arriving during the outage: not read while a batch is held
        xadd(rds, entry(imei=imei(i), rec=record(i)))
    await eventually(
        lambda: sample(service, "teltonika_processor_postgres_errors_total", kind="connection") >= 5
    )
    held = pending(rds)
    assert held is not None
    read = sample(service, "teltonika_processor_entries_read_total")
    assert sample(service, "teltonika_processor_entries_acked_total") == 5
    # what was read is held (one batch being retried, at most one read ahead), the rest
    # stays unread in the stream: memory is flat during the outage
    assert 1 <= held <= 10 and read == 5 + held
    await eventually(lambda: sample(service, "teltonika_processor_pending") == held)
    assert not consumer.ready()
    assert await http_status(port, "/readyz") == 503
    assert await http_status(port, "/healthz") == 200

    postgres_server.start()
    await eventually(lambda: pending(rds) == 0 and count(pg_dsn) == 60, timeout=30)
    assert query(pg_dsn, "select count(distinct (device_id, ts)) from positions")[0][0] == 60
    assert await http_status(port, "/readyz") == 200
    assert logged_errors.flush()  # the outage was logged at error level


def twistd(
    tmp_path: Path, redis_url: str, dsn: str, consumer: str, *extra: str, preamble: str = ""
) -> tuple[subprocess.Popen[bytes], Path]:
    """``twistd -n teltonika-processor`` as a child process (DSN from the environment);
    *preamble* is Python run first (to plant a fault)."""
    log = tmp_path / f"processor-{consumer}.log"
    args = [
        sys.executable,
        "-c",
        preamble + "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        f"--logfile={log}",
        "teltonika-processor",
        "--redis",
        redis_url,
        "--consumer",
        consumer,
        "--metrics",
        "off",
        "--block-ms",
        "100",
        "--retry-max",
        "0.5",
        *extra,
    ]
    env = dict(
        os.environ,
        TELTONIKA_POSTGRES_DSN=dsn,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    return subprocess.Popen(args, cwd=ROOT, env=env), log


@pytest.mark.parametrize("restart_as", ["same consumer", "another processor"])
@pytest_twisted.ensureDeferred
async def test_sigkill_between_commit_and_xack(
    restart_as: str,
    processors: Processors,
    rds: redis.Redis,
    redis_server: RedisServer,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    """A processor whose XACKs cannot succeed (a Redis ACL forbids XACK) commits its rows
    and is SIGKILLed with every entry still pending. Restarted under the same consumer
    name it re-reads its own pending entries; or another processor claims them after
    --claim-idle. Either way: every row exactly once, nothing left pending."""
    rds.execute_command("ACL", "SETUSER", "noack", "on", ">pw", "~*", "&*", "+@all", "-xack")
    ids = [xadd(rds, entry(imei=imei(i % 7), rec=record(i))) for i in range(40)]
    url = f"redis://noack:pw@127.0.0.1:{redis_server.port}/0"
    child, log = twistd(tmp_path, url, pg_dsn, "c1", "--batch-size", "15")
    try:
        # XACKs refused: batch 1 committed and retrying its XACK, batch 2 committed while
        # batch 1 waits for its XACK, batch 3 (the last 10) read ahead and held back,
        # since at most one batch may wait for its XACK while another is written
        await eventually(lambda: count(pg_dsn) == 30 and pending(rds) == 40, timeout=30)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert "NOPERM" in log.read_text()  # it really was stuck between COMMIT and XACK
    assert pending(rds) == 40 and count(pg_dsn) == 30

    if restart_as == "same consumer":
        service = processors.start("--consumer", "c1", "--batch-size", "15")
    else:
        service = processors.start(
            "--consumer",
            "c2",
            "--claim-idle",
            "0.3",
            "--claim-interval",
            "0.2",
            "--batch-size",
            "15",
        )
    await eventually(lambda: pending(rds) == 0 and count(pg_dsn) == 40, timeout=20)
    assert query(pg_dsn, "select count(distinct (device_id, ts)) from positions")[0][0] == 40
    assert sample(service, "teltonika_processor_duplicates_total") == 30
    assert sample(service, "teltonika_processor_rows_inserted_total") == 10
    if restart_as == "another processor":
        assert sample(service, "teltonika_processor_entries_claimed_total") == 40
    assert rds.xlen(TELEMETRY_STREAM) == len(ids)
    rds.execute_command("ACL", "DELUSER", "noack")


@pytest_twisted.ensureDeferred
async def test_sigterm_finishes_and_exits(
    rds: redis.Redis, redis_url: str, pg_dsn: str, tmp_path: Path
) -> None:
    """SIGTERM: the running processor finishes its batch, acknowledges, closes and exits
    (logging the lifecycle on the way)."""
    for i in range(25):
        xadd(rds, entry(imei=imei(i), rec=record(i)))
    child, log = twistd(tmp_path, redis_url, pg_dsn, "c1")
    try:
        await eventually(lambda: count(pg_dsn) == 25 and pending(rds) == 0, timeout=30)
        for i in range(25, 50):
            xadd(rds, entry(imei=imei(i), rec=record(i)))
        child.send_signal(signal.SIGTERM)
        await eventually(lambda: child.poll() is not None, timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    # twistd re-raises the signal once its clean shutdown is done
    assert child.returncode in (0, -signal.SIGTERM)
    text = log.read_text()
    for line in (
        "PostgreSQL connected",
        "Migrations applied",
        "Redis connected",
        "joined group processor",
        "Processor ready",
        "Processor stopped",
    ):
        assert line in text
    # whatever was read before SIGTERM is committed and acknowledged: no entry is
    # both pending and stored, and nothing stored is unacknowledged.
    stored = count(pg_dsn)
    assert stored is not None
    assert stored + pending_or_unread(rds) == 50


def pending_or_unread(rds: redis.Redis) -> int:
    info = next(g for g in rds.xinfo_groups(TELEMETRY_STREAM) if g["name"] == "processor")
    assert info["pending"] == 0
    return int(info["lag"] or 0)


@pytest_twisted.ensureDeferred
async def test_redis_restarted_mid_run(
    processors: Processors,
    rds: redis.Redis,
    redis_server: RedisServer,
    pg_dsn: str,
    logged_errors: LoggedErrors,
) -> None:
    """Redis crashing (and coming back empty) makes the processor not ready; it reconnects
    by itself, recreates its group and stores what arrives afterwards."""
    service = processors.start()
    consumer = service.processor.consumer
    await eventually(consumer.ready)
    xadd(rds, entry(imei=imei(1), rec=record(0)))
    await eventually(lambda: count(pg_dsn) == 1)
    redis_server.kill()
    await eventually(lambda: not consumer.redis_ok, timeout=20)
    assert not consumer.ready()
    redis_server.start()
    xadd(rds, entry(imei=imei(2), rec=record(1)))
    await eventually(lambda: count(pg_dsn) == 2 and pending(rds) == 0, timeout=30)
    await eventually(consumer.ready)
    assert logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_starts_before_postgres(
    processors: Processors,
    rds: redis.Redis,
    pg_dsn: str,
    postgres_server: PostgresServer,
    logged_errors: LoggedErrors,
) -> None:
    """Started while PostgreSQL is down, the processor waits (not ready, retrying), then
    migrates and consumes once PostgreSQL is up."""
    postgres_server.stop("fast")
    xadd(rds, entry(rec=record(0)))
    service = processors.start()
    consumer = service.processor.consumer
    await eventually(
        lambda: "Connecting to PostgreSQL" in [e.get("what") for e in logged_errors.events]
    )
    assert not consumer.ready()
    postgres_server.start()
    await eventually(lambda: count(pg_dsn) == 1 and pending(rds) == 0, timeout=30)
    assert consumer.ready()
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_held_entries_are_refreshed_and_never_taken_back(
    processors: Processors,
    rds: redis.Redis,
    pg_dsn: str,
    postgres_server: PostgresServer,
    logged_errors: LoggedErrors,
) -> None:
    """While PostgreSQL is down the processor keeps every entry it holds fresh, the
    read-ahead batch too, so a peer with a short --claim-idle finds nothing to claim; an
    entry a peer claimed anyway is not taken back (and is still written once)."""
    service = processors.start("--batch-size", "5", "--refresh-interval", "0.5")
    await eventually(service.processor.consumer.ready)
    postgres_server.stop("immediate")
    added = rds.pipeline(transaction=True)  # all at once: full batches to read
    for i in range(15):
        xadd(added, entry(imei=imei(i), rec=record(i)))
    added.execute()
    errors = "teltonika_processor_postgres_errors_total"
    # 5 being written, 5 read ahead; then at least 3 s of retries (every <= 0.5 s)
    await eventually(lambda: pending(rds) == 10)
    await eventually(lambda: sample(service, errors, kind="connection") >= 8, timeout=30)
    claimable = rds.xautoclaim(TELEMETRY_STREAM, "processor", "peer", 2000, justid=True)
    assert claimable == []

    claimed = rds.xclaim(TELEMETRY_STREAM, "processor", "peer", 0, [ids(rds)[-1]], justid=True)
    (taken,) = cast("list[str]", claimed)  # justid: the ids alone
    seen = sample(service, errors, kind="connection")
    await eventually(lambda: sample(service, errors, kind="connection") >= seen + 2)
    owner = rds.xpending_range(TELEMETRY_STREAM, "processor", taken, taken, 1)[0]["consumer"]
    assert owner == "peer"
    assert sample(service, "teltonika_processor_entries_taken_over_total") == 1

    postgres_server.start()
    await eventually(lambda: count(pg_dsn) == 15 and pending(rds) == 0, timeout=30)
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_held_entries_stay_fresh_while_a_write_is_slow(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """Refreshing is a timer, not a step of the retry loop: while one write is slow but
    does not fail (a trigger sleeping 3 s, under a 10 s --statement-timeout), the batch
    being written and the one read ahead are refreshed every --refresh-interval, so none
    of them ever idles long enough for a peer with a short --claim-idle to claim it."""
    service = processors.start(
        "--batch-size", "3", "--refresh-interval", "0.3", "--statement-timeout", "10"
    )
    consumer = service.processor.consumer
    await eventually(consumer.ready)
    slow_inserts(pg_dsn, 3)
    added = rds.pipeline(transaction=True)
    for i in range(6):
        xadd(added, entry(imei=imei(i), rec=record(i)))
    added.execute()
    await eventually(lambda: pending(rds) == 6)
    refreshed = "teltonika_processor_entries_refreshed_total"
    await eventually(lambda: sample(service, refreshed) >= 12)  # 2 refreshes of all 6
    assert count(pg_dsn) == 0  # the first write is still sleeping
    rows = rds.xpending_range(TELEMETRY_STREAM, "processor", "-", "+", 10)
    assert len(rows) == 6 and max(int(row["time_since_delivered"]) for row in rows) < 1500
    assert rds.xautoclaim(TELEMETRY_STREAM, "processor", "peer", 1500, justid=True) == []
    await eventually(lambda: count(pg_dsn) == 6 and pending(rds) == 0, timeout=30)
    assert sample(service, "teltonika_processor_entries_taken_over_total") == 0
    logged_errors.flush()


def ids(rds: redis.Redis) -> list[str]:
    """Ids of the entries pending in group processor, oldest first."""
    rows = rds.xpending_range(TELEMETRY_STREAM, "processor", "-", "+", 100)
    return [str(row["message_id"]) for row in rows]


@pytest_twisted.ensureDeferred
async def test_stop_wakes_every_sleeping_retry(
    processors: Processors,
    rds: redis.Redis,
    redis_server: RedisServer,
    pg_dsn: str,
    logged_errors: LoggedErrors,
) -> None:
    """Two committed batches wait for XACKs that Redis refuses, each sleeping before its
    next attempt (100 s here): stopping wakes both, and the shutdown ends at once."""
    rds.execute_command("ACL", "SETUSER", "noack", "on", ">pw", "~*", "&*", "+@all", "-xack")
    for i in range(10):
        xadd(rds, entry(imei=imei(i), rec=record(i)))
    url = f"redis://noack:pw@127.0.0.1:{redis_server.port}/0"
    service = processors.start("--redis", url, "--batch-size", "3")
    consumer = service.processor.consumer
    try:
        consumer.config = attrs.evolve(consumer.config, retry_initial=100.0, retry_max=100.0)
        await eventually(lambda: count(pg_dsn) == 6)
        await eventually(lambda: sample(service, "teltonika_processor_redis_errors_total") >= 2)
        stopped = Deferred.fromCoroutine(processors.stop(service))
        await eventually(lambda: stopped.called, timeout=10)  # else a retry kept sleeping
        await stopped
    finally:
        rds.execute_command("ACL", "DELUSER", "noack")
        consumer.database.stop()  # its thread, if the shutdown hung
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_statement_and_lock_timeouts_count_as_unavailable(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """A PostgreSQL that stalls rather than fails: a write waiting on a table lock (then a
    statement held up by a slow trigger) fails after --lock-timeout (--statement-timeout),
    the processor turns not ready and retries, and writes everything once it is free."""
    port = free_port()
    service = processors.start(
        "--lock-timeout",
        "0.2",
        "--statement-timeout",
        "0.5",
        "--metrics",
        f"tcp:{port}:interface=127.0.0.1",
    )
    consumer = service.processor.consumer
    await eventually(consumer.ready)
    timeouts = "teltonika_processor_postgres_errors_total"
    with psycopg.connect(pg_dsn) as lock:
        lock.execute("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")
        xadd(rds, entry(imei=imei(1), rec=record(1)))
        await eventually(lambda: sample(service, timeouts, kind="timeout") >= 2)
        assert not consumer.ready()
        assert await http_status(port, "/readyz") == 503
        lock.rollback()
    await eventually(lambda: count(pg_dsn) == 1 and pending(rds) == 0)
    await eventually(consumer.ready)

    slow_inserts(pg_dsn, 2)
    seen = sample(service, timeouts, kind="timeout")
    xadd(rds, entry(imei=imei(2), rec=record(2)))
    await eventually(lambda: sample(service, timeouts, kind="timeout") >= seen + 2)
    assert not consumer.ready()
    execute(pg_dsn, "DROP TRIGGER slow ON positions")
    await eventually(lambda: count(pg_dsn) == 2 and pending(rds) == 0)
    await eventually(consumer.ready)
    logged_errors.flush()


def exit_status(child: subprocess.Popen[bytes]) -> int:
    """The child's exit status once it has exited by itself (killed after 60 s)."""
    try:
        return child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_refused_start_exits_nonzero(redis_url: str, pg_dsn: str, tmp_path: Path) -> None:
    """twistd teltonika-processor against a positions table of another schema exits with
    status 70 (so a supervisor restarts it, and shows why) after logging the reason."""
    execute(pg_dsn, "CREATE TABLE positions (id integer PRIMARY KEY, lat float)")
    child, log = twistd(tmp_path, redis_url, pg_dsn, "c1")
    assert exit_status(child) == 70
    text = log.read_text()
    assert "Refusing to start" in text and "column device_id is missing" in text


PLANTED_BUG = (
    "import teltonika.processor.consumer as consumer\n"
    "def planted_bug(*args):\n"
    "    raise RuntimeError('planted')\n"
    "consumer.Consumer._update_state = planted_bug\n"
)


def test_a_crashed_loop_exits_nonzero(
    rds: redis.Redis, redis_url: str, pg_dsn: str, tmp_path: Path
) -> None:
    """twistd teltonika-processor whose loop crashes (a bug planted in the state update)
    logs the crash, shuts down in order and exits with status 70; the entry it was writing
    stays pending (committed, so its redelivery after the restart is a duplicate)."""
    xadd(rds, entry(rec=record(0)))
    child, log = twistd(tmp_path, redis_url, pg_dsn, "c1", preamble=PLANTED_BUG)
    assert exit_status(child) == 70
    text = log.read_text()
    assert "The processor loop crashed" in text and "RuntimeError: planted" in text
    assert "Processor stopped" in text
    assert pending(rds) == 1
