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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from teltonika.contract import FIELDS, MESSAGES_STREAM, TELEMETRY_STREAM, entry_values
from teltonika.interfaces import ISink
from teltonika.metrics import ServerMetrics
from teltonika.redis.streams import (
    SEPARATOR,
    Durability,
    StreamWriteError,
    check_durability,
    entry_id_ok,
    pipeline_commands,
    script_count_ok,
    waitaof_ok,
    xadd_command,
    xadd_script_command,
)
from teltonika.sinks import SinkUnavailableError
from teltonika.sinks.batch import Batcher
from teltonika.wire.records import AVLRecord

SECONDS: Final = 1.0
DEFAULT_MAX_PENDING_RECORDS: Final = 100_000
"""Records waiting for Redis beyond which publishes fail (about 100 MB of entries)."""

DEFAULT_MAX_BATCH_RECORDS: Final = 5_000
"""Records per round trip at most: keeps one script's run (which blocks Redis) short."""

DEFAULT_MAX_IN_FLIGHT: Final = 4
"""Batches sent to Redis before the first answered: Redis works on one while the server
ACKs the one before and collects the next (see :mod:`teltonika.sinks.batch`)."""

_WAITAOF: Final = (b"WAITAOF", b"1", b"0", b"0")
_NAMES: Final = tuple(name.encode() for name in FIELDS)

Item = tuple[list[bytes], list[bytes] | None]
"""What a batch item holds: packed records, or one device message's XADD fields."""


@implementer(ISink)
class RedisStreamSink:
    """Publish records as stream entries through a txredisapi connection.

    :param get_redis: returns the txredisapi connection (see
        :func:`teltonika.redis.connect.lazy_connection`); called by :meth:`start`, so
        building the sink connects nothing.
    :param clock: schedules batches and the readiness probe.
    :param durability: ``"memory"`` or ``"fsync"`` (checked by :meth:`start`).
    :param maxlen: ``MAXLEN ~ N`` on every XADD, or None (default) for no trimming: a
        blind trim can drop entries the processor has not read yet.
    """

    name = "redis"
    _log = Logger()

    def __init__(
        self,
        get_redis: Callable[[], Any],
        clock: IReactorTime,
        metrics: ServerMetrics,
        *,
        instance_id: str,
        durability: str = "memory",
        stream: str = TELEMETRY_STREAM,
        messages_stream: str = MESSAGES_STREAM,
        maxlen: int | None = None,
        max_pending_records: int = DEFAULT_MAX_PENDING_RECORDS,
        probe_interval: float = 1 * SECONDS,
        probe_timeout: float = 2 * SECONDS,
        write_timeout: float = 10 * SECONDS,
    ) -> None:
        self._get_redis = get_redis
        self.redis: Any = None
        self.clock = clock
        self.metrics = metrics
        self.instance_id = instance_id
        self.wanted_durability = durability
        self.durability: Durability | None = None
        self.stream = stream.encode()
        self.messages_stream = messages_stream.encode()
        self.maxlen = maxlen
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.write_timeout = write_timeout
        self._ready = False
        self._closed = False
        self._probe: LoopingCall | None = None
        if "\0" in instance_id:
            raise ValueError("the instance id must not contain a NUL character")
        self._batcher: Batcher[Item] = Batcher(
            clock,
            self._write,
            max_pending_records,
            DEFAULT_MAX_BATCH_RECORDS,
            max_in_flight=DEFAULT_MAX_IN_FLIGHT,
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Check the durability Redis offers, then start the readiness probe.

        :raise teltonika.redis.streams.DurabilityError: Redis cannot give what was asked.
        """
        self.redis = self._get_redis()
        self.durability = await check_durability(self.redis, self.wanted_durability)
        self._set_ready(True, None)
        self._log.info(
            "Redis sink ready: stream {stream}, durability {durability}",
            stream=self.stream.decode(),
            durability=self.durability.value,
        )
        self._probe = LoopingCall(self._check)
        self._probe.clock = self.clock
        self._probe.start(self.probe_interval, now=False)

    async def close(self) -> None:
        """Write what is queued, then stop probing (the caller disconnects Redis)."""
        await self._batcher.when_idle()
        self._batcher.close()
        self._closed = True  # a probe still in flight must not report on a closed sink
        if self._probe is not None and self._probe.running:
            self._probe.stop()

    def _check(self) -> Deferred[None]:
        """Probe Redis; never raises (a failing LoopingCall would stop for good)."""
        d: Deferred[object] = self.redis.execute_command("PING")
        d.addTimeout(self.probe_timeout, self.clock)

        def ok(_: object) -> None:
            self._set_ready(True, None)

        def down(failure: Any) -> None:
            self._set_ready(False, failure.getErrorMessage())

        return d.addCallbacks(ok, down)

    def _set_ready(self, ready: bool, why: str | None) -> None:
        if ready == self._ready or self._closed:
            return
        self._ready = ready
        self.metrics.sink_ready.set(1 if ready else 0)
        if ready:
            self._log.info("Redis sink is up")
        else:
            self._log.error("Redis sink is down: {why}", why=why)

    # -- ISink -----------------------------------------------------------------------

    def ready(self) -> bool:
        """ISink API"""
        return self._ready

    def publish(
        self, imei: str, codec_name: str, records: tuple[AVLRecord, ...], received_at_ms: int
    ) -> Deferred[None]:
        """ISink API: the records become entries of the next pipeline."""
        if not self._ready:
            return fail(SinkUnavailableError("Redis is unreachable"))
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
            return fail(SinkUnavailableError("Redis is unreachable"))
        fields: list[bytes] = []
        for key, value in message.items():
            fields.append(key.encode())
            fields.append(value.encode())
        return self._batcher.submit(([], fields))

    # -- the batch write ---------------------------------------------------------------

    def _write(self, items: list[Item]) -> Deferred[None]:
        # The timeout frees the batcher when txredisapi waits for a connection that does
        # not come back (it queues commands until it reconnects).
        d = ensureDeferred(self._write_async(items))
        d.addTimeout(self.write_timeout, self.clock)
        d.addErrback(self._write_failed)
        return d

    def _write_failed(self, failure: Any) -> Any:
        self._set_ready(False, failure.getErrorMessage())
        return failure

    async def _write_async(self, items: Sequence[Item]) -> None:
        packed = [entry for entry_list, _ in items for entry in entry_list]
        commands: list[Sequence[bytes]] = []
        if packed:
            commands.append(xadd_script_command(self.stream, _NAMES, packed, self.maxlen))
        messages = [fields for _, fields in items if fields is not None]
        for fields in messages:
            commands.append(xadd_command(self.messages_stream, fields, self.maxlen))
        if self.durability is Durability.WAITAOF:
            commands.append(_WAITAOF)
        replies = await pipeline_commands(self.redis, commands)
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
        if self.durability is Durability.WAITAOF and not waitaof_ok(replies[-1]):
            raise StreamWriteError(f"WAITAOF did not confirm the local fsync: {replies[-1]!r}")
