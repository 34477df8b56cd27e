"""Versioned SQL migrations shipped in the package, applied once under an advisory lock,
and the check that ``positions`` really is the table this processor writes.

Files are ``migrations/NNN_name.sql``, applied in version order, each in its own
transaction together with its row in ``teltonika_migrations``. A session-level
``pg_advisory_lock`` serializes processors that start at the same time: the second one
waits, then sees every version already recorded and applies nothing. Never edit a file
that has shipped; add the next number.

Three rules keep a recorded version honest:

* a migration that does something only under a condition (002: TimescaleDB installed and
  preloaded) has a guard (:data:`GUARDS`): it runs, and is recorded, only while its guard
  holds, and is checked again at every start, so installing TimescaleDB later still
  converts ``positions``;
* a migration whose effect is already in place (:data:`DONE`) is recorded without
  running, so meeting a table upgraded some other way never fails or doubles a key;
* after migrating, :func:`verify_schema` checks the columns and the key of ``positions``
  (``CREATE TABLE IF NOT EXISTS`` accepts any existing table of that name). A mismatch, or
  a migration failing for any reason other than the database being unavailable, raises
  :class:`SchemaError`: the processor refuses to start and says what is wrong, rather than
  retrying writes that can never succeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import attrs
import psycopg

from teltonika.processor.database import SET_TIMEOUTS, is_connection_error

LOCK_KEY: Final = 0x74656C746F6E6B61  # "teltonka" as a bigint: the processor's advisory lock
TABLE: Final = "teltonika_migrations"

GUARDS: Final = {
    2: "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')"
    " AND coalesce(current_setting('shared_preload_libraries', true), '') LIKE '%timescaledb%'",
}
"""Version -> SQL answering one boolean: whether the migration can do its work now."""

_KEY_EXISTS: Final = """
SELECT EXISTS (
    SELECT 1 FROM pg_index i
    WHERE i.indrelid = to_regclass('positions') AND i.indisunique AND i.indimmediate
      AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indnkeyatts = 3
      AND ARRAY(SELECT a.attname::text FROM pg_attribute a
                WHERE a.attrelid = i.indrelid AND a.attnum = ANY ((i.indkey::int2[])[0:2])
                ORDER BY 1) = ARRAY['device_id', 'record_hash', 'ts'])
"""

DONE: Final = {3: _KEY_EXISTS}
"""Version -> SQL answering whether the migration's effect is already in place (a lost
``teltonika_migrations`` row, the upgrade run by hand, a restored dump): then it is
recorded without running, since running it again would add a second key. A shipped file
is never edited, so this is where a migration is made safe to meet twice."""

COLUMNS: Final = {
    "device_id": "text",
    "ts": "timestamp with time zone",
    "received_at": "timestamp with time zone",
    "latitude": "numeric(10,7)",
    "longitude": "numeric(10,7)",
    "altitude": "integer",
    "angle": "integer",
    "speed": "integer",
    "satellites": "integer",
    "priority": "smallint",
    "event_io_id": "integer",
    "generation_type": "smallint",
    "codec": "text",
    "instance_id": "text",
    "io": "jsonb",
    "record_hash": "bigint",
}
"""Every column the processor writes, with its type as ``format_type`` prints it."""

KEY: Final = ("device_id", "ts", "record_hash")
"""The idempotency key: ``ON CONFLICT`` needs a unique index on exactly these columns."""


class SchemaError(RuntimeError):
    """The database cannot hold what this processor writes; the message says why."""


@attrs.frozen
class Migration:
    """One SQL file: ``version`` is its number, ``name`` the file name."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Every packaged migration, sorted by version (duplicate numbers are a bug)."""
    directory = resources.files("teltonika.processor").joinpath("migrations")
    found: dict[int, Migration] = {}
    for item in directory.iterdir():
        name = item.name
        if not name.endswith(".sql"):
            continue
        version = int(name.split("_", 1)[0])
        if version in found:
            raise RuntimeError(f"two migrations numbered {version}: {found[version].name}, {name}")
        found[version] = Migration(version, name, item.read_text("utf-8"))
    return [found[v] for v in sorted(found)]


def apply_migrations(connection: psycopg.Connection[Any]) -> list[str]:
    """Apply the missing migrations, then :func:`verify_schema`; return the names applied
    (empty when up to date).

    Runs on the database thread with an autocommit connection, without the session's
    statement and lock timeouts: a migration may rewrite a large table, and a processor
    waits for another's migration as long as it takes.

    :raise SchemaError: a migration failed (other than by the database being
        unavailable), or the schema is not what the processor writes.
    """
    row = connection.execute(
        "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')"
    ).fetchone()
    assert row is not None
    connection.execute(SET_TIMEOUTS, ("0", "0"))
    try:
        connection.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            done = _apply(connection)
        finally:
            connection.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        verify_schema(connection)
        return done
    finally:
        connection.execute(SET_TIMEOUTS, row)  # the session's own values, not the server's


def _apply(connection: psycopg.Connection[Any]) -> list[str]:
    connection.execute(
        f"CREATE TABLE IF NOT EXISTS {TABLE} ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    applied = {row[0] for row in connection.execute(f"SELECT version FROM {TABLE}")}
    done = []
    for migration in load_migrations():
        guard = GUARDS.get(migration.version)
        if guard is None:
            if migration.version in applied:
                continue
            done_sql = DONE.get(migration.version)
            if done_sql is not None and _holds(connection, done_sql):
                connection.execute(
                    f"INSERT INTO {TABLE} (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
                done.append(migration.name)
                continue
        elif not _holds(connection, guard):
            continue  # nothing to do yet: not recorded, checked again next start
        # (a guarded one runs even if recorded: idempotent, and a version recorded by an
        # older processor while its guard was false did nothing)
        try:
            with connection.transaction():
                connection.execute(migration.sql.encode("utf-8"))
                if migration.version not in applied:
                    connection.execute(
                        f"INSERT INTO {TABLE} (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
        except psycopg.Error as e:
            if is_connection_error(e):
                raise
            problems = schema_problems(connection)
            found = f"; {describe(problems)}" if problems else ""
            raise SchemaError(f"migration {migration.name} failed: {str(e).strip()}{found}") from e
        if migration.version not in applied:
            done.append(migration.name)
    return done


def _holds(connection: psycopg.Connection[Any], sql: str) -> bool:
    """The boolean one query answers."""
    row = connection.execute(sql).fetchone()
    return bool(row and row[0])


_COLUMNS_SQL: Final = """
SELECT attname, format_type(atttypid, atttypmod), attnotnull,
       atthasdef OR attidentity <> '' OR attgenerated <> ''
FROM pg_attribute
WHERE attrelid = to_regclass('positions') AND attnum > 0 AND NOT attisdropped
"""

_UNIQUE_SQL: Final = """
SELECT indexrelid::regclass::text,
       indpred IS NULL AND indexprs IS NULL AND indimmediate,
       ARRAY(SELECT attname::text FROM pg_attribute
             WHERE attrelid = indrelid
               AND attnum = ANY ((indkey::int2[])[0:indnkeyatts - 1]))
FROM pg_index
WHERE indrelid = to_regclass('positions') AND indisunique
"""


def schema_problems(connection: psycopg.Connection[Any]) -> list[str]:
    """What is wrong with ``positions`` for this processor (empty when nothing is)."""
    columns = {
        name: (kind, not_null, has_default)
        for name, kind, not_null, has_default in connection.execute(_COLUMNS_SQL).fetchall()
    }
    if not columns:
        return ["table positions does not exist"]
    problems = []
    for name, kind in COLUMNS.items():
        if name not in columns:
            problems.append(f"column {name} is missing")
        elif columns[name][0] != kind:
            problems.append(f"column {name} is {columns[name][0]}, expected {kind}")
        elif name in KEY and not columns[name][1]:
            problems.append(f"key column {name} allows NULL (a NULL never conflicts)")
    for name, (_, not_null, has_default) in columns.items():
        if name not in COLUMNS and not_null and not has_default:
            problems.append(
                f"column {name} is NOT NULL without a default (the processor does not write it)"
            )
    unique = connection.execute(_UNIQUE_SQL).fetchall()
    key = set(KEY)
    if not any(plain and set(names) == key for _, plain, names in unique):
        problems.append(
            "no unique key on (device_id, ts, record_hash): ON CONFLICT needs one "
            "(a non-deferrable unique constraint or index on exactly those columns)"
        )
    for index, _, names in unique:
        if set(names) < key:
            problems.append(
                f"unique index {index} on ({', '.join(names)}) would reject different "
                "records of one device at the same instant"
            )
    return problems


def verify_schema(connection: psycopg.Connection[Any]) -> None:
    """:raise SchemaError: when :func:`schema_problems` finds any."""
    problems = schema_problems(connection)
    if problems:
        raise SchemaError(describe(problems))


def describe(problems: Sequence[str]) -> str:
    """One sentence for the log: what is wrong with ``positions`` and what to do."""
    return (
        "table positions does not have the schema this processor writes: "
        + "; ".join(problems)
        + " (README.rst, 'The positions table')"
    )
