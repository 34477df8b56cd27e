"""The Redis Streams sink: one ``telemetry:teltonika`` entry per AVL record.

Frames from every connection are batched (:mod:`teltonika.sinks.batch`): all entries of
all frames that arrived since the last batch left go out in one round trip (the records
through one ``EVAL`` of :data:`teltonika.redis.streams.XADD_SCRIPT`, which XADDs them in
order; device messages as plain XADDs; up to :data:`DEFAULT_MAX_IN_FLIGHT` batches in
flight on the one connection), and each frame's Deferred fires only when
Redis has answered all of it (and ``WAITAOF`` when the durability check chose it). All
records of one frame are therefore written in one round trip, and one failure fails the
whole batch: no device is ACKed for anything in it and every device resends (downstream
deduplicates by IMEI + timestamp).

While Redis is unreachable the sink is not ready: :meth:`RedisStreamSink.publish` fails
at once (nothing is queued in memory), ``/readyz`` answers 503, and a probe (``PING``
every ``probe_interval``) notices when Redis is back; txredisapi reconnects with backoff.

With ``--redis-durability fsync`` the sink is also not ready while Redis does not give
fsync (:mod:`teltonika.redis.durability`): the settings are checked at start (a refusal
stops the server), then every ``durability_interval`` on a timer (never per batch) and
after every reconnect. A failed check logs one error, counts
``teltonika_sink_durability_lost_total`` and refuses frames until a check passes again.

With ``--redis-durability replicated`` every batch ends with ``WAIT`` (or ``WAITAOF``),
which blocks the connection it is sent on until the replicas confirmed: batches pipelined
on one connection would wait for each other's replicas one after another. So the sink
then opens :data:`REPLICATED_WRITERS` connections (the shared one and more from
*connect*) and each batch in flight takes one of its own; their WAITs overlap
(``benchmarks/ingest.py durability`` measures it). Frames of one device are never in two
batches at once (the protocol handles them one after another), so the order of a
device's entries does not depend on which connection carried them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import Final

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from teltonika.contract import FIELDS, MESSAGES_STREAM, TELEMETRY_STREAM, entry_values
from teltonika.interfaces import IManagedSink
from teltonika.metrics import ServerMetrics
from teltonika.redis.connection import RedisConnection, Reply
from teltonika.redis.durability import (
    DEFAULT_REPLICA_TIMEOUT,
    DEFAULT_REPLICAS,
    ConnectionChangedError,
    Durability,
    DurabilityCheck,
    DurabilityError,
    ReplicasNotConfirmedError,
)
from teltonika.redis.streams import (
    SEPARATOR,
    StreamWriteError,
    entry_id_ok,
    pipeline_commands,
    script_count_ok,
    xadd_command,
    xadd_script_command,
)
from teltonika.sinks import SinkUnavailableError
from teltonika.sinks.batch import Batcher
from teltonika.units import SECONDS
from teltonika.wire.records import AVLRecord

DEFAULT_MAX_PENDING_RECORDS: Final = 100_000
"""Records waiting for Redis beyond which publishes fail (about 100 MB of entries)."""

DEFAULT_MAX_BATCH_RECORDS: Final = 5_000
"""Records per round trip at most: keeps one script's run (which blocks Redis) short."""

DEFAULT_MAX_IN_FLIGHT: Final = 4
"""Batches sent to Redis before the first answered: Redis works on one while the server
ACKs the one before and collects the next (see :mod:`teltonika.sinks.batch`)."""

REPLICATED_WRITERS = DEFAULT_MAX_IN_FLIGHT
"""Connections batches go out on with ``replicated``: one per batch in flight, so that one
batch's WAIT does not hold up the next (``benchmarks/ingest.py`` part 4 compares 1)."""

DEFAULT_DURABILITY_INTERVAL: Final = 5 * SECONDS
"""How often ``--redis-durability fsync`` settings are verified again (and after every
reconnect): a ``CONFIG SET`` that takes fsync away is noticed within this time."""

_NAMES: Final = tuple(name.encode() for name in FIELDS)

Item = tuple[list[bytes], list[bytes] | None]
"""What a batch item holds: packed records, or one device message's XADD fields."""


class DurabilityChangedError(StreamWriteError):
    """A durability check answered while the batch was in flight and changed what a batch
    must carry (or refused the settings): the batch was built for the old state, so
    nothing in it may be ACKed. The check already did what follows from it."""


class Verification(Enum):
    """What the sink knows of the durability Redis gives (always VERIFIED in memory mode)."""

    VERIFIED = "verified"
    """The last check passed, on the connection batches use."""
    UNVERIFIED = "unverified"
    """Not known: a new connection, or a check that could not reach Redis."""
    REFUSED = "refused"
    """The last check found settings that do not give what was asked."""


@attrs.frozen
class RedisSinkSettings:
    """How a :class:`RedisStreamSink` writes and checks (the tap fills it from options).

    :ivar durability: ``"memory"``, ``"fsync"`` or ``"replicated"`` (checked by
        :meth:`RedisStreamSink.start`, and with ``fsync``/``replicated`` again every
        *durability_interval* seconds and after every reconnect).
    :ivar replicas: with ``replicated``, the replicas that must confirm every batch.
    :ivar replica_timeout: with ``replicated``, seconds a batch waits for them.
    :ivar maxlen: ``MAXLEN ~ N`` on every XADD, or None (default) for no trimming: a
        blind trim can drop entries the processor has not read yet.
    :ivar max_pending_records: records accepted and not yet confirmed before the sink
        refuses more.
    :ivar probe_interval: seconds between two readiness PINGs; *probe_timeout* bounds one.
    :ivar write_timeout: seconds a batch's pipeline may take.
    """

    durability: str = "memory"
    replicas: int = DEFAULT_REPLICAS
    replica_timeout: float = DEFAULT_REPLICA_TIMEOUT
    durability_interval: float = DEFAULT_DURABILITY_INTERVAL
    maxlen: int | None = None
    max_pending_records: int = DEFAULT_MAX_PENDING_RECORDS
    probe_interval: float = 1 * SECONDS
    probe_timeout: float = 2 * SECONDS
    write_timeout: float = 10 * SECONDS
    stream: str = TELEMETRY_STREAM
    messages_stream: str = MESSAGES_STREAM


@implementer(IManagedSink)
class RedisStreamSink:
    """Publish records as stream entries through a txredisapi connection.

    :param get_redis: returns the txredisapi connection (see
        :func:`teltonika.redis.connect.lazy_connection`); called by :meth:`start`, so
        building the sink connects nothing.
    :param clock: schedules batches and the readiness probe.
    :param settings: durability, trimming, limits and timers.
    :param connect: opens one more connection to the same Redis; with ``replicated``
        the sink writes over the shared one and ``DEFAULT_MAX_IN_FLIGHT - 1`` of these.
    """

    name = "redis"
    _log = Logger()

    def __init__(
        self,
        get_redis: Callable[[], RedisConnection],
        clock: IReactorTime,
        metrics: ServerMetrics,
        *,
        instance_id: str,
        settings: RedisSinkSettings = RedisSinkSettings(),
        connect: Callable[[], RedisConnection] | None = None,
    ) -> None:
        durability = settings.durability
        replica_timeout = settings.replica_timeout
        self._get_redis = get_redis
        self._connect = connect
        self._writers: list[RedisConnection] = []
        """The connections batches go out on; the first is the shared one (:attr:`redis`)."""
        self._in_flight: list[int] = []
        self.clock = clock
        self.metrics = metrics
        self.instance_id = instance_id
        self.wanted_durability = durability
        self.durability_check = DurabilityCheck(durability, settings.replicas, replica_timeout)
        self._wait_bound = replica_timeout if durability == "replicated" else 0.0
        self.durability: Durability | None = None
        self.durability_interval = settings.durability_interval
        self.stream = settings.stream.encode()
        self.messages_stream = settings.messages_stream.encode()
        self.maxlen = settings.maxlen
        self.probe_interval = settings.probe_interval
        self.probe_timeout = settings.probe_timeout
        self.write_timeout = settings.write_timeout
        self._ready = False
        self._reachable = False
        self._verification = Verification.UNVERIFIED
        self._closed = False
        self._probe: LoopingCall | None = None
        self._recheck_timer: LoopingCall | None = None
        self._checking: Deferred[None] | None = None
        if "\0" in instance_id:
            raise ValueError("the instance id must not contain a NUL character")
        self._batcher: Batcher[Item] = Batcher(
            clock,
            self._write,
            settings.max_pending_records,
            DEFAULT_MAX_BATCH_RECORDS,
            max_in_flight=DEFAULT_MAX_IN_FLIGHT,
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Check the durability Redis offers, then start the readiness probe (and, with
        ``fsync``, the periodic durability check).

        :raise teltonika.redis.durability.DurabilityError: Redis cannot give what was asked.
        """
        self._writers = [self._get_redis()]
        if self.wanted_durability == "replicated" and self._connect is not None:
            self._writers += [self._connect() for _ in range(REPLICATED_WRITERS - 1)]
        self._in_flight = [0] * len(self._writers)
        self.durability = await self.durability_check.verify(self.redis, self._writers[1:])
        self._reachable = True
        self._verification = Verification.VERIFIED
        self._update_ready()
        self._log.info(
            "Redis sink ready: stream {stream}, durability {durability}",
            stream=self.stream.decode(),
            durability=self.durability.value,
        )
        self._probe = LoopingCall(self._check)
        self._probe.clock = self.clock
        self._probe.start(self.probe_interval, now=False)
        if self.durability_check.rechecked:
            self._recheck_timer = LoopingCall(self._recheck)
            self._recheck_timer.clock = self.clock
            self._recheck_timer.start(self.durability_interval, now=False)

    async def close(self) -> None:
        """Write what is queued, then stop probing (the caller disconnects Redis)."""
        await self._batcher.when_idle()
        self._batcher.close()
        self._closed = True  # a probe still in flight must not report on a closed sink
        for loop in (self._probe, self._recheck_timer):
            if loop is not None and loop.running:
                loop.stop()
        extra, self._writers = self._writers[1:], self._writers[:1]
        self._in_flight = self._in_flight[:1]
        for connection in extra:
            try:
                await connection.disconnect()
            except Exception as error:  # already gone: nothing left to release
                self._log.info("Redis writer connection closed: {error}", error=error)

    @property
    def redis(self) -> RedisConnection:
        """The shared connection (probes and durability checks go over it); only once
        :meth:`start` was called."""
        if not self._writers:
            raise RuntimeError("the Redis sink was not started")
        return self._writers[0]

    def _check(self) -> Deferred[None]:
        """Probe Redis; never raises (a failing LoopingCall would stop for good). While
        Redis is reachable but its durability is not verified, the probe is a durability
        check, so the sink recovers within a probe interval of the settings' return."""
        if self._reachable and self._verification is not Verification.VERIFIED:
            return self._recheck()
        d: Deferred[Reply] = self.redis.execute_command("PING")
        # with replicated, the PING may wait behind a batch's WAIT on its connection: a
        # replica that is slow to confirm is not a Redis that is down
        d.addTimeout(self.probe_timeout + self._wait_bound, self.clock)

        def ok(_: object) -> None:
            self._set_reachable(True, None)

        def down(failure: Failure) -> None:
            self._set_reachable(False, failure.getErrorMessage())

        return d.addCallbacks(ok, down)

    def _set_reachable(self, reachable: bool, why: str | None) -> None:
        if reachable == self._reachable or self._closed:
            return
        self._reachable = reachable
        if reachable:
            self._log.info("Redis sink is up")
            if self.durability_check.rechecked:
                # txredisapi reconnected, perhaps to a server configured otherwise: no
                # frame is taken until the new connection is verified.
                if self._verification is Verification.VERIFIED:
                    self._verification = Verification.UNVERIFIED
                self._recheck()
        else:
            self._log.error("Redis sink is down: {why}", why=why)
        self._update_ready()

    def _recheck(self) -> Deferred[None]:
        """Verify the durability settings again (on the timer, after a reconnect, after a
        batch over an unverified connection); never raises, never runs twice at once."""
        if self._checking is not None or self._closed:
            return succeed(None)
        verifying = Deferred.fromCoroutine(
            self.durability_check.verify(self.redis, self._writers[1:])
        )
        # with replicated, the check may wait behind a batch's WAIT on its connection
        verifying.addTimeout(self.probe_timeout + self._wait_bound, self.clock)
        d = verifying.addCallbacks(self._verified, self._not_verified)
        self._checking = d
        d.addBoth(self._check_done)
        return d

    def _check_done(self, _: object) -> None:
        self._checking = None

    def _verified(self, durability: Durability) -> None:
        if self._closed:
            return
        if self._verification is Verification.REFUSED:
            self._log.info(
                "Redis gives the durability asked for again ({durability}); taking frames",
                durability=durability.value,
            )
        elif self._verification is Verification.UNVERIFIED:
            self._log.info(
                "Redis durability verified on the new connection ({durability})",
                durability=durability.value,
            )
        self.durability = durability
        self._verification = Verification.VERIFIED
        self._update_ready()

    def _not_verified(self, failure: Failure) -> None:
        if self._closed:
            return
        why = failure.getErrorMessage()
        if not failure.check(DurabilityError):
            if self._verification is Verification.VERIFIED:
                self._verification = Verification.UNVERIFIED
            self._set_reachable(False, f"the durability check failed: {why}")
        elif self._verification is not Verification.REFUSED:
            self._verification = Verification.REFUSED
            self.metrics.sink_durability_lost.inc()
            self._log.error(
                "Redis no longer gives the durability asked for; refusing frames until it "
                "does: {why}",
                why=why,
            )
        self._update_ready()

    def _update_ready(self) -> None:
        ready = self._reachable and self._verification is Verification.VERIFIED
        if ready == self._ready or self._closed:
            return
        self._ready = ready
        self.metrics.sink_ready.set(1 if ready else 0)

    # -- ISink -----------------------------------------------------------------------

    def ready(self) -> bool:
        """ISink API"""
        return self._ready

    def reachable(self) -> bool:
        """Whether Redis answers, whatever its durability settings (device lookups need
        only that; frames need :meth:`ready`)."""
        return self._reachable

    def _refused(self) -> Deferred[None]:
        """A publish while not ready, failed with the reason (the log says why)."""
        if not self._reachable:
            why = "Redis is unreachable"
        elif self._verification is Verification.REFUSED:
            why = "Redis does not give the --redis-durability asked for"
        else:
            why = "Redis durability is being checked (a new connection)"
        return fail(SinkUnavailableError(why))

    def publish(
        self, imei: str, codec_name: str, records: tuple[AVLRecord, ...], received_at_ms: int
    ) -> Deferred[None]:
        """ISink API: the records become entries of the next pipeline."""
        if not self._ready:
            return self._refused()
        instance_id = self.instance_id
        join = SEPARATOR.join
        packed = [
            join(entry_values(imei, codec_name, record, received_at_ms, instance_id))
            for record in records
        ]
        return self._batcher.submit((packed, None), len(packed))

    def publish_message(self, imei: str, message: dict[str, str]) -> Deferred[None]:
        """ISink API: one entry of the device messages stream, in the same batches."""
        if not self._ready:
            return self._refused()
        fields: list[bytes] = []
        for key, value in message.items():
            fields.append(key.encode())
            fields.append(value.encode())
        return self._batcher.submit(([], fields))

    # -- the batch write ---------------------------------------------------------------

    def _write(self, items: list[Item]) -> Deferred[None]:
        # The timeout frees the batcher when txredisapi waits for a connection that does
        # not come back (it queues commands until it reconnects).
        d = Deferred.fromCoroutine(self._write_async(items))
        d.addTimeout(self.write_timeout, self.clock)
        d.addErrback(self._write_failed)
        return d

    def _write_failed(self, failure: Failure) -> Failure:
        if failure.check(DurabilityChangedError):
            return failure  # Redis answered; the check that changed things is handled
        if failure.check(ReplicasNotConfirmedError):
            # Redis answered; whether it still has enough replicas is the check's call
            # (too few: refused, /readyz 503; a slow replica: the next batch may pass).
            self.metrics.sink_replicas_unconfirmed.inc()
            self._recheck()
            return failure
        if failure.check(ConnectionChangedError):
            if self._verification is Verification.VERIFIED:
                self._verification = Verification.UNVERIFIED
                self._log.warn(
                    "Redis reconnected since the durability check; checking again: {why}",
                    why=failure.getErrorMessage(),
                )
                self._update_ready()
            self._recheck()
        else:
            self._set_reachable(False, failure.getErrorMessage())
        return failure

    def _take_writer(self) -> int:
        """The writer connection with the fewest batches in flight (memory and fsync have
        one, on which batches are pipelined)."""
        index = min(range(len(self._writers)), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        return index

    async def _write_async(self, items: Sequence[Item]) -> None:
        packed = [entry for entry_list, _ in items for entry in entry_list]
        commands: list[Sequence[bytes]] = []
        if packed:
            commands.append(xadd_script_command(self.stream, _NAMES, packed, self.maxlen))
        messages = [fields for _, fields in items if fields is not None]
        for fields in messages:
            commands.append(xadd_command(self.messages_stream, fields, self.maxlen))
        durability = self.durability
        assert durability is not None
        confirmations = self.durability_check.batch_commands(durability)
        commands.extend(confirmations)
        writer = self._take_writer()
        try:
            replies = await pipeline_commands(self._writers[writer], commands)
        finally:
            self._in_flight[writer] -= 1
        self.metrics.sink_batches.labels(self.name).inc()
        if len(replies) != len(commands):
            raise StreamWriteError(f"{len(replies)} replies for {len(commands)} commands")
        index = 0
        if packed:
            if not script_count_ok(replies[0], len(packed)):
                raise StreamWriteError(
                    f"the XADD script answered {replies[0]!r} for {len(packed)} entries"
                )
            index = 1
        for reply in replies[index : index + len(messages)]:
            if not entry_id_ok(reply):
                raise StreamWriteError(f"unexpected XADD reply {reply!r}")
        self.durability_check.confirm(durability, replies[len(replies) - len(confirmations) :])
        if self._verification is not Verification.VERIFIED:
            # a check that failed while this batch was in flight
            raise DurabilityChangedError("Redis durability is not verified")
        if self.durability is not durability:
            # A check that answered while this batch was in flight found other settings
            # (Redis 7.2+: appendfsync always became everysec, so batches now need
            # WAITAOF); this one was built without what they now need.
            raise DurabilityChangedError(
                f"the batch was built for durability {durability.value}, and a check "
                f"meanwhile found {self.durability.value if self.durability else None}"
            )
