"""Migrations: applied once, even by processors starting at the same moment."""

from __future__ import annotations

import threading

import psycopg

from teltonika.processor.migrations import apply_migrations, load_migrations


def test_packaged_migrations_are_numbered():
    versions = [m.version for m in load_migrations()]
    assert versions == sorted(set(versions)) and versions[0] == 1


def test_concurrent_start_applies_each_migration_once(pg_dsn):
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
    assert sorted(applied) == sorted(m.name for m in load_migrations())
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "select version, count(*) from teltonika_migrations group by 1"
        ).fetchall()
        assert all(n == 1 for _, n in rows) and len(rows) == len(load_migrations())
        assert conn.execute("select count(*) from positions").fetchone() == (0,)
        assert apply_migrations(conn) == []  # a later start applies nothing
