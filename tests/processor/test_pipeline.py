"""The processor against a real redis-server and a real PostgreSQL, in-process."""

from __future__ import annotations

from typing import NoReturn

import orjson
import psycopg
import pytest
import pytest_twisted
import redis
from twisted.internet import reactor

from teltonika.contract import TELEMETRY_STREAM
from teltonika.processor.migrations import apply_migrations
from teltonika.processor.streams import LETTER_CHARS
from tests.helpers import LoggedErrors
from tests.processor.helpers import (
    BASE_MS,
    DEAD,
    NX,
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
    xrange,
)
from tests.servers import free_port

DEAD_FORMAT = "Dead-lettered entry {entry_id}: {reason} ({detail})"


def with_field(fields: list[bytes], name: str, value: bytes | str) -> list[bytes]:
    """A copy of an entry_fields list with one field's value replaced."""
    out = list(fields)
    index = out.index(name.encode())
    out[index + 1] = value if isinstance(value, bytes) else value.encode()
    return out


def pairs(fields: list[bytes]) -> list[tuple[bytes, bytes]]:
    """An entry_fields list as (name, value) pairs."""
    return list(zip(fields[0::2], fields[1::2], strict=True))


@pytest_twisted.ensureDeferred
async def test_contract_checks_and_sentinels(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """A u64 above 2**53 reaches jsonb digit for digit and NX bytes become hex; an unknown
    version, a bad sentinel, a missing field and a non-integer IO value are dead-lettered
    with their original id, fields and reason, logged at error, counted and acknowledged."""
    io = ((1, 1, 1), (78, 8, 2**64 - 1), (79, 8, 2**53 + 1), (10, NX, b"\x00\x01\xfe\xff"))
    good = xadd(rds, entry(rec=record(0, io=io)))
    bad_version = xadd(rds, with_field(entry(rec=record(1)), "v", "2"))
    bad_sentinel = xadd(rds, with_field(entry(rec=record(2)), "io", '{"5":{"__bigint":"12x"}}'))
    bad_b64 = xadd(rds, with_field(entry(rec=record(3)), "io", '{"5":{"__buffer_b64":"!!"}}'))
    missing = entry(rec=record(4))
    del missing[missing.index(b"speed") : missing.index(b"speed") + 2]
    missing_id = xadd(rds, missing)
    float_io = xadd(rds, with_field(entry(rec=record(5)), "io", '{"5":1.5}'))
    service = processors.start()
    await eventually(lambda: rds.xlen(DEAD) == 5 and pending(rds) == 0)

    rows = query(pg_dsn, "select io->'78', io->'79', io->>'10', io, latitude::text from positions")
    assert len(rows) == 1
    assert str(rows[0][0]) == str(2**64 - 1)
    assert rows[0][1] == 2**53 + 1
    assert rows[0][2] == "0001feff"
    assert query(pg_dsn, "select (io->>'78')::numeric = 18446744073709551615 from positions")[0][0]
    assert rows[0][4] == "54.6872000"

    letters = {fields["dead.id"]: fields for _id, fields in xrange(rds, DEAD)}
    assert letters[bad_version]["dead.reason"] == "unknown_version"
    assert letters[bad_sentinel]["dead.reason"] == "bad_sentinel"
    assert letters[bad_b64]["dead.reason"] == "bad_sentinel"
    assert letters[missing_id]["dead.reason"] == "missing_field"
    assert letters[float_io]["dead.reason"] == "bad_io"
    assert letters[bad_version]["v"] == "2"  # original fields kept verbatim
    assert letters[bad_version]["imei"] == "356307042441013"
    assert letters[bad_version]["dead.group"] == "processor"
    assert good not in letters
    assert sample(service, "teltonika_processor_dead_lettered_total", reason="bad_sentinel") == 2
    assert sample(service, "teltonika_processor_rows_inserted_total") == 1
    assert len(logged_errors.flush(DEAD_FORMAT)) == 5


@pytest_twisted.ensureDeferred
async def test_duplicate_in_one_batch_is_one_row(
    processors: Processors, rds: redis.Redis, pg_dsn: str
) -> None:
    """The same record twice in one batch gives one row; both entries are acknowledged."""
    xadd(rds, entry(rec=record(0)))
    xadd(rds, entry(rec=record(0)))
    service = processors.start()
    acked = "teltonika_processor_entries_acked_total"
    await eventually(lambda: pending(rds) == 0 and sample(service, acked) == 2)
    assert count(pg_dsn) == 1
    assert sample(service, "teltonika_processor_duplicates_total") == 1
    assert sample(service, "teltonika_processor_rows_inserted_total") == 1


@pytest_twisted.ensureDeferred
async def test_duplicate_in_two_batches_is_one_row(
    processors: Processors, rds: redis.Redis, pg_dsn: str
) -> None:
    """The same record again in a later batch is a duplicate, not a second row."""
    service = processors.start()
    await eventually(service.processor.consumer.ready)
    xadd(rds, entry(rec=record(0)))
    await eventually(lambda: sample(service, "teltonika_processor_entries_acked_total") == 1)
    xadd(rds, entry(rec=record(0)))
    await eventually(lambda: sample(service, "teltonika_processor_entries_acked_total") == 2)
    assert count(pg_dsn) == 1
    assert sample(service, "teltonika_processor_duplicates_total") == 1
    assert pending(rds) == 0


@pytest_twisted.ensureDeferred
async def test_poison_row_is_isolated(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """One row PostgreSQL rejects (a device time out of range) is bisected out of its
    batch and dead-lettered; the other rows of the batch are written."""
    ids = [xadd(rds, entry(imei=imei(i), rec=record(i))) for i in range(20)]
    poison = xadd(rds, with_field(entry(imei=imei(99)), "timestamp_ms", "9999999999999999"))
    ids += [xadd(rds, entry(imei=imei(i), rec=record(i))) for i in range(20, 30)]
    service = processors.start()
    await eventually(lambda: rds.xlen(DEAD) == 1 and pending(rds) == 0)
    assert count(pg_dsn) == 30
    ((_, letter),) = xrange(rds, DEAD)
    assert letter["dead.id"] == poison
    assert letter["dead.reason"] == "rejected_by_database"
    assert "out of range" in letter["dead.detail"]
    assert sample(service, "teltonika_processor_batch_size_count") == 1  # one batch
    assert service.processor.consumer.state.get(imei(99)) is None  # never a latest position
    assert len(logged_errors.flush(DEAD_FORMAT)) == 1


@pytest_twisted.ensureDeferred
async def test_rehydration_one_query_per_batch(
    processors: Processors, rds: redis.Redis, pg_dsn: str
) -> None:
    """Devices missing from memory are loaded from positions in one query per batch, and a
    record older than the stored latest does not move the latest position backwards."""
    first = processors.start()
    for i in range(3):
        xadd(rds, entry(imei=imei(i), rec=record(10_000, speed=10 + i)))
    await eventually(lambda: count(pg_dsn) == 3 and pending(rds) == 0)
    await processors.stop(first)

    for i in range(3):  # older than what is stored: buffered records after a reconnect
        xadd(rds, entry(imei=imei(i), rec=record(5_000, speed=99), received_at_ms=BASE_MS + 60_000))
    xadd(rds, entry(imei=imei(7), rec=record(1_000, speed=7)))
    second = processors.start()
    consumer = second.processor.consumer
    await eventually(lambda: pending(rds) == 0 and consumer.batches == 1)
    assert sample(second, "teltonika_processor_rehydration_queries_total") == 1
    assert sample(second, "teltonika_processor_devices_rehydrated_total") == 3
    for i in range(3):
        snapshot = consumer.state.get(imei(i))
        assert snapshot.timestamp_ms == record(10_000).timestamp_ms
        assert snapshot.speed == 10 + i
        assert snapshot.last_seen_ms == BASE_MS + 60_000  # seen now, though old
    assert consumer.state.get(imei(7)).speed == 7
    assert count(pg_dsn) == 7

    xadd(rds, entry(imei=imei(0), rec=record(20_000, speed=1)))  # all held now: no query
    await eventually(lambda: consumer.batches == 2)
    assert sample(second, "teltonika_processor_rehydration_queries_total") == 1
    assert consumer.state.get(imei(0)).speed == 1


@pytest_twisted.ensureDeferred
async def test_claim_idle_and_max_deliveries(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """Entries left pending by a dead consumer are claimed after --claim-idle. Delivered
    more than --max-deliveries times is not a reason by itself: a good entry redelivered
    that often (restarts, claims while PostgreSQL was down) is written; only one that
    cannot be written (a trigger refuses it with an error that is neither a data error nor
    PostgreSQL being unavailable, retried for ever in a batch) is dead-lettered with reason
    max_deliveries, once written alone, and its neighbours are written."""
    rds.xgroup_create(TELEMETRY_STREAM, "processor", "0", mkstream=True)
    ids = [
        xadd(rds, entry(imei=imei(i), rec=record(i, speed=7 if i == 1 else 42))) for i in range(4)
    ]
    rds.xreadgroup("processor", "dead", {TELEMETRY_STREAM: ">"})
    for _ in range(4):  # each XCLAIM counts as a delivery: 5 in all
        rds.xclaim(TELEMETRY_STREAM, "processor", "dead", 0, [ids[0], ids[1]])
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        apply_migrations(connection)
    execute(
        pg_dsn,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.speed = 7 THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$",
    )
    execute(
        pg_dsn,
        "CREATE TRIGGER refuse BEFORE INSERT ON positions FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    service = processors.start("--claim-idle", "0.3", "--claim-interval", "0.2")
    await eventually(lambda: pending(rds) == 0)
    assert sorted(r[0] for r in query(pg_dsn, "select device_id from positions")) == [
        imei(0),
        imei(2),
        imei(3),
    ]
    ((_, letter),) = xrange(rds, DEAD)
    assert letter["dead.id"] == ids[1]
    assert letter["dead.reason"] == "max_deliveries"
    assert letter["dead.detail"].startswith("delivered 6 times (limit 5); written alone it failed")
    assert "refused" in letter["dead.detail"]
    assert sample(service, "teltonika_processor_entries_claimed_total") == 4
    assert len(logged_errors.flush(DEAD_FORMAT)) == 1
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_two_processors_share_the_group(
    processors: Processors, rds: redis.Redis, pg_dsn: str
) -> None:
    """Two processors in one group split the entries: every entry is one row, each
    processor handled some, and nothing stays pending."""
    a = processors.start("--consumer", "a", "--batch-size", "7")
    b = processors.start("--consumer", "b", "--batch-size", "7")
    await eventually(lambda: a.processor.consumer.ready() and b.processor.consumer.ready())
    for i in range(300):
        xadd(rds, entry(imei=imei(i % 40), rec=record(i)))
    await eventually(lambda: count(pg_dsn) == 300 and pending(rds) == 0)
    read_a = sample(a, "teltonika_processor_entries_read_total")
    read_b = sample(b, "teltonika_processor_entries_read_total")
    assert read_a > 0 and read_b > 0
    assert read_a + read_b == 300


@pytest_twisted.ensureDeferred
async def test_io_bag_round_trip(processors: Processors, rds: redis.Redis, pg_dsn: str) -> None:
    """Every IO value of a codec 8E record is stored under its decimal id."""
    io = ((1, 1, 0), (21, 1, 5), (66, 2, 65535), (241, 4, 24602), (11, 8, 2**53 - 1))
    xadd(rds, entry(rec=record(0, io=io)))
    processors.start()
    await eventually(lambda: count(pg_dsn) == 1)
    ((bag,),) = query(pg_dsn, "select io::text from positions")
    assert orjson.loads(bag) == {"1": 0, "21": 5, "66": 65535, "241": 24602, "11": 2**53 - 1}


@pytest_twisted.ensureDeferred
async def test_free_text_and_binary_values(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """An instance id with COPY's special characters is stored exactly; a field that is not
    UTF-8 is dead-lettered as bad_field, never written."""
    xadd(rds, with_field(entry(rec=record(0)), "instance_id", "a\tb\\c\nd"))
    bad = xadd(rds, with_field(entry(rec=record(1)), "imei", b"\xff\xfe35630704244101"))
    processors.start()
    await eventually(lambda: count(pg_dsn) == 1 and rds.xlen(DEAD) == 1 and pending(rds) == 0)
    assert query(pg_dsn, "select instance_id from positions") == [("a\tb\\c\nd",)]
    ((_, letter),) = xrange(rds, DEAD)
    assert (letter["dead.id"], letter["dead.reason"]) == (bad, "bad_field")
    assert len(logged_errors.flush(DEAD_FORMAT)) == 1


@pytest_twisted.ensureDeferred
async def test_group_deleted_under_the_processor(
    processors: Processors, rds: redis.Redis, pg_dsn: str
) -> None:
    """When the stream (and with it the group) is deleted while the processor runs, it
    creates the group again and carries on with the new entries."""
    service = processors.start()
    await eventually(service.processor.consumer.ready)
    xadd(rds, entry(rec=record(0)))
    await eventually(lambda: count(pg_dsn) == 1)
    rds.delete(TELEMETRY_STREAM)
    xadd(rds, entry(rec=record(1)))
    await eventually(lambda: count(pg_dsn) == 2 and pending(rds) == 0)


IMEI = "356307042441013"
ACKED = "teltonika_processor_entries_acked_total"


@pytest_twisted.ensureDeferred
async def test_same_second_records_are_distinct_rows(
    processors: Processors, rds: redis.Redis, pg_dsn: str
) -> None:
    """A periodic record (ignition on) and an ignition-off event stamped with the same
    millisecond are two rows, and resending both (another receive time and instance) adds
    none. The event is the device's latest position, in memory and as rehydrated by a
    new processor, with latitude and longitude in the same text form either way."""
    periodic = record(0, io=((239, 1, 1), (66, 2, 12480)))
    event = record(0, io=((239, 1, 0), (66, 2, 12480)))._replace(
        priority=1, event_io_id=239, speed=0
    )
    xadd(rds, entry(rec=periodic))
    xadd(rds, entry(rec=event))
    first = processors.start()
    await eventually(lambda: count(pg_dsn) == 2 and pending(rds) == 0)
    latest = first.processor.consumer.state.get(IMEI)
    assert (latest.event_io_id, latest.speed, latest.priority) == (239, 0, 1)
    assert (latest.latitude, latest.longitude) == ("54.6872", "25.2797")

    for rec in (periodic, event):
        resend = entry(rec=rec, received_at_ms=BASE_MS + 90_000)
        xadd(rds, with_field(resend, "instance_id", "ingest-2"))
    await eventually(lambda: sample(first, ACKED) == 4)
    assert count(pg_dsn) == 2
    assert sample(first, "teltonika_processor_duplicates_total") == 2
    await processors.stop(first)

    xadd(rds, entry(rec=record(-5_000)))  # older: makes a new processor rehydrate the device
    second = processors.start()
    await eventually(lambda: second.processor.consumer.batches == 1)
    assert sample(second, "teltonika_processor_devices_rehydrated_total") == 1
    rehydrated = second.processor.consumer.state.get(IMEI)
    same = ("timestamp_ms", "latitude", "longitude", "speed", "event_io_id", "record_hash")
    assert [getattr(rehydrated, f) for f in same] == [getattr(latest, f) for f in same]
    from teltonika.processor.state import LATEST_SQL

    ((row),) = query(pg_dsn, LATEST_SQL, [IMEI])
    assert row[10] == 239  # the stored rule agrees: event_io_id of the latest row


@pytest_twisted.ensureDeferred
async def test_an_entry_that_breaks_the_check_does_not_take_its_batch(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """A __bigint of 5,000 digits (int() refuses it) in the middle of a batch is
    dead-lettered as bad_sentinel; the entries around it are written, the consumer stays
    ready and keeps reading."""
    for i in range(5):
        xadd(rds, entry(imei=imei(i), rec=record(i)))
    huge = '{"1":{"__bigint":"' + "9" * 5000 + '"}}'
    bad = xadd(rds, with_field(entry(imei=imei(99), rec=record(99)), "io", huge))
    for i in range(5, 10):
        xadd(rds, entry(imei=imei(i), rec=record(i)))
    service = processors.start()
    await eventually(lambda: count(pg_dsn) == 10 and rds.xlen(DEAD) == 1 and pending(rds) == 0)
    ((_, letter),) = xrange(rds, DEAD)
    assert (letter["dead.id"], letter["dead.reason"]) == (bad, "bad_sentinel")
    assert service.processor.consumer.ready()
    xadd(rds, entry(imei=imei(11), rec=record(11)))
    await eventually(lambda: count(pg_dsn) == 11)
    assert processors.exits == []
    assert len(logged_errors.flush(DEAD_FORMAT)) == 1


@pytest_twisted.ensureDeferred
async def test_each_new_device_is_rehydrated_once(
    processors: Processors, rds: redis.Redis, pg_dsn: str
) -> None:
    """The next batch decides which devices it must rehydrate only after the previous one
    updated the state: with batch 2 read while batch 1 waits on a table lock, three new
    devices seen in both batches cost one rehydration query, not two."""
    service = processors.start("--batch-size", "3")
    await eventually(service.processor.consumer.ready)
    with psycopg.connect(pg_dsn) as lock:
        lock.execute("LOCK TABLE positions IN EXCLUSIVE MODE")  # SELECT passes, INSERT waits
        added = rds.pipeline(transaction=True)  # all at once: two full batches to read
        for n in range(2):
            for i in range(3):
                xadd(added, entry(imei=imei(i), rec=record(n * 1000 + i)))
        added.execute()
        await eventually(lambda: sample(service, "teltonika_processor_entries_read_total") == 6)
        lock.rollback()
    await eventually(lambda: count(pg_dsn) == 6 and pending(rds) == 0)
    assert sample(service, "teltonika_processor_rehydration_queries_total") == 1


DELETED_FORMAT = (
    "{count} pending entries were deleted from the stream before they were stored "
    "(trimmed or deleted upstream): {ids}"
)


@pytest_twisted.ensureDeferred
async def test_an_entry_deleted_while_pending_is_an_error(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """A pending entry whose content was deleted upstream before it was stored is data
    lost: logged at error level (with its id), counted and acknowledged."""
    rds.xgroup_create(TELEMETRY_STREAM, "processor", "0", mkstream=True)
    xadd(rds, entry(rec=record(0)))
    gone = xadd(rds, entry(rec=record(1)))
    rds.xreadgroup("processor", "c1", {TELEMETRY_STREAM: ">"})
    rds.xdel(TELEMETRY_STREAM, gone)
    service = processors.start()  # consumer c1 re-reads its own pending entries first
    await eventually(lambda: pending(rds) == 0 and count(pg_dsn) == 1)
    (event,) = logged_errors.flush(DELETED_FORMAT)
    assert event["ids"] == gone and event["count"] == 1
    assert sample(service, "teltonika_processor_entries_deleted_total") == 1


@pytest_twisted.ensureDeferred
async def test_dead_letters_are_written_once_across_a_failed_attempt(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """Dead-lettering a batch fails half-way: Redis refuses (and disconnects) the command
    that carries the second letter, larger than its proto-max-bulk-len (1 MiB: a value of
    600,000 two-byte characters, within the contract's 1 MiB of characters). Once that
    limit is raised the retry succeeds, and each bad entry has exactly one letter."""
    small = xadd(rds, with_field(entry(rec=record(0)), "v", "2"))
    large = [*with_field(entry(rec=record(1)), "v", "2"), b"padding", "\u00e9".encode() * 600_000]
    big = xadd(rds, large)
    rds.config_set("proto-max-bulk-len", 1 << 20)
    try:
        service = processors.start()
        await eventually(lambda: sample(service, "teltonika_processor_redis_errors_total") >= 1)
    finally:
        rds.config_set("proto-max-bulk-len", 512 << 20)
    await eventually(lambda: pending(rds) == 0, timeout=30)
    letters = sorted(fields["dead.id"] for _, fields in xrange(rds, DEAD))
    assert letters == sorted([small, big])
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_idle_consumers_with_nothing_pending_are_retired(
    processors: Processors, rds: redis.Redis, pg_dsn: str
) -> None:
    """--retire-idle-consumers deletes other consumers of the group that hold nothing and
    have been idle that long; never one with pending entries, never itself."""
    rds.xgroup_create(TELEMETRY_STREAM, "processor", "0", mkstream=True)
    rds.xgroup_createconsumer(TELEMETRY_STREAM, "processor", "old-container")
    service = processors.start(
        "--claim-idle", "0.3", "--retire-idle-consumers", "0.3", "--stats-interval", "0.2"
    )

    def consumers(group: str = "processor") -> set[str]:
        return {c["name"] for c in rds.xinfo_consumers(TELEMETRY_STREAM, group)}

    await eventually(lambda: consumers() == {"c1"})
    assert sample(service, "teltonika_processor_consumers_retired_total") == 1
    # the script's own rule, on a group of ours: one with an entry pending stays
    rds.xgroup_create(TELEMETRY_STREAM, "other", "0")
    xadd(rds, entry(rec=record(0)))
    rds.xreadgroup("other", "busy", {TELEMETRY_STREAM: ">"})
    rds.xgroup_createconsumer(TELEMETRY_STREAM, "other", "idle")
    rds.xgroup_createconsumer(TELEMETRY_STREAM, "other", "me")
    from teltonika.processor.streams import Streams

    streams = service.processor.consumer.streams
    other = Streams(reactor, TELEMETRY_STREAM, "other", "me", redis=streams.redis)
    retired = await other.retire_idle_consumers(-1)
    assert [name for name, _ in retired] == ["idle"]
    assert consumers("other") == {"busy", "me"}


@pytest_twisted.ensureDeferred
async def test_refuses_to_start_on_a_schema_it_cannot_write(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """A positions table of another schema: the processor says what is wrong at critical
    level, never becomes ready, reads nothing and asks for the non-zero exit."""
    execute(pg_dsn, "CREATE TABLE positions (id integer PRIMARY KEY, lat float)")
    xadd(rds, entry(rec=record(0)))
    service = processors.start()
    await eventually(lambda: processors.exits == [service])
    consumer = service.processor.consumer
    assert consumer.crashed is not None and not consumer.ready()
    (refusal,) = logged_errors.flush("Refusing to start: {error}")
    assert "column device_id is missing" in refusal["error"]
    assert pending(rds) is None  # never joined the group
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_a_crash_leaves_no_ready_zombie(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """An exception nothing expected (a bug planted in the state update) ends the loop: it
    is logged as critical with its traceback, /readyz turns 503 and the service asks for
    the non-zero exit so that a supervisor restarts the process."""
    port = free_port()
    service = processors.start("--metrics", f"tcp:{port}:interface=127.0.0.1")
    consumer = service.processor.consumer
    await eventually(consumer.ready)
    assert await http_status(port, "/readyz") == 200

    def planted_bug(*args: object) -> NoReturn:
        raise RuntimeError("planted")

    consumer._update_state = planted_bug
    xadd(rds, entry(rec=record(0)))
    await eventually(lambda: processors.exits == [service])
    assert await http_status(port, "/readyz") == 503
    assert consumer.crashed.check(RuntimeError) and not consumer.ready()
    crash = [e for e in logged_errors.flush() if e.get("log_failure") is not None]
    assert "The processor loop crashed" in crash[0]["log_format"]


@pytest_twisted.ensureDeferred
async def test_a_bug_while_processing_claimed_entries_is_a_crash(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """A bug met while writing entries claimed from a dead consumer is a crash (critical,
    non-zero exit), not reported as "Redis unreachable" and retried for ever."""
    rds.xgroup_create(TELEMETRY_STREAM, "processor", "0", mkstream=True)
    xadd(rds, entry(rec=record(0)))
    rds.xreadgroup("processor", "dead", {TELEMETRY_STREAM: ">"})
    service = processors.start("--claim-idle", "0.3", "--claim-interval", "0.2")
    consumer = service.processor.consumer

    def planted_bug(*args: object) -> NoReturn:
        raise RuntimeError("planted")

    consumer._update_state = planted_bug
    await eventually(lambda: processors.exits == [service])
    assert sample(service, "teltonika_processor_redis_errors_total") == 0
    formats = [e.get("log_format", "") for e in logged_errors.flush()]
    assert any("The processor loop crashed" in f for f in formats)
    assert not any("Redis unreachable" in f for f in formats)


@pytest_twisted.ensureDeferred
async def test_a_bug_while_writing_is_a_crash_not_an_outage(
    processors: Processors,
    rds: redis.Redis,
    pg_dsn: str,
    logged_errors: LoggedErrors,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception that is not a PostgreSQL error while writing (a TypeError: a bug) ends
    the loop as a crash (exit 70 asked for, not ready), instead of being retried for ever
    as if the database were down."""
    import teltonika.processor.consumer as consumer_module

    service = processors.start()
    consumer = service.processor.consumer
    await eventually(consumer.ready)

    def planted_bug(*args: object) -> NoReturn:
        raise TypeError("planted")

    monkeypatch.setattr(consumer_module, "write_batch", planted_bug)
    xadd(rds, entry(rec=record(0)))
    await eventually(lambda: processors.exits == [service])
    assert consumer.crashed.check(TypeError) and not consumer.ready()
    assert sample(service, "teltonika_processor_postgres_errors_total", kind="TypeError") == 0
    assert pending(rds) == 1  # never acknowledged
    formats = [e.get("log_format", "") for e in logged_errors.flush()]
    assert any("The processor loop crashed" in f for f in formats)
    assert not any("PostgreSQL write failed" in f for f in formats)


@pytest_twisted.ensureDeferred
async def test_a_database_error_is_retried_not_a_crash(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """Conversely, a PostgreSQL error that is neither a connection loss nor bad data (the
    table renamed away by an operator) is retried, not ready meanwhile, and everything is written
    once it is granted again."""
    service = processors.start()
    consumer = service.processor.consumer
    await eventually(consumer.ready)
    execute(pg_dsn, "ALTER TABLE positions RENAME TO positions_away")
    xadd(rds, entry(rec=record(0)))
    errors = "teltonika_processor_postgres_errors_total"
    await eventually(lambda: sample(service, errors, kind="UndefinedTable") >= 2)
    assert not consumer.ready() and processors.exits == []
    execute(pg_dsn, "ALTER TABLE positions_away RENAME TO positions")
    await eventually(lambda: count(pg_dsn) == 1 and pending(rds) == 0)
    await eventually(consumer.ready)
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_a_batch_too_slow_for_the_statement_timeout_is_split(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """A batch whose INSERT cannot finish within --statement-timeout (a row trigger takes
    0.1 s per row: 16 rows need 1.6 s, the limit is 0.7 s) is written in smaller
    transactions after each timeout instead of timing out for ever; every row once."""
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        apply_migrations(connection)
    slow_inserts(pg_dsn, 0.1, each="ROW")
    added = rds.pipeline(transaction=True)
    for i in range(16):
        xadd(added, entry(imei=imei(i), rec=record(i)))
    added.execute()
    service = processors.start("--batch-size", "16", "--statement-timeout", "0.7")
    await eventually(lambda: count(pg_dsn) == 16 and pending(rds) == 0, timeout=30)
    errors = "teltonika_processor_postgres_errors_total"
    assert sample(service, errors, kind="timeout") >= 1
    assert service.processor.consumer.ready()
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_oversized_entries_end_as_one_bounded_dead_letter(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """An entry of 100,000 fields, one whose io is larger than any record (2 MiB) and one
    with a 2 MiB field the contract does not know each end as one dead letter with reason
    oversized, holding a bounded part of the entry (the Lua script that writes letters
    takes at most a few thousand arguments), and the entries around them are written."""
    good = [xadd(rds, entry(imei=imei(i), rec=record(i))) for i in range(2)]
    many = entry(imei=imei(5), rec=record(5))
    for i in range(100_000 - 16):
        many += [f"x{i}".encode(), b"1"]
    huge_io = with_field(entry(imei=imei(6), rec=record(6)), "io", '{"1":' + "1" * (2 << 20) + "}")
    extra = [*entry(imei=imei(7), rec=record(7)), b"note", b"n" * (2 << 20)]
    bad = [xadd(rds, fields) for fields in (many, huge_io, extra)]
    good += [xadd(rds, entry(imei=imei(i), rec=record(i))) for i in range(2, 4)]
    service = processors.start()
    await eventually(lambda: rds.xlen(DEAD) == 3 and pending(rds) == 0, timeout=30)
    assert count(pg_dsn) == 4
    letters = {letter["dead.id"]: letter for _, letter in xrange(rds, DEAD)}
    assert set(letters) == set(bad)
    for letter in letters.values():
        assert letter["dead.reason"] == "oversized"
        assert len(letter) <= 2 * 64 + 8
        assert sum(len(k) + len(v) for k, v in letter.items()) <= LETTER_CHARS + 1000
        assert letter["dead.truncated"]
    assert "100000 fields" in letters[bad[0]]["dead.detail"]
    assert letters[bad[0]]["imei"] == imei(5)
    reason = {"reason": "oversized"}
    assert sample(service, "teltonika_processor_dead_lettered_total", **reason) == 3
    assert len(logged_errors.flush(DEAD_FORMAT)) == 3
    logged_errors.flush()


@pytest_twisted.ensureDeferred
async def test_over_delivered_entries_are_never_lettered_while_postgres_takes_no_writes(
    processors: Processors, rds: redis.Redis, pg_dsn: str, logged_errors: LoggedErrors
) -> None:
    """Entries delivered more than --max-deliveries times (restarts, claims during an
    outage) while PostgreSQL takes no writes (a standby after a failover: read-only) are
    held and retried, never dead-lettered for their delivery count; once it takes writes
    again every one is a row."""
    service = processors.start("--claim-idle", "0.3", "--claim-interval", "0.2")
    await eventually(service.processor.consumer.ready)
    database = pg_dsn.rsplit("/", 1)[1]
    execute(pg_dsn, f"ALTER DATABASE {database} SET default_transaction_read_only = on")
    execute(
        pg_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'teltonika-processor'",
    )
    ids = [f"{BASE_MS}-{i}" for i in range(1, 4)]
    atomic = rds.pipeline(transaction=True)  # read by "dead" before the processor can
    for i, entry_id in enumerate(ids):
        atomic.xadd(TELEMETRY_STREAM, dict(pairs(entry(imei=imei(i), rec=record(i)))), entry_id)
    atomic.xreadgroup("processor", "dead", {TELEMETRY_STREAM: ">"})
    for _ in range(6):
        atomic.xclaim(TELEMETRY_STREAM, "processor", "dead", 0, [*ids])
    atomic.execute()
    errors = "teltonika_processor_postgres_errors_total"
    await eventually(lambda: sample(service, errors, kind="ReadOnlySqlTransaction") >= 3)
    assert rds.xlen(DEAD) == 0 and count(pg_dsn) == 0
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        connection.execute("SET default_transaction_read_only = off")
        connection.execute(f"ALTER DATABASE {database} RESET default_transaction_read_only")
    execute(
        pg_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'teltonika-processor'",
    )
    await eventually(lambda: count(pg_dsn) == 3 and pending(rds) == 0, timeout=30)
    assert rds.xlen(DEAD) == 0
    logged_errors.flush()
