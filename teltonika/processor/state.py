"""Per-device state in bounded memory: each device's latest position and last-seen time.

This is the snapshot the live broadcast (a later issue) serves, so its read side is the
small interface :class:`IDeviceState`: ``get``, ``snapshot``, ``__len__`` and listeners
told whenever a device's latest position moves forward.

Rules (seed 004, rules 3 and 6):

* bounded: at most ``size`` devices; the least recently *seen* device is evicted;
* a record older than the device's latest (a tracker sending its buffer after a
  reconnect) updates last-seen but never moves the latest position backwards;
* a device not in memory is rehydrated from ``positions`` on its next record; the
  consumer asks :meth:`DeviceState.missing` for the whole batch and fetches them all in
  one query (:func:`teltonika.processor.writer.fetch_latest`).

State is updated only with rows PostgreSQL accepted (after commit), so a dead-lettered
record never becomes anyone's latest position. Applying the same row twice is a no-op.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import attrs
from twisted.logger import Logger
from zope.interface import Interface, implementer

from teltonika.processor.entries import Position


@attrs.frozen(slots=True)
class DeviceSnapshot:
    """A device's latest known position (device time) and when it was last seen.

    :ivar timestamp_ms: device time of the latest position.
    :ivar last_seen_ms: the newest ``received_at`` of any record from this device.
    :ivar latitude: exact decimal degrees as text (as stored).
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


def _from_position(position: Position) -> DeviceSnapshot:
    return DeviceSnapshot(
        device_id=position.device_id,
        timestamp_ms=position.timestamp_ms,
        last_seen_ms=position.received_at_ms,
        latitude=position.latitude,
        longitude=position.longitude,
        altitude=int(position.altitude),
        angle=int(position.angle),
        speed=int(position.speed),
        satellites=int(position.satellites),
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
        if current is None or snapshot.timestamp_ms > current.timestamp_ms:
            self._store(snapshot)

    def apply(self, position: Position) -> bool:
        """Apply one committed record; True when the latest position moved forward."""
        device_id = position.device_id
        current = self._devices.get(device_id)
        if current is None or position.timestamp_ms > current.timestamp_ms:
            snapshot = _from_position(position)
            if current is not None and current.last_seen_ms > snapshot.last_seen_ms:
                snapshot = attrs.evolve(snapshot, last_seen_ms=current.last_seen_ms)
            self._store(snapshot)
            for listener in self._listeners:
                try:
                    listener(snapshot)
                except Exception:
                    # a broken listener must not stop the batch from being acknowledged
                    self._log.failure("State listener {listener} failed", listener=listener)
            return True
        if position.received_at_ms > current.last_seen_ms:
            current = attrs.evolve(current, last_seen_ms=position.received_at_ms)
        self._store(current)
        return False

    def _store(self, snapshot: DeviceSnapshot) -> None:
        devices = self._devices
        devices[snapshot.device_id] = snapshot
        devices.move_to_end(snapshot.device_id)
        while len(devices) > self.size:
            devices.popitem(last=False)
            self.evictions += 1
