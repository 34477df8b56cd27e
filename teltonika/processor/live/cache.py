"""A small time-bounded cache with one call in flight per key.

Used for Directus answers: a page reload, or fifty tabs opened at once with one session
cookie, must cost Directus one request, not fifty. Each caller gets a Deferred of its
own (a shared Deferred would let one caller's callbacks change what the next one sees).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlightCache(Generic[K, V]):
    """Cache the outcome of ``fetch(key)``, success or failure.

    :param fetch: starts the real call.
    :param lifetime: seconds an outcome stays cached (0: not cached), given the value or
        the Failure.
    :param size: the most keys held (the oldest dropped first).
    :param on_lookup: told ``True`` for a cache hit (or a joined call), ``False`` for a
        miss (for the hit-ratio metric).
    """

    def __init__(
        self,
        clock: IReactorTime,
        fetch: Callable[[K], Deferred[V]],
        lifetime: Callable[[V | Failure], float],
        size: int = 10_000,
        on_lookup: Callable[[bool], None] = lambda hit: None,
    ) -> None:
        self.clock = clock
        self.fetch = fetch
        self.lifetime = lifetime
        self.size = size
        self.on_lookup = on_lookup
        self._done: OrderedDict[K, tuple[float, V | Failure]] = OrderedDict()
        self._waiting: dict[K, list[Deferred[V]]] = {}
        self.calls = 0

    def get(self, key: K) -> Deferred[V]:
        """The cached outcome, the outcome of the call in flight, or a new call's."""
        now = self.clock.seconds()
        cached = self._done.get(key)
        if cached is not None:
            expires, outcome = cached
            if expires > now:
                self.on_lookup(True)
                if isinstance(outcome, Failure):
                    return fail(outcome)
                return succeed(outcome)
            del self._done[key]
        mine: Deferred[V] = Deferred()
        waiting = self._waiting.get(key)
        if waiting is not None:
            self.on_lookup(True)
            waiting.append(mine)
            return mine
        self.on_lookup(False)
        self._waiting[key] = [mine]
        self.calls += 1
        try:
            call = self.fetch(key)
        except Exception:
            call = fail()
        call.addBoth(self._finished, key)
        return mine

    def _finished(self, outcome: V | Failure, key: K) -> None:
        waiting = self._waiting.pop(key, [])
        seconds = self.lifetime(outcome)
        if seconds > 0:
            self._done[key] = (self.clock.seconds() + seconds, outcome)
            while len(self._done) > self.size:
                self._done.popitem(last=False)
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def forget(self, key: K) -> None:
        self._done.pop(key, None)
