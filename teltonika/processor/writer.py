"""Write a batch of positions in one transaction, isolating rows PostgreSQL rejects.

The fast path is one transaction: COPY the batch into a temporary staging table, then
``INSERT INTO positions SELECT ... ON CONFLICT (device_id, ts, record_hash) DO NOTHING``.
The row count of the INSERT is the number of new rows; the rest of the batch were
duplicates (already stored, or twice in this batch: the same record resent), which the key
makes harmless (README.rst, "Exactly once, and what that means").

When PostgreSQL rejects the batch because of its *data* (``DataError``, e.g. a timestamp
out of range, or ``IntegrityError``, e.g. a CHECK an operator added), the batch is written
again inside one transaction by bisection: each half in its own savepoint, split until
the bad rows stand alone. They come back in :attr:`WriteOutcome.rejected` for the
dead-letter stream; the rest are committed. Connection-level errors are not caught here:
the caller retries the whole batch later and acknowledges nothing meanwhile.

Runs on the database thread (:class:`teltonika.processor.database.Database`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import Any, Final

import attrs
import psycopg
from psycopg import sql

from teltonika.processor.entries import Position
from teltonika.processor.state import DeviceSnapshot, fetch_latest

STAGING: Final = "teltonika_positions_in"

_STAGING_DDL: Final = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING} (
    device_id text, ts_ms bigint, received_ms bigint, latitude numeric, longitude numeric,
    altitude integer, angle integer, speed integer, satellites integer, priority smallint,
    event_io_id integer, generation_type smallint, codec text, instance_id text, io jsonb,
    record_hash bigint
) ON COMMIT DELETE ROWS
"""

COPY_COLUMNS: Final = (
    "device_id, ts_ms, received_ms, latitude, longitude, altitude, angle, speed, "
    "satellites, priority, event_io_id, generation_type, codec, instance_id, io, record_hash"
)

_COPY: Final = f"COPY {STAGING} ({COPY_COLUMNS}) FROM STDIN"

# ms -> timestamptz: interval arithmetic is exact to the microsecond for any device time
# before the year 2255 (ts_ms * 1000 < 2**53); beyond that PostgreSQL may round.
_INSERT: Final = f"""
INSERT INTO positions (device_id, ts, received_at, latitude, longitude, altitude, angle,
    speed, satellites, priority, event_io_id, generation_type, codec, instance_id, io,
    record_hash)
SELECT device_id,
       timestamptz 'epoch' + ts_ms * interval '1 millisecond',
       timestamptz 'epoch' + received_ms * interval '1 millisecond',
       latitude, longitude, altitude, angle, speed, satellites, priority, event_io_id,
       generation_type, codec, instance_id, io, record_hash
FROM {STAGING}
ON CONFLICT (device_id, ts, record_hash) DO NOTHING
"""

ROW_ERRORS: Final = (psycopg.errors.DataError, psycopg.errors.IntegrityError)
"""Errors caused by a row's values, which bisection can isolate."""

_prepared: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


@attrs.define
class WriteOutcome:
    """What one batch did: rows new to the table, duplicates, rejected rows (with why),
    and the rehydrated latest positions of the devices the caller asked about."""

    inserted: int = 0
    duplicates: int = 0
    rejected: list[tuple[Position, str]] = attrs.field(factory=list)
    latest: list[DeviceSnapshot] = attrs.field(factory=list)
    transactions: int = 0
    seconds: float = 0.0
    """Time spent on the database thread for this batch."""

    def merge(self, other: WriteOutcome) -> None:
        """Add *other* (a part of the same batch written separately) to this outcome."""
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.rejected.extend(other.rejected)
        self.latest.extend(other.latest)
        self.transactions += other.transactions
        self.seconds += other.seconds


def _prepare(connection: psycopg.Connection[Any]) -> None:
    if connection not in _prepared:
        connection.execute(_STAGING_DDL)
        _prepared.add(connection)


def copy_payload(rows: Sequence[Position]) -> bytes:
    """The COPY data of *rows*: one text-format line each (:meth:`Position.copy_line`).

    Built in one go rather than with a ``write_row`` call per row, and by the consumer on
    the reactor thread while the previous batch is being written, so this thread spends
    its time waiting on PostgreSQL rather than holding the GIL.
    """
    return ("\n".join([row.copy_line() for row in rows]) + "\n").encode("utf-8")


def _copy_insert(
    cursor: psycopg.Cursor[Any], rows: Sequence[Position], payload: bytes | None = None
) -> int:
    with cursor.copy(_COPY) as copy:
        copy.write(copy_payload(rows) if payload is None else payload)
    cursor.execute(_INSERT)
    return max(cursor.rowcount, 0)


def write_batch(
    connection: psycopg.Connection[Any],
    rows: Sequence[Position],
    rehydrate: Sequence[str] = (),
    payload: bytes | None = None,
    chunk: int = 0,
) -> WriteOutcome:
    """Rehydrate *rehydrate* devices, then write *rows*; see the module docstring.

    :param rehydrate: device ids whose latest stored position the caller wants (read
        before this batch is written, so "latest" means "before this batch").
    :param payload: ``copy_payload(rows)`` if the caller built it already (used only
        when the batch is written in one transaction).
    :param chunk: most rows per transaction (0: all in one). The consumer lowers it after
        a statement timeout, so that a batch too large for ``statement_timeout`` is
        committed in parts rather than timing out on every retry; a retry after a
        failure half-way rewrites the committed parts as duplicates, which the key
        absorbs.
    """
    started = time.perf_counter()
    _prepare(connection)
    outcome = WriteOutcome(latest=fetch_latest(connection, rehydrate))
    if not rows:
        return outcome
    if chunk <= 0 or chunk >= len(rows):
        _write_transaction(connection, rows, payload, outcome)
    else:
        for start in range(0, len(rows), chunk):
            _write_transaction(connection, rows[start : start + chunk], None, outcome)
    outcome.duplicates = len(rows) - len(outcome.rejected) - outcome.inserted
    outcome.seconds = time.perf_counter() - started
    return outcome


def _write_transaction(
    connection: psycopg.Connection[Any],
    rows: Sequence[Position],
    payload: bytes | None,
    outcome: WriteOutcome,
) -> None:
    """*rows* in one transaction (by bisection when PostgreSQL rejects some)."""
    cursor = connection.cursor()
    try:
        outcome.transactions += 1
        with connection.transaction():
            inserted = _copy_insert(cursor, rows, payload)
        outcome.inserted += inserted
    except ROW_ERRORS:
        outcome.transactions += 1
        with connection.transaction():
            _bisect(connection, cursor, rows, outcome)
    finally:
        cursor.close()


def _bisect(
    connection: psycopg.Connection[Any],
    cursor: psycopg.Cursor[Any],
    rows: Sequence[Position],
    outcome: WriteOutcome,
) -> None:
    """Write *rows* in a savepoint; on a data error split in halves (recursively)."""
    try:
        with connection.transaction():
            outcome.inserted += _copy_insert(cursor, rows)
            cursor.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(STAGING)))
    except ROW_ERRORS as e:
        if len(rows) == 1:
            outcome.rejected.append((rows[0], f"{type(e).__name__}: {e}".strip()[:500]))
            return
        middle = len(rows) // 2
        _bisect(connection, cursor, rows[:middle], outcome)
        _bisect(connection, cursor, rows[middle:], outcome)
