"""Migrations: applied once, even by processors starting at the same moment; the record
hash key upgrades an old table in place; the schema is verified before anything is
written."""

from __future__ import annotations

import threading
from typing import Any, cast

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.interfaces import IReactorFromThreads

from teltonika.contract import entry_fields
from teltonika.processor import migrations
from teltonika.processor.entries import Position, fields_dict, parse_entry
from teltonika.processor.migrations import apply_migrations, load_migrations
from teltonika.processor.writer import write_batch
from teltonika.wire.records import NX, AVLRecord


def test_packaged_migrations_are_numbered() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions == sorted(set(versions)) and versions[0] == 1


def unguarded() -> list[str]:
    """The migrations that apply everywhere (002 waits for TimescaleDB, absent here)."""
    return [m.name for m in load_migrations() if m.version not in migrations.GUARDS]


def test_concurrent_start_applies_each_migration_once(pg_dsn: str) -> None:
    """Four processes' worth of connections migrating at once: each version is applied
    by exactly one of them, all succeed, and the table exists."""
    barrier = threading.Barrier(4)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                barrier.wait()
                results.append(apply_migrations(conn))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    applied = [name for names in results for name in names]
    assert sorted(applied) == sorted(unguarded())
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "select version, count(*) from teltonika_migrations group by 1"
        ).fetchall()
        assert all(n == 1 for _, n in rows) and len(rows) == len(unguarded())
        assert conn.execute("select count(*) from positions").fetchone() == (0,)
        assert apply_migrations(conn) == []  # a later start applies nothing


def test_timescaledb_step_is_recorded_only_when_it_can_work(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TimescaleDB, 002 is not recorded (so a later start, after the extension is
    installed, still runs it); with its guard true it runs and is recorded, and a version
    an older processor recorded while the extension was absent is run again."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_migrations(conn)
        recorded = {v for (v,) in conn.execute("select version from teltonika_migrations")}
        assert 2 not in recorded and {1, 3} <= recorded
        monkeypatch.setitem(migrations.GUARDS, 2, "SELECT true")
        assert apply_migrations(conn) == ["002_timescaledb.sql"]
        assert apply_migrations(conn) == []  # run again (idempotent), reported once
        count = conn.execute("select count(*) from teltonika_migrations where version = 2")
        assert count.fetchone() == (1,)


RECORD = AVLRecord(
    timestamp_ms=1_700_000_000_000,
    priority=0,
    longitude=25.2797,
    latitude=54.0,
    altitude=-3,
    angle=0,
    satellites=9,
    speed=42,
    event_io_id=0,
    io=((239, 1, 1), (78, 8, 2**64 - 1), (385, NX, b"\x00\xfe"), (1, 1, 0)),
)

_OLD_INSERT = """
INSERT INTO positions (device_id, ts, received_at, latitude, longitude, altitude, angle,
    speed, satellites, priority, event_io_id, generation_type, codec, instance_id, io)
VALUES (%s, timestamptz 'epoch' + %s * interval '1 millisecond',
        timestamptz 'epoch' + %s * interval '1 millisecond',
        %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


def position(
    rec: AVLRecord, imei: str = "356307042441013", codec: str = "8E", **extra: object
) -> Position:
    flat = entry_fields(imei, codec, rec, rec.timestamp_ms + 500, "ingest-1")
    fields = fields_dict([v.decode() for v in flat])
    fields.update(extra)
    return parse_entry("1-0", fields)


def test_upgrade_in_place_from_the_first_schema(pg_dsn: str) -> None:
    """A positions table created by migration 001 alone (as an older processor left it,
    002 recorded while it did nothing) with rows in it: 003 computes every row's hash
    exactly as the processor computes it from the entry, swaps the key, and afterwards a
    resend of an old record is a duplicate while another record of the same instant is
    a new row."""
    first = load_migrations()[0]
    old = [
        position(RECORD),
        position(RECORD._replace(timestamp_ms=RECORD.timestamp_ms + 1000, latitude=-0.5)),
        position(
            RECORD._replace(timestamp_ms=RECORD.timestamp_ms + 2000, generation_type=5, io=()),
            codec="16",
        ),
        position(RECORD, imei="356307042441014"),
    ]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(first.sql.encode())
        conn.execute(
            "CREATE TABLE teltonika_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("INSERT INTO teltonika_migrations VALUES (1, %s), (2, 'x')", (first.name,))
        for p in old:
            conn.execute(_OLD_INSERT, p.copy_row()[:-1])
        assert apply_migrations(conn) == ["003_record_hash.sql"]
        stored: dict[str, int] = dict(
            conn.execute(
                "select device_id || (extract(epoch from ts)*1000)::bigint, record_hash"
                " from positions"
            ).fetchall()
        )
        assert stored == {p.device_id + str(p.timestamp_ms): p.record_hash for p in old}
        assert migrations.schema_problems(conn) == []
        constraints = {
            name
            for (name,) in conn.execute(
                "select conname from pg_constraint where conrelid = 'positions'::regclass"
            )
        }
        assert constraints == {"positions_record"}

        resend = position(RECORD)  # the same record again (another receive time)
        event = position(RECORD._replace(priority=1, event_io_id=239, speed=0))
        outcome = write_batch(conn, [resend, event])
        assert (outcome.inserted, outcome.duplicates) == (1, 1)
        assert conn.execute("select count(*) from positions").fetchone() == (5,)


io_values = st.one_of(
    st.tuples(st.just(1), st.integers(0, 255)),
    st.tuples(st.just(2), st.integers(0, 2**16 - 1)),
    st.tuples(st.just(8), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(NX), st.binary(max_size=12)),
)
records = st.builds(
    AVLRecord,
    timestamp_ms=st.integers(0, 2**42),
    priority=st.integers(0, 2),
    longitude=st.integers(-1_800_000_000, 1_800_000_000).map(lambda v: v / 1e7),
    latitude=st.integers(-900_000_000, 900_000_000).map(lambda v: v / 1e7),
    altitude=st.integers(-32768, 32767),
    angle=st.integers(0, 359),
    satellites=st.integers(0, 30),
    speed=st.integers(0, 300),
    event_io_id=st.integers(0, 65535),
    io=st.lists(
        st.tuples(st.integers(0, 65535), io_values), max_size=8, unique_by=lambda t: t[0]
    ).map(lambda io: tuple((i, width, value) for i, (width, value) in io)),
    generation_type=st.one_of(st.none(), st.integers(0, 7)),
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(records, min_size=1, max_size=10))
def test_sql_hash_equals_the_processors(pg_dsn: str, batch: list[AVLRecord]) -> None:
    """For any records, teltonika_record_hash() over the stored row (what migration 003
    uses for old rows) equals the hash the processor computed from the entry."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_migrations(conn)
        conn.execute("TRUNCATE positions")
        rows = [position(r, codec="16" if r.generation_type is not None else "8E") for r in batch]
        write_batch(conn, rows)
        mismatched = conn.execute(
            "select count(*) from positions where record_hash <> teltonika_record_hash(ts,"
            " latitude, longitude, altitude, angle, speed, satellites, priority, event_io_id,"
            " generation_type, io)"
        ).fetchone()
        assert mismatched == (0,)


BREAKAGES = {
    "a column of another type": (
        "ALTER TABLE positions ALTER COLUMN speed TYPE bigint",
        "column speed is bigint, expected integer",
    ),
    "a NOT NULL column the processor does not write": (
        "ALTER TABLE positions ADD COLUMN note text NOT NULL",
        "column note is NOT NULL without a default",
    ),
    "the old key back": (
        "CREATE UNIQUE INDEX positions_old ON positions (device_id, ts)",
        "unique index positions_old on (device_id, ts) would reject different records",
    ),
    "no key": (
        "ALTER TABLE positions DROP CONSTRAINT positions_record",
        "no unique key on (device_id, ts, record_hash)",
    ),
    "someone else's table": (
        "DROP TABLE positions; CREATE TABLE positions (id integer, device_id text)",
        "column ts is missing",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_schema_the_processor_cannot_write_is_refused(pg_dsn: str, breakage: str) -> None:
    """After migrating, positions is checked; a table with another schema (or one changed
    by hand) raises SchemaError naming what is wrong, instead of retrying writes forever."""
    change, problem = BREAKAGES[breakage]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_migrations(conn)
        conn.execute(change)
        error = migrations.SchemaError
        with pytest.raises(error, match="positions does not have the schema") as info:
            apply_migrations(conn)
        assert problem in str(info.value)


def test_a_foreign_table_fails_its_migration_with_a_clear_message(pg_dsn: str) -> None:
    """A positions table of another application before the first start: 001 cannot create
    ours, 003 cannot upgrade it; the error names the migration and what is missing."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE positions (id integer PRIMARY KEY, lat float)")
        with pytest.raises(migrations.SchemaError) as info:
            apply_migrations(conn)
        message = str(info.value)
        assert "migration 003_record_hash.sql failed" in message
        assert "column device_id is missing" in message


def test_migration_003_runs_again_without_harm(pg_dsn: str) -> None:
    """003 is idempotent: on a table upgraded by hand half-way (the column added and filled
    for some rows, the old key still there) it completes the upgrade, and on a table
    already upgraded whose record was lost (or under another name of the key) it changes
    nothing and is recorded."""
    first, _, third = load_migrations()
    rows = [position(RECORD), position(RECORD._replace(timestamp_ms=RECORD.timestamp_ms + 1))]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(first.sql.encode())
        for p in rows:
            conn.execute(_OLD_INSERT, p.copy_row()[:-1])
        conn.execute("ALTER TABLE positions ADD COLUMN record_hash bigint")
        conn.execute(
            "UPDATE positions SET record_hash = 7 WHERE ts = (SELECT min(ts) FROM positions)"
        )
        assert apply_migrations(conn) == [first.name, third.name]
        stored = sorted(r[0] for r in conn.execute("select record_hash from positions"))
        assert stored == sorted([7, rows[1].record_hash])
        assert migrations.schema_problems(conn) == []

        conn.execute("DELETE FROM teltonika_migrations WHERE version = 3")
        assert apply_migrations(conn) == [third.name]
        conn.execute("ALTER TABLE positions RENAME CONSTRAINT positions_record TO my_key")
        conn.execute("DELETE FROM teltonika_migrations WHERE version = 3")
        assert apply_migrations(conn) == [third.name]
        indexes = conn.execute(
            "select count(*) from pg_index where indrelid = 'positions'::regclass"
        ).fetchone()
        assert indexes == (1,)
        assert migrations.schema_problems(conn) == []


def test_timeouts_are_set_per_session_without_startup_options(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two timeouts reach the session with SET after connecting, not as libpq's
    ``options`` startup parameter (which PgBouncer refuses or silently drops); migrations
    lift them and put back the session's own values, not the server's defaults."""
    from twisted.internet import reactor

    from teltonika.processor.database import Database

    seen: list[dict[str, object]] = []
    real_connect = psycopg.connect

    def connect(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        seen.append(kwargs)
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(psycopg, "connect", connect)
    database = Database(
        pg_dsn, cast(IReactorFromThreads, reactor), statement_timeout=1.5, lock_timeout=0.25
    )
    connection = database._connect()
    try:
        assert "options" not in seen[0]
        show = "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')"
        assert connection.execute(show).fetchone() == ("1500ms", "250ms")
        apply_migrations(connection)
        assert connection.execute(show).fetchone() == ("1500ms", "250ms")
    finally:
        database._close()
