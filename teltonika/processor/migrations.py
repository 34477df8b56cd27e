"""Versioned SQL migrations shipped in the package, applied once under an advisory lock.

Files are ``migrations/NNN_name.sql``, applied in version order, each in its own
transaction together with its row in ``teltonika_migrations``. A session-level
``pg_advisory_lock`` serializes processors that start at the same time: the second one
waits, then sees every version already recorded and applies nothing. Never edit a file
that has shipped; add the next number.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Final

import attrs
import psycopg

LOCK_KEY: Final = 0x74656C746F6E6B61  # "teltonka" as a bigint: the processor's advisory lock
TABLE: Final = "teltonika_migrations"


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
    """Apply the missing migrations; return the names applied (empty when up to date).

    Runs on the database thread with an autocommit connection.
    """
    connection.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    try:
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {row[0] for row in connection.execute(f"SELECT version FROM {TABLE}")}
        done = []
        for migration in load_migrations():
            if migration.version in applied:
                continue
            with connection.transaction():
                connection.execute(migration.sql.encode("utf-8"))
                connection.execute(
                    f"INSERT INTO {TABLE} (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            done.append(migration.name)
        return done
    finally:
        connection.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
