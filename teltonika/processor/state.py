"""Per-device state in bounded memory, and the one rule for "a device's latest position".

This is the snapshot the live broadcast serves, so its read side is the small interface
:class:`IDeviceState`: ``get``, ``snapshot``, ``__len__`` and listeners told whenever a
device's latest position moves forward.

**Which record is the latest** (:func:`latest_key`, and the same order in SQL,
:data:`LATEST_ORDER`): the one with the newest device time; among records of the same
instant (trackers stamp whole seconds, and an event record often shares its second with the
periodic one) an event record (``event_io_id`` not 0) before a periodic one, because an
event is produced by a change of state and so carries the state after it; then the higher
priority (panic over high over low: what an operator must see); then the higher
``record_hash``, which means nothing but makes the choice a function of the stored rows
alone. Not arrival order: a row does not record its stream id, a resend keeps its first
row, and with several processors the order batches commit in is not the order records
arrived in, so only a content rule lets memory, rehydration and the live map agree.

Rules of the state (docs/design.rst, 'State after the commit, rehydrated on demand' and
'Bounded memory'):

* bounded: at most ``size`` devices; the least recently *seen* device is evicted;
* a record older than the device's latest (a tracker sending its buffer after a
  reconnect) updates last-seen but never moves the latest position backwards;
* a device not in memory is rehydrated from ``positions`` on its next record; the
  consumer asks :meth:`DeviceState.missing` for the whole batch and fetches them all in
  one query (:func:`fetch_latest`).

State is updated only with rows PostgreSQL accepted (after commit), so a dead-lettered
record never becomes anyone's latest position. Applying the same row twice is a no-op.
Latitude and longitude are held in one text form (:func:`canonical_degrees`), whether they
came from a record or from a stored row.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from twisted.logger import Logger
from zope.interface import Interface, implementer

from teltonika.processor.entries import Position
from teltonika.processor.identity import canonical_degrees
from teltonika.wire.records import same_class_equality

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "LATEST_ORDER",
    "LATEST_SQL",
    "DeviceSnapshot",
    "DeviceState",
    "IDeviceState",
    "LatestKey",
    "canonical_degrees",
    "fetch_latest",
    "latest_key",
    "make_latest_key",
]

LatestKey = tuple[int, bool, int, int]
"""(device time ms, is an event, priority, record_hash): larger is later."""


def make_latest_key(
    timestamp_ms: int, event_io_id: int, priority: int, record_hash: int
) -> LatestKey:
    """The key of a record from its four deciding values, wherever they come from (a
    stream entry, a stored row, the live broadcast's map): the one place that says
    which value counts in which order, so :func:`latest_key`,
    :meth:`DeviceSnapshot.latest_key` and the live map cannot drift apart."""
    return (timestamp_ms, event_io_id != 0, priority, record_hash)


LATEST_ORDER: Final = "ts DESC, (event_io_id <> 0) DESC, priority DESC, record_hash DESC"
"""``ORDER BY`` of a device's rows, latest first: :func:`latest_key` in SQL."""

LATEST_SQL: Final = f"""
SELECT p.device_id, (extract(epoch FROM p.ts) * 1000)::bigint,
       (extract(epoch FROM p.received_at) * 1000)::bigint,
       p.latitude::text, p.longitude::text, p.altitude, p.angle, p.speed, p.satellites,
       p.priority, p.event_io_id, p.record_hash
FROM unnest(%s::text[]) AS d(id)
CROSS JOIN LATERAL (
    SELECT * FROM positions WHERE device_id = d.id ORDER BY {LATEST_ORDER} LIMIT 1
) AS p
"""
"""The latest stored position of each device in the one parameter (a ``text[]`` of
device ids), in one query; devices without rows are absent. Rows come back in
:class:`DeviceSnapshot` field order (latitude and longitude not yet canonical: use
:func:`fetch_latest`)."""


class DeviceSnapshot(NamedTuple):
    """A device's latest known position (device time) and when it was last seen.

    A typed NamedTuple rather than a frozen attrs class, like
    :class:`~teltonika.wire.records.AVLRecord` and for the same reason: one is built for
    every record that moves a device forward, on the reactor thread, and a tuple is built
    in C (``benchmarks/processor.py``; README.rst, "Benchmarks"). It equals
    only a snapshot (never a plain tuple); ``_replace`` stands in for ``attrs.evolve``.

    :ivar timestamp_ms: device time of the latest position.
    :ivar last_seen_ms: the newest ``received_at`` of any record from this device.
    :ivar latitude: exact decimal degrees as text, canonical (:func:`canonical_degrees`).
    :ivar priority: of the latest record; with ``event_io_id`` and ``record_hash`` it
        decides between records of the same instant (:func:`latest_key`).
    """

    device_id: str
    timestamp_ms: int
    last_seen_ms: int
    latitude: str
    longitude: str
    altitude: int
    angle: int
    speed: int
    satellites: int
    priority: int = 0
    event_io_id: int = 0
    record_hash: int = 0

    def latest_key(self) -> LatestKey:
        """Where this position stands in time (see :func:`latest_key`)."""
        return make_latest_key(self.timestamp_ms, self.event_io_id, self.priority, self.record_hash)


same_class_equality(DeviceSnapshot)


def latest_key(position: Position) -> LatestKey:
    """Where a record stands in time, for "which is a device's latest position": larger is
    later. See the module docstring for the order and why; :data:`LATEST_ORDER` is the same
    order in SQL."""
    return make_latest_key(
        position.timestamp_ms,
        int(position.event_io_id),
        int(position.priority),
        position.record_hash,
    )


def fetch_latest(
    connection: psycopg.Connection[Any], device_ids: Sequence[str]
) -> list[DeviceSnapshot]:
    """The latest stored position of each of *device_ids* that has one, in ONE query
    (:data:`LATEST_SQL`), with canonical latitude and longitude. Runs wherever the
    connection lives (the processor's database thread)."""
    if not device_ids:
        return []
    rows = connection.execute(LATEST_SQL, (list(device_ids),)).fetchall()
    return [
        DeviceSnapshot(device, ts, seen, canonical_degrees(lat), canonical_degrees(lon), *rest)
        for device, ts, seen, lat, lon, *rest in rows
    ]


Listener = Callable[[DeviceSnapshot], None]


class IDeviceState(Interface):
    """Read side of the per-device state (for the live broadcast's snapshot)."""

    def get(device_id: str) -> DeviceSnapshot | None:  # noqa: N805
        """The device's snapshot, or None when it is not in memory."""

    def snapshot() -> list[DeviceSnapshot]:
        """Every device held, least recently seen first."""

    def __len__() -> int:
        """How many devices are held."""

    def add_listener(listener: Listener) -> Callable[[], None]:  # noqa: N805
        """Call *listener* with the new snapshot whenever a device's latest position
        moves forward; returns a function that removes it. Listeners must not raise."""


_new_tuple: Final = tuple.__new__


def _from_position(position: Position) -> DeviceSnapshot:
    # built as a tuple in C: this runs for every record that moves a device forward
    return _new_tuple(
        DeviceSnapshot,
        (
            position.device_id,
            position.timestamp_ms,
            position.received_at_ms,
            position.latitude,
            position.longitude,
            int(position.altitude),
            int(position.angle),
            int(position.speed),
            int(position.satellites),
            int(position.priority),
            int(position.event_io_id),
            position.record_hash,
        ),
    )


@implementer(IDeviceState)
class DeviceState:
    """LRU map of device id -> :class:`DeviceSnapshot`, at most *size* entries.

    :param size: the most devices held (``--state-size``).
    """

    _log = Logger()

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("state size must be at least 1")
        self.size = size
        self._devices: OrderedDict[str, DeviceSnapshot] = OrderedDict()
        self._listeners: list[Listener] = []
        self.evictions = 0

    # -- IDeviceState --------------------------------------------------------------
    def get(self, device_id: str) -> DeviceSnapshot | None:
        """IDeviceState API"""
        return self._devices.get(device_id)

    def snapshot(self) -> list[DeviceSnapshot]:
        """IDeviceState API"""
        return list(self._devices.values())

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[str]:
        return iter(self._devices)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """IDeviceState API"""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    # -- the consumer's side -------------------------------------------------------
    def missing(self, device_ids: Iterable[str]) -> list[str]:
        """The distinct ids among *device_ids* that are not in memory (to rehydrate)."""
        devices = self._devices
        return [d for d in dict.fromkeys(device_ids) if d not in devices]

    def hydrate(self, snapshot: DeviceSnapshot) -> None:
        """Load a device's latest stored position, unless memory already knows better."""
        current = self._devices.get(snapshot.device_id)
        if current is None or snapshot.latest_key() > current.latest_key():
            self._store(snapshot)

    def apply(self, position: Position) -> bool:
        """Apply one committed record; True when the latest position moved forward."""
        device_id = position.device_id
        current = self._devices.get(device_id)
        if (
            current is None
            or position.timestamp_ms > current.timestamp_ms
            or (
                position.timestamp_ms == current.timestamp_ms
                and latest_key(position) > current.latest_key()
            )
        ):
            snapshot = _from_position(position)
            if current is not None and current.last_seen_ms > snapshot.last_seen_ms:
                snapshot = snapshot._replace(last_seen_ms=current.last_seen_ms)
            self._store(snapshot)
            for listener in self._listeners:
                try:
                    listener(snapshot)
                except Exception:
                    # a broken listener must not stop the batch from being acknowledged
                    self._log.failure("State listener {listener} failed", listener=listener)
            return True
        if position.received_at_ms > current.last_seen_ms:
            current = current._replace(last_seen_ms=position.received_at_ms)
        self._store(current)
        return False

    def _store(self, snapshot: DeviceSnapshot) -> None:
        devices = self._devices
        devices[snapshot.device_id] = snapshot
        devices.move_to_end(snapshot.device_id)
        while len(devices) > self.size:
            devices.popitem(last=False)
            self.evictions += 1
