"""Subscriptions, their devices, and the batched broadcast.

A *topic* is a set of devices with the subscriptions that watch them: one per event
(shared by every client subscribed to that event) and one per ``devices`` subscription.
The fan-out reader hands every position to :meth:`Hub.receive`, which applies it to the
latest map and, when it moved its device forward, appends it to the pending batch of
each topic holding that device. A flush (at most every ``flush_interval``, at once when
the hub was idle) encodes each topic's batch **once** and hands the same bytes to every
subscriber of the topic.

Ordering (README.rst, "Live positions", the ordering rule): :meth:`Hub.attach` flushes
the topic's pending batch to the existing subscribers, reads the latest map, registers the
subscription and writes its snapshot, all in one synchronous call. Everything broadcast
afterwards moved the map forward after that read, so it is strictly later (by the
processor's "latest" key, :attr:`LivePosition.key`) than the snapshot for its device;
nothing earlier or equal can follow.

A client that stops reading (its transport paused us) is not written to: its
subscriptions keep only the newest position per device and count the ones they replaced,
reported as ``skipped`` when it reads again. Memory per slow client is therefore bounded by
its subscribed devices, whatever the input rate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from teltonika.processor.live.latest import ADVANCED, FUTURE, SEEN, LatestMap
from teltonika.processor.live.messages import (
    LivePosition,
    Member,
    encode_devices,
    encode_positions,
    encode_positions_array,
    encode_seen,
    encode_snapshot,
    positions_parts,
)
from teltonika.processor.live.metrics import LiveMetrics


class Outlet(Protocol):
    """Where a subscription's messages go: one WebSocket connection."""

    @property
    def paused(self) -> bool:
        """True while the transport asked us to stop writing."""

    def send(self, data: bytes | Sequence[bytes], kind: str) -> None:
        """Send one message of type *kind*: bytes, or parts that concatenate to it
        (queued by the outlet while paused)."""


class Subscription:
    """One client subscription (``id`` is the client's)."""

    def __init__(self, request_id: str, event: str | None, outlet: Outlet) -> None:
        self.id = request_id
        self.event = event
        self.outlet = outlet
        self.topic: Topic | None = None
        self.held: dict[str, LivePosition] = {}
        self.skipped = 0
        self.prefix = positions_parts(request_id, 0, b"")[0]
        """What precedes the shared array in this subscription's ``positions`` messages
        (``skipped`` 0), encoded once rather than once per message."""

    def deliver(
        self, array: bytes, positions: Sequence[LivePosition], metrics: LiveMetrics
    ) -> None:
        """One flushed batch: sent as it is, or conflated while the client is not reading."""
        if not self.outlet.paused and not self.held:
            self.outlet.send((self.prefix, array, b"}"), "positions")
            return
        held = self.held
        replaced = 0
        for position in positions:
            if position.device in held:
                replaced += 1
            held[position.device] = position
        if replaced:
            self.skipped += replaced
            metrics.conflated.inc(replaced)
        if not self.outlet.paused:
            self.release()

    def release(self) -> None:
        """Send what was held while the client was not reading, with ``skipped``."""
        if not self.held:
            return
        held = sorted(self.held.values(), key=lambda p: p.key)
        skipped, self.held, self.skipped = self.skipped, {}, 0
        self.outlet.send(
            encode_positions(self.id, skipped, encode_positions_array(held)), "positions"
        )

    def drop(self, devices: Iterable[str]) -> None:
        for device in devices:
            self.held.pop(device, None)


class Topic:
    """A device set and the subscriptions watching it; *event* is None for the private
    topic of a ``devices`` subscription."""

    def __init__(self, event: str | None, members: Iterable[Member]) -> None:
        self.event = event
        self.members: dict[str, Member] = {m.device: m for m in members}
        self.subscribers: list[Subscription] = []
        self.pending: list[LivePosition] = []
        self.seen: dict[str, int] = {}


class Hub:
    """See the module docstring.

    :param now_ms: the server clock in epoch milliseconds.
    :param flush_interval: seconds between two flushes at most (a batch waits no longer).
    """

    def __init__(
        self,
        latest: LatestMap,
        clock: IReactorTime,
        metrics: LiveMetrics,
        now_ms: Callable[[], int],
        flush_interval: float = 0.1,
    ) -> None:
        self.latest = latest
        self.clock = clock
        self.metrics = metrics
        self.now_ms = now_ms
        self.flush_interval = flush_interval
        self.events: dict[str, Topic] = {}
        self.by_device: dict[str, set[Topic]] = {}
        self._dirty: dict[Topic, None] = {}
        self._call: IDelayedCall | None = None
        self._last_flush = -flush_interval
        self.subscription_count = 0
        self.device_count = 0

    # -- input -------------------------------------------------------------------------
    def receive(self, positions: Iterable[LivePosition]) -> None:
        """Apply positions in stream order and queue the ones that moved forward."""
        latest = self.latest
        by_device = self.by_device
        dirty = self._dirty
        now = self.now_ms()
        for position in positions:
            outcome = latest.apply(position, now)
            topics = by_device.get(position.device)
            if not topics:
                continue
            if outcome is ADVANCED:
                for topic in topics:
                    topic.pending.append(position)
                    topic.seen.pop(position.device, None)
                    dirty[topic] = None
            elif outcome is SEEN or outcome is FUTURE:
                entry = latest.get(position.device)
                if entry is not None and entry.seen is not None:
                    for topic in topics:
                        topic.seen[position.device] = entry.seen
        self.metrics.latest_devices.set(len(latest))
        if dirty and self._call is None:
            delay = max(0.0, self._last_flush + self.flush_interval - self.clock.seconds())
            self._call = self.clock.callLater(delay, self.flush)

    # -- output ------------------------------------------------------------------------
    def flush(self) -> None:
        """Send every pending batch (one encoding per topic)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._last_flush = self.clock.seconds()
        dirty, self._dirty = self._dirty, {}
        for topic in dirty:
            self._flush_topic(topic)

    def _flush_topic(self, topic: Topic) -> None:
        positions, topic.pending = topic.pending, []
        if not positions or not topic.subscribers:
            return
        array = encode_positions_array(positions)
        for subscription in list(topic.subscribers):
            subscription.deliver(array, positions, self.metrics)

    def flush_seen(self) -> None:
        """Send ``seen`` for devices whose receive time moved without a newer position."""
        for topic in self._topics():
            if not topic.seen:
                continue
            seen, topic.seen = topic.seen, {}
            for subscription in list(topic.subscribers):
                subscription.outlet.send(encode_seen(subscription.id, seen), "seen")

    def _topics(self) -> list[Topic]:
        unique: dict[Topic, None] = {}
        for topics in self.by_device.values():
            for topic in topics:
                unique[topic] = None
        return list(unique)

    # -- subscriptions -----------------------------------------------------------------
    def attach(self, subscription: Subscription, members: Sequence[Member]) -> None:
        """Register *subscription* and send its snapshot, in one synchronous block.

        The caller loaded every member into the latest map first (devices PostgreSQL
        knows nothing about are held as "no position").
        """
        event = subscription.event
        if event is not None:
            topic = self.events.get(event)
            if topic is None:
                topic = self.events[event] = Topic(event, members)
                self._index(topic, topic.members)
            else:
                self.update_members(event, members)
                self._flush_topic(topic)
        else:
            topic = Topic(None, members)
            self._index(topic, topic.members)
        views = [self.latest.view(member) for member in topic.members.values()]
        topic.subscribers.append(subscription)
        subscription.topic = topic
        subscription.outlet.send(
            encode_snapshot(subscription.id, event, self.now_ms(), views), "snapshot"
        )
        self._count(1, len(topic.members))

    def detach(self, subscription: Subscription) -> None:
        topic = subscription.topic
        subscription.topic = None
        subscription.held = {}
        if topic is None or subscription not in topic.subscribers:
            return
        topic.subscribers.remove(subscription)
        self._count(-1, -len(topic.members))
        if not topic.subscribers:
            self._unindex(topic, list(topic.members))
            self._dirty.pop(topic, None)
            if topic.event is not None and self.events.get(topic.event) is topic:
                del self.events[topic.event]

    def update_members(self, event: str, members: Sequence[Member]) -> None:
        """An event's devices changed: tell its subscribers with a ``devices`` message."""
        topic = self.events.get(event)
        if topic is None:
            return
        new = {m.device: m for m in members}
        added = [m for d, m in new.items() if topic.members.get(d) != m]
        removed = [d for d in topic.members if d not in new]
        if not added and not removed:
            return
        self._flush_topic(topic)
        self._unindex(topic, removed)
        self._count(0, (len(new) - len(topic.members)) * len(topic.subscribers))
        topic.members = new
        self._index(topic, [m.device for m in added])
        views = [self.latest.view(m) for m in added]
        now = self.now_ms()
        for subscription in topic.subscribers:
            subscription.drop(removed)
            subscription.outlet.send(
                encode_devices(subscription.id, views, removed, now), "devices"
            )

    def _index(self, topic: Topic, devices: Iterable[str]) -> None:
        for device in devices:
            self.by_device.setdefault(device, set()).add(topic)

    def _unindex(self, topic: Topic, devices: Iterable[str]) -> None:
        for device in devices:
            topics = self.by_device.get(device)
            if topics is not None:
                topics.discard(topic)
                if not topics:
                    del self.by_device[device]
            topic.seen.pop(device, None)

    def _count(self, subscriptions: int, devices: int) -> None:
        self.subscription_count += subscriptions
        self.device_count += devices
        self.metrics.subscriptions.set(self.subscription_count)
        self.metrics.subscribed_devices.set(self.device_count)
