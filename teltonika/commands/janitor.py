"""The janitor: clean up after instances that died without cleaning up themselves.

It runs in every instance (a ``TimerService``), and every step is safe to run in several
instances at once because each one is a Lua script that first checks that the dead
instance's heartbeat is *still* absent and then changes only what still names it:

1. Registry entries whose instance has no heartbeat are deleted (HDEL only if the value
   still names the dead instance: a device that has meanwhile logged in elsewhere keeps
   its new entry).
2. The dead instance's ``commands:outbound:{id}`` stream is drained: every command still in
   it (never settled; the consumer deletes each entry when it settles it) gets ``failed``
   with reason ``instance_gone``; offline commands go back to wait for the next login
   (status ``requeued``, reason ``instance_gone``).
3. Offline commands past their expiry that are still waiting get ``failed`` / ``expired``.

A pass never raises: failures are logged and counted (``teltonika_janitor_failures_total``)
so the TimerService keeps ticking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika.commands.messages import (
    OFFLINE_EXPIRY_KEY,
    REGISTRY_KEY,
    RESPONSES_MAXLEN,
    RESPONSES_STREAM,
    delivered_marks,
    heartbeat_key,
    outbound_stream,
)
from teltonika.commands.metrics import CommandMetrics
from teltonika.commands.scripts import (
    EXPIRE_OFFLINE,
    JANITOR_REGISTRY,
    JANITOR_STREAM,
    run_script,
)
from teltonika.redis.connection import RedisConnection, reply_int, reply_list, reply_text
from teltonika.units import SECONDS

JANITOR_INTERVAL: Final = 30 * SECONDS
_OUTBOUND_PREFIX: Final = "commands:outbound:"
EXPIRE_BATCH: Final = 1000
PASS_TIMEOUT: Final = 20 * SECONDS


class Janitor:
    """One instance's janitor.

    :param redis: a txredisapi connection (``charset="utf-8"``).
    :param instance_id: this instance (never treated as dead by itself).
    :param now_ms: milliseconds since the epoch (``lambda: int(clock.seconds() * 1000)``).
    :param clock: bounds a pass to *timeout* seconds (None: unbounded).
    """

    _log = Logger()

    def __init__(
        self,
        redis: RedisConnection,
        instance_id: str,
        metrics: CommandMetrics,
        now_ms: Callable[[], int],
        *,
        clock: IReactorTime | None = None,
        timeout: float = PASS_TIMEOUT,
    ) -> None:
        self._clock = clock
        self.timeout = timeout
        self._redis = redis
        self.instance_id = instance_id
        self._metrics = metrics
        self._now_ms = now_ms

    def run(self) -> Deferred[None]:
        """One pass (what the TimerService calls). Never fails."""
        d = Deferred.fromCoroutine(self.run_once())
        if self._clock is not None:
            # txredisapi queues commands while it reconnects: bound the pass so that an
            # outage is counted instead of silently stalling the timer.
            d.addTimeout(self.timeout, self._clock)
        done: Deferred[None] = d.addCallbacks(lambda _: None, self._failed)
        return done

    async def run_once(self) -> dict[str, int]:
        """One pass; returns what it did (for tests): ``removed``, ``failed``, ``expired``."""
        now = str(self._now_ms())
        registry: dict[str, str] = await maybeDeferred(self._redis.hgetall, REGISTRY_KEY)
        by_instance: dict[str, list[str]] = {}
        for imei, instance in registry.items():
            by_instance.setdefault(instance, []).append(imei)
        instances = set(by_instance)
        instances.update(await self._instances_with_streams())
        instances.discard(self.instance_id)
        removed = failed = 0
        for instance in sorted(instances):
            alive = await maybeDeferred(self._redis.exists, heartbeat_key(instance))
            if alive:
                continue
            imeis = by_instance.get(instance, [])
            if imeis:
                count = await run_script(
                    self._redis,
                    JANITOR_REGISTRY,
                    [REGISTRY_KEY, heartbeat_key(instance)],
                    [instance, *imeis],
                )
                if reply_int(count) > 0:
                    removed += reply_int(count)
                    self._metrics.janitor_removed.inc(reply_int(count))
                    self._log.info(
                        "Removed {count} registry entries of dead instance {instance}",
                        count=reply_int(count),
                        instance=instance,
                    )
            count = await run_script(
                self._redis,
                JANITOR_STREAM,
                [
                    outbound_stream(instance),
                    heartbeat_key(instance),
                    RESPONSES_STREAM,
                    delivered_marks(instance),
                ],
                [instance, now, str(RESPONSES_MAXLEN), self.instance_id],
            )
            if reply_int(count) > 0:
                failed += reply_int(count)
                self._log.warn(
                    "Failed {count} undelivered commands of dead instance {instance}",
                    count=reply_int(count),
                    instance=instance,
                )
        expired = await run_script(
            self._redis,
            EXPIRE_OFFLINE,
            [OFFLINE_EXPIRY_KEY, RESPONSES_STREAM],
            [now, str(RESPONSES_MAXLEN), self.instance_id, str(EXPIRE_BATCH)],
        )
        return {"removed": removed, "failed": failed, "expired": reply_int(expired)}

    async def _instances_with_streams(self) -> set[str]:
        """Instance ids that have an outbound stream (SCAN, a few keys per instance)."""
        found: set[str] = set()
        cursor = "0"
        while True:
            reply = await maybeDeferred(
                self._redis.scan, cursor, pattern=_OUTBOUND_PREFIX + "*", count=500
            )
            cursor, keys = reply_text(reply[0]), reply_list(reply[1])
            for key in keys:
                found.add(reply_text(key)[len(_OUTBOUND_PREFIX) :])
            if cursor == "0":
                return found

    def _failed(self, failure: Failure) -> None:
        self._metrics.janitor_failures.inc()
        self._log.error("Janitor pass failed: {error}", error=failure.getErrorMessage())
