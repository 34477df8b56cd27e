"""The connection registry and this instance's heartbeat.

docs/design.rst, 'Registry races', says what may happen to an entry and why each rule
below holds.

``connections:registry`` maps each IMEI to the instance holding its socket, so a sender
knows which ``commands:outbound:{instance_id}`` stream to publish to. Redis hashes have
no per-field TTL, so liveness is a separate key, ``instance:heartbeat:{instance_id}``,
written with ``EX 90`` at start and every 30 s; the janitor of any instance removes
entries whose instance has no heartbeat.

Rules, and why:

* Register after a successful login (the caller's job); never on the per-frame path.
* Unregister only if the entry still names us, atomically (a Lua script): a device that
  reconnected to another instance before our close was noticed keeps its new entry.
* The same IMEI twice on this instance (a reconnect before the old socket's close) is
  counted, and only the last logout removes the entry.
* Redis down at login: the device is accepted anyway (telemetry must not depend on the
  command plane), the failure is logged and counted
  (``teltonika_registry_failures_total``), and the registration is retried on every
  heartbeat tick until Redis is back.
* Every heartbeat tick also re-claims (HSETNX) the entries of every IMEI held here: after
  a heartbeat gap the janitor may have removed them, and a device that is still
  connected here must stay routable. An entry that names another instance is left alone.
* Every method's Deferred succeeds; failures are logged and counted, never raised, so a
  ``TimerService`` driving :meth:`heartbeat` never stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, ParamSpec, TypeVar

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika.commands.messages import REGISTRY_KEY, InstanceSettings, heartbeat_key
from teltonika.commands.metrics import CommandMetrics
from teltonika.commands.scripts import REASSERT, UNREGISTER, run_script
from teltonika.redis.connection import RedisConnection
from teltonika.units import SECONDS

HEARTBEAT_TTL: Final = 90 * SECONDS
_P = ParamSpec("_P")
_T = TypeVar("_T")

HEARTBEAT_INTERVAL: Final = 30 * SECONDS
OPERATION_TIMEOUT: Final = 5 * SECONDS


class ConnectionRegistry:
    """This instance's view of ``connections:registry`` and its heartbeat key.

    :param redis: a txredisapi connection (``charset="utf-8"``).
    :param instance_id: this instance's id (unique among running instances).
    :param metrics: counts failures.
    :param now_ms: a clock in milliseconds (the heartbeat's value, for operators).
    :param heartbeat_ttl: seconds of the heartbeat key's ``EX``.
    :param clock: schedules the per-operation timeout (txredisapi queues commands while
        it reconnects instead of failing them, so without a timeout a login during a
        Redis outage would never be counted as a failure).
    :param timeout: seconds one Redis operation may take before it counts as failed.
    :param settings: what the heartbeat value announces to senders (command timing).
    """

    _log = Logger()

    def __init__(
        self,
        redis: RedisConnection,
        instance_id: str,
        metrics: CommandMetrics,
        *,
        now_ms: Callable[[], int] | None = None,
        heartbeat_ttl: float = HEARTBEAT_TTL,
        clock: IReactorTime | None = None,
        timeout: float = OPERATION_TIMEOUT,
        settings: InstanceSettings | None = None,
    ) -> None:
        self.settings = settings if settings is not None else InstanceSettings()
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self._clock: IReactorTime = clock
        self.timeout = timeout
        self._redis = redis
        self.instance_id = instance_id
        self._metrics = metrics
        self._now_ms = now_ms or (lambda: 0)
        self.heartbeat_ttl = heartbeat_ttl
        self.held: dict[str, int] = {}
        """IMEI -> number of live sessions on this instance."""
        self.unsynced: set[str] = set()
        """IMEIs held here whose registration has not reached Redis yet."""
        self._heartbeat_key = heartbeat_key(instance_id)
        self._removing: set[Deferred[None]] = set()
        """Removals still waiting for Redis; graceful shutdown waits for them before the
        Redis connection is closed (else each would time out later, after the close)."""

    def register(self, imei: str) -> Deferred[None]:
        """A device logged in here: point its entry at this instance (HSET, last one wins)."""
        self.held[imei] = self.held.get(imei, 0) + 1
        self.unsynced.discard(imei)
        d: Deferred[Any] = self._call(self._redis.hset, REGISTRY_KEY, imei, self.instance_id)

        def failed(failure: Failure) -> None:
            if imei in self.held:
                self.unsynced.add(imei)
            self._failed("register", failure, imei=imei)

        d.addCallbacks(lambda _: None, failed)
        return d

    def unregister(self, imei: str) -> Deferred[None]:
        """A session of *imei* ended here: remove the entry if it is the last one and the
        entry still names this instance."""
        count = self.held.get(imei, 0)
        if count > 1:
            self.held[imei] = count - 1
            return succeed(None)
        self.held.pop(imei, None)
        if imei in self.unsynced:
            self.unsynced.discard(imei)
            return succeed(None)
        return self._remove([imei])

    def unregister_all(self) -> Deferred[None]:
        """Graceful shutdown: remove every entry that still names this instance."""
        imeis = [imei for imei in self.held if imei not in self.unsynced]
        self.held.clear()
        self.unsynced.clear()
        pending = list(self._removing)
        if imeis:
            pending.append(self._remove(imeis))
        if not pending:
            return succeed(None)
        # Each removal is bounded by its own timeout and never fails (see _remove).
        return DeferredList(pending, consumeErrors=True).addCallback(lambda _: None)

    def heartbeat(self) -> Deferred[None]:
        """Refresh the heartbeat key (SET EX), then retry failed registrations and re-claim
        held entries that the janitor may have removed. Never fails."""
        return Deferred.fromCoroutine(self._heartbeat())

    async def _heartbeat(self) -> None:
        try:
            await self._call(
                self._redis.set,
                self._heartbeat_key,
                self.settings.heartbeat_value(self._now_ms()),
                expire=max(1, round(self.heartbeat_ttl)),
            )
        except Exception:
            self._failed("heartbeat", Failure())
            return
        pending = sorted(self.unsynced)
        self.unsynced.clear()
        for imei in pending:
            if imei not in self.held:
                continue
            try:
                await self._call(self._redis.hset, REGISTRY_KEY, imei, self.instance_id)
            except Exception:
                if imei in self.held:
                    self.unsynced.add(imei)
                self._failed("register", Failure(), imei=imei)
        held = [imei for imei in self.held if imei not in self.unsynced]
        if held:
            try:
                await self._call(
                    run_script, self._redis, REASSERT, [REGISTRY_KEY], [self.instance_id, *held]
                )
            except Exception:
                self._failed("reassert", Failure())

    def stop_heartbeat(self) -> Deferred[None]:
        """Delete the heartbeat key at graceful shutdown (other janitors act at once)."""
        d: Deferred[Any] = self._call(self._redis.delete, self._heartbeat_key)
        d.addCallbacks(lambda _: None, lambda f: self._failed("heartbeat", f))
        return d

    def _remove(self, imeis: list[str]) -> Deferred[None]:
        d: Deferred[Any] = self._call(
            run_script, self._redis, UNREGISTER, [REGISTRY_KEY], [self.instance_id, *imeis]
        )
        d.addCallbacks(lambda _: None, lambda f: self._failed("unregister", f, count=len(imeis)))
        self._removing.add(d)

        def settled(result: None) -> None:
            self._removing.discard(d)
            return result

        return d.addBoth(settled)

    def _call(
        self, function: Callable[_P, Deferred[_T]], *args: _P.args, **kwargs: _P.kwargs
    ) -> Deferred[_T]:
        """Call a Redis method with a timeout; a synchronous raise becomes a failure."""
        d = maybeDeferred(function, *args, **kwargs)
        return d.addTimeout(self.timeout, self._clock)

    def _failed(self, operation: str, failure: Failure, **data: Any) -> None:
        self._metrics.registry_failures.labels(operation=operation).inc()
        self._log.error(
            "Connection registry {operation} failed: {error}",
            operation=operation,
            error=failure.getErrorMessage(),
            **data,
        )
