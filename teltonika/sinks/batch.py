"""Group commit: everything submitted while the writes are busy shares the next one.

A :class:`Batcher` collects items from any number of connections. At most
``max_in_flight`` flushes run at a time; the first submit after an idle period schedules a
flush for the next reactor turn (``callLater(0)``), so every frame decoded in the current
turn joins it, and while all flush slots are busy new items simply wait for the next one.
Under light load a frame is written almost at once; under heavy load batches grow by
themselves and the per-batch cost (one Redis round trip, one fsync) is spread over many
records.

One flush in flight suits a file (one fsync covers everything before it). A Redis
connection answers in order, so several batches in flight keep Redis busy while the
server ACKs the previous batch and decodes the next frames, instead of each side waiting
for the other (measured in ``benchmarks/fleet.py throughput``).

Memory is bounded: items beyond ``max_pending`` (in caller-defined units, records for our
sinks) are refused at once with :class:`~teltonika.sinks.SinkOverloadedError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from teltonika.sinks import SinkClosedError, SinkOverloadedError

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collect items and hand them to *write* in batches, one batch in flight at a time.

    :param clock: schedules the flush (a ``Clock`` in tests).
    :param write: takes the list of items of one batch; its Deferred fires when all of
        them are stored, or fails if none may be assumed stored.
    :param max_pending: bound on the summed weight of items waiting or in flight.
    :param max_batch: weight at which a batch is cut (the rest waits for the next one);
        None for no cut.
    :param max_in_flight: writes allowed at once. Their Deferreds may fire in any order;
        each fires its own items only.
    """

    def __init__(
        self,
        clock: IReactorTime,
        write: Callable[[list[T]], Deferred[None]],
        max_pending: int,
        max_batch: int | None = None,
        max_in_flight: int = 1,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._clock = clock
        self.max_batch = max_batch
        self._write = write
        self.max_pending = max_pending
        self._items: list[T] = []
        self._weights: list[int] = []
        self._waiters: list[Deferred[None]] = []
        self._weight = 0
        self.max_in_flight = max_in_flight
        self._in_flight_weight = 0
        self._in_flight = 0
        self._call: IDelayedCall | None = None
        self._idle: list[Deferred[None]] = []
        self._closed = False

    @property
    def pending(self) -> int:
        """Weight of the items waiting or in flight."""
        return self._weight + self._in_flight_weight

    def submit(self, item: T, weight: int = 1) -> Deferred[None]:
        """Queue *item*; the Deferred fires when the batch holding it is stored."""
        if self._closed:
            return fail(SinkClosedError("the sink is closed"))
        if self.pending + weight > self.max_pending:
            return fail(
                SinkOverloadedError(
                    f"{self.pending} records already wait for the sink (limit {self.max_pending})"
                )
            )
        d: Deferred[None] = Deferred()
        self._items.append(item)
        self._weights.append(weight)
        self._waiters.append(d)
        self._weight += weight
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._call is None and self._in_flight < self.max_in_flight and self._items:
            self._call = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._call = None
        if self._in_flight >= self.max_in_flight or not self._items:
            return
        cut = len(self._items)
        if self.max_batch is not None:
            total = 0
            for index, weight in enumerate(self._weights):
                total += weight
                if total >= self.max_batch:
                    cut = index + 1
                    break
        items, waiters = self._items[:cut], self._waiters[:cut]
        weight = sum(self._weights[:cut])
        del self._items[:cut], self._waiters[:cut], self._weights[:cut]
        self._in_flight_weight += weight
        self._weight -= weight
        self._in_flight += 1
        d = maybeDeferred(self._write, items)
        d.addBoth(self._flushed, waiters, weight)
        if self._items:
            self._schedule()  # a cut batch, or room for another write: next turn

    def _flushed(self, result: object, waiters: list[Deferred[None]], weight: int) -> None:
        self._in_flight -= 1
        self._in_flight_weight -= weight
        for waiter in waiters:
            if waiter.called:  # cancelled by its caller's timeout
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)
        if self._items:
            self._schedule()
        elif not self._in_flight:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fire when nothing is waiting or in flight (used to flush at shutdown)."""
        if not self._items and not self._in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def close(self) -> None:
        """Refuse further items and fail those not yet handed to *write*."""
        self._closed = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        items_waiters, self._waiters = self._waiters, []
        self._items = []
        self._weights = []
        self._weight = 0
        for waiter in items_waiters:
            if not waiter.called:
                waiter.errback(SinkClosedError("the sink closed before the write"))
        if not self._in_flight:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
