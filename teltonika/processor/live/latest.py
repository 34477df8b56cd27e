"""The latest map: every device's newest position and last-seen time, per instance.

The live broadcast's single source of truth. Snapshots are read from it, and a live
position is broadcast only when it moves its device's entry forward, so a subscriber
registered right after reading the map (in the same synchronous block) can never be sent
anything older than or equal to its snapshot: that is how the ordering rule of README.rst,
"Live positions", holds without a per-client filter.

Rules, per device:

* a position later than the entry replaces it (:data:`ADVANCED`). "Later" is the
  processor's rule for a device's latest position (:attr:`LivePosition.key`, from
  :func:`teltonika.processor.state.make_latest_key`): the newer ``ts``; within one
  ``ts`` an event record before a periodic one, then the higher priority, then the
  higher record hash. The same rule orders the rows loaded from PostgreSQL
  (``LATEST_ORDER``) and the writer's per-device state, so whatever order records
  arrive in, the map ends on the record ``SELECT ... ORDER BY LATEST_ORDER LIMIT 1``
  returns;
* an equal key is the same record again (a resend) and an earlier one a late record:
  they only move ``seen`` forward (:data:`SEEN`, or :data:`UNCHANGED` when ``seen`` did
  not move);
* a position more than ``max_future_ms`` ahead of the server clock is ignored apart from
  ``seen`` (:data:`FUTURE`): a tracker with a bad clock must not pin its marker.

Bounded: at most ``size`` devices, the least recently touched evicted. A device looked up
in PostgreSQL and found to have no row is held too (``position`` None), so it is not
looked up again on every subscription.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable

import attrs

from teltonika.processor.live.messages import DeviceView, LivePosition, Member


class Outcome(enum.Enum):
    ADVANCED = "advanced"
    SEEN = "seen"
    UNCHANGED = "unchanged"
    FUTURE = "future"


ADVANCED = Outcome.ADVANCED
SEEN = Outcome.SEEN
UNCHANGED = Outcome.UNCHANGED
FUTURE = Outcome.FUTURE


@attrs.define(slots=True)
class Latest:
    """One device's entry: its newest position (None: none stored) and ``seen``."""

    position: LivePosition | None
    seen: int | None


class LatestMap:
    """device id -> :class:`Latest`, at most *size* devices.

    :param max_future_ms: how far ahead of the server clock a position may be.
    """

    def __init__(self, size: int, max_future_ms: int) -> None:
        if size < 1:
            raise ValueError("the latest map holds at least one device")
        self.size = size
        self.max_future_ms = max_future_ms
        self._devices: OrderedDict[str, Latest] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._devices)

    def __contains__(self, device: object) -> bool:
        return device in self._devices

    def get(self, device: str) -> Latest | None:
        return self._devices.get(device)

    def view(self, member: Member) -> DeviceView:
        """What a snapshot says about *member* right now."""
        latest = self._devices.get(member.device)
        if latest is None:
            return DeviceView(member, None, None)
        return DeviceView(member, latest.seen, latest.position)

    def missing(self, devices: Iterable[str]) -> list[str]:
        """The distinct devices of *devices* the map knows nothing about."""
        known = self._devices
        return [d for d in dict.fromkeys(devices) if d not in known]

    def apply(self, position: LivePosition, now_ms: int) -> Outcome:
        """Apply one live position; see the module docstring for the outcomes."""
        devices = self._devices
        device = position.device
        latest = devices.get(device)
        if latest is None:
            latest = Latest(None, None)
            devices[device] = latest
            self._bound()
        else:
            devices.move_to_end(device)
        seen_moved = latest.seen is None or position.rx > latest.seen
        if seen_moved:
            latest.seen = position.rx
        if position.ts > now_ms + self.max_future_ms:
            return FUTURE
        current = latest.position
        if current is None or position.key > current.key:
            latest.position = position
            return ADVANCED
        return SEEN if seen_moved else UNCHANGED

    def hydrate(self, device: str, position: LivePosition | None, now_ms: int) -> None:
        """Merge what PostgreSQL holds for *device* (None: no row). Live updates that
        arrived while the query ran are already in the map; the later key wins."""
        if position is not None and position.ts > now_ms + self.max_future_ms:
            position = None
        latest = self._devices.get(device)
        if latest is None:
            seen = None if position is None else position.rx
            self._devices[device] = Latest(position, seen)
            self._bound()
            return
        if position is None:
            return
        if latest.position is None or position.key > latest.position.key:
            latest.position = position
        if latest.seen is None or position.rx > latest.seen:
            latest.seen = position.rx

    def _bound(self) -> None:
        devices = self._devices
        while len(devices) > self.size:
            devices.popitem(last=False)
            self.evictions += 1
