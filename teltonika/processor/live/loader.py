"""Loading devices the latest map does not know yet from PostgreSQL, in one query.

The fan-out reader starts at the end of the stream, so a device that has not sent since
this processor started is not in the latest map. When a subscription needs it, its newest
stored row is read (one ``DISTINCT ON`` query for all such devices of the subscription)
and merged into the map: live positions that arrived while the query ran are already in
the map, and the later one wins by the processor's "latest" rule (the row carries the
event id, priority and record hash the rule needs, and the query picks each device's row
with that same rule, ``LATEST_ORDER``). A device without any row is remembered as such.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from twisted.internet.defer import Deferred

from teltonika.processor.live.latest import LatestMap
from teltonika.processor.live.messages import make_position
from teltonika.processor.live.metrics import LiveMetrics
from teltonika.processor.state import LATEST_ORDER

if TYPE_CHECKING:
    import psycopg

LATEST_SQL: Final = f"""
SELECT DISTINCT ON (device_id)
       device_id,
       (extract(epoch from ts) * 1000)::bigint,
       (extract(epoch from received_at) * 1000)::bigint,
       latitude::float8, longitude::float8, altitude, speed, angle, satellites,
       event_io_id, priority, record_hash
  FROM positions
 WHERE device_id = ANY(%s) AND ts <= to_timestamp(%s::float8 / 1000)
 ORDER BY device_id, {LATEST_ORDER}
"""
"""Newest row per device no further ahead than the future bound (a row from a tracker
with a bad clock must not pin the device here either); among rows of the same instant,
the one the processor's state and rehydration call the latest
(:data:`teltonika.processor.state.LATEST_ORDER`)."""

Row = tuple[str, int, int, float, float, int, int, int, int, int, int, int]
Runner = Callable[..., Deferred[Any]]


def fetch_latest_rows(
    connection: psycopg.Connection[Any], devices: Sequence[str], until_ms: int
) -> list[Row]:
    """On the database thread: :data:`LATEST_SQL` for *devices*."""
    import psycopg

    try:
        rows: list[Row] = connection.execute(LATEST_SQL, (list(devices), until_ms)).fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
        return []  # migrations have not run (or finished) yet: nothing to read
    return rows


class LatestLoader:
    """:meth:`ensure` puts devices into the latest map (see the module docstring).

    :param run: ``run(fn, *args)`` runs ``fn(connection, *args)`` on a database thread.
    """

    def __init__(
        self,
        latest: LatestMap,
        run: Runner,
        now_ms: Callable[[], int],
        metrics: LiveMetrics,
    ) -> None:
        self.latest = latest
        self.run = run
        self.now_ms = now_ms
        self.metrics = metrics

    async def ensure(self, devices: Sequence[str]) -> None:
        missing = self.latest.missing(devices)
        if not missing:
            return
        self.metrics.postgres_loads.inc()
        rows: list[Row] = await self.run(
            fetch_latest_rows, missing, self.now_ms() + self.latest.max_future_ms
        )
        now = self.now_ms()
        found = set()
        for device, ts, rx, lat, lon, alt, speed, angle, sats, event, priority, key in rows:
            found.add(device)
            position = make_position(
                device,
                ts,
                rx,
                lat,
                lon,
                alt,
                speed,
                angle,
                sats,
                event_io_id=event,
                priority=priority,
                record_hash=key,
            )
            self.latest.hydrate(device, position, now)
        for device in missing:
            if device not in found:
                self.latest.hydrate(device, None, now)
